"""Nagel et al.'s oscillation dampening and iterative weight freezing (train/oscillation_fixes.py),
each on a hand-made case, then inside the trainer (schedules, resume, recipe errors)."""

import csv
import json
import re

import pytest
import torch
import yaml
from test_train import TINY, _params, tiny_recipe

from qat_sadam import prepare_qat
from qat_sadam.cli import main
from qat_sadam.errors import RecipeError
from qat_sadam.train.oscillation import OscillationTracker
from qat_sadam.train.oscillation_fixes import WeightFreezer, annealed, dampening_loss
from qat_sadam.train.recipe import load_recipe
from qat_sadam.train.trainer import Trainer


def _linear(rows, per_channel=True):
    """A prepared Linear whose 4-bit weight quantizer has step 1 (integer codes = rounded weights)."""
    w = torch.tensor(rows, dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    qat = prepare_qat(
        model, {"bits": 4, "first_last_bits": None, "weight": {"scale_mode": "frozen", "per_channel": per_channel}}
    )
    layer = qat.get_submodule("0")
    layer.weight.data.copy_(w)
    layer.weight_quant.scale.data.fill_(1.0)
    return qat, layer


def test_annealed_is_the_reference_cosine_from_the_anneal_start():
    # 0 -> 0.1 over 100 steps, annealing from step 25
    assert annealed(0, 100, 0.0, 0.1, 0.25) == 0.0 and annealed(24, 100, 0.0, 0.1, 0.25) == 0.0
    assert annealed(25, 100, 0.0, 0.1, 0.25) == pytest.approx(0.0)
    assert annealed(62.5, 100, 0.0, 0.1, 0.25) == pytest.approx(0.05)  # half way: the mean
    assert annealed(100, 100, 0.0, 0.1, 0.25) == pytest.approx(0.1)
    assert annealed(40, 100, 0.1, 0.01, 0.25) > annealed(60, 100, 0.1, 0.01, 0.25) > 0.01  # a threshold falls


def test_dampening_loss_and_gradient_on_a_hand_made_layer():
    # range [-7, 7], step 1: bin centres are the rounded weights (half to even), 9.0 and -8.2 are clipped
    qat, layer = _linear([[0.2, 0.7, -1.4, 9.0], [2.5, -3.6, 0.1, -8.2]])
    # (centre - clip(w))^2 = [[.04, .09, .16, 0], [.25, .16, .01, 0]]
    assert dampening_loss(qat, "sum").item() == pytest.approx(0.71)
    assert dampening_loss(qat, "mean").item() == pytest.approx(0.71 / 8)
    loss = dampening_loss(qat)  # kernel_mean: summed over output channels, averaged over the rest
    assert loss.item() == pytest.approx(0.71 / 4)
    loss.backward()
    # d/dw = 2 (w - centre) / 4 inside the range; a clipped weight is already at its bin's edge: 0
    want = torch.tensor([[0.1, -0.15, -0.2, 0.0], [0.25, 0.2, 0.05, 0.0]])
    assert torch.allclose(layer.weight.grad, want, atol=1e-6)
    assert layer.weight_quant.scale.grad is None  # the step size is left alone


def test_dampening_alone_pulls_weights_to_their_bin_centres_without_changing_codes():
    qat, layer = _linear([[0.2, 0.7, -1.4, 3.3], [2.45, -3.6, 0.1, -6.8]])
    codes = layer.weight_quant.integer(layer.weight).clone()
    opt = torch.optim.SGD([layer.weight], lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        dampening_loss(qat).backward()
        opt.step()
    assert torch.equal(layer.weight_quant.integer(layer.weight), codes)
    assert torch.allclose(layer.weight.detach(), codes.float(), atol=1e-3)


def test_freezing_on_a_hand_made_sequence():
    """Weight 0 oscillates between codes 0 and 1, weight 1 climbs 0, 1, 2, ... (flips, never
    reversing). Tracker momentum 0.5, threshold 0.6: weight 0's frequency is 0, 0.5, 0.75 after
    steps 1-3, so it freezes at step 3, to the rounded EMA of its codes before that step
    (0 -> 0.5 -> 0.25: code 0); weight 1 never freezes."""
    qat, layer = _linear([[0.0, 0.0]], per_channel=False)
    tracker = OscillationTracker(qat, momentum=0.5)
    freezer = WeightFreezer(tracker)
    codes, frozen_at = [], None
    for step in range(1, 9):
        layer.weight.data.copy_(torch.tensor([[step % 2, step]], dtype=torch.float32))  # what an optimizer step did
        freezer.hold()
        tracker.update()
        share = float(freezer.update(threshold=0.6))
        if frozen_at is None and share > 0:
            frozen_at = step
        codes.append(layer.weight_quant.integer(layer.weight)[0].tolist())
    assert frozen_at == 3 and share == 0.5
    assert freezer.frozen[0].tolist() == [[True, False]] and freezer.level[0].tolist() == [[0, 0]]
    assert [c[0] for c in codes] == [1, 0, 0, 0, 0, 0, 0, 0]  # held at code 0 from step 3 on
    assert [c[1] for c in codes] == [1, 2, 3, 4, 5, 6, 7, 7]  # the climbing weight is free (7 = the range's top)
    assert float(tracker.freq[0][0, 0]) < 0.75  # no oscillation counted after freezing: the frequency decays


def test_nothing_freezes_without_a_threshold():
    qat, layer = _linear([[0.0]], per_channel=False)
    tracker = OscillationTracker(qat, momentum=0.5)
    freezer = WeightFreezer(tracker)
    for step in range(1, 6):
        layer.weight.data.fill_(step % 2)
        freezer.hold()
        tracker.update()
        assert float(freezer.update(threshold=None)) == 0.0


def _steps(path):
    return [r for r in map(json.loads, open(path / "metrics.jsonl")) if r["type"] == "step"]


def test_trainer_freezes_on_its_schedule_and_frozen_codes_stay(tmp_path):
    r = tiny_recipe(
        "freezing.enabled=true",
        "freezing.threshold=0.005",
        "freezing.threshold_final=0.002",
        "freezing.anneal_start=0.5",
        "optimizer.lr=0.01",
        optimizer="adamw",
    )
    t = Trainer(r, str(tmp_path), progress=False)
    s = t.train()
    steps = _steps(tmp_path)
    assert all(x["freeze_threshold"] is None and x["frozen_frac"] == 0 for x in steps[:15])  # before half the run
    assert steps[16]["freeze_threshold"] == pytest.approx(0.005, rel=0.05) and steps[-1][
        "freeze_threshold"
    ] == pytest.approx(0.002)
    assert 0 < s["frozen_frac"] == steps[-1]["frozen_frac"] < 1
    for (w, q), frozen, level in zip(t.tracker.tracked, t.freezer.frozen, t.freezer.level):
        assert torch.equal(q.integer(w)[frozen], level[frozen])  # what evaluation and export read


def test_dampening_brings_weights_closer_to_bin_centres_in_training(tmp_path):
    def distance(extra):
        t = Trainer(
            tiny_recipe("optimizer.lr=0.001", *extra, optimizer="adamw"),
            str(tmp_path / str(len(extra))),
            progress=False,
        )
        t.train()
        # in quantization steps, of the weights inside the range (a clipped one sits on the range's edge)
        d = [
            ((torch.clamp(w, *q.value_range(w)) - q.dequantize(q.integer(w))) / q.step_size(w)).abs().mean()
            for w, q in t.tracker.tracked
        ]
        return torch.stack(d).mean().item(), _steps(tmp_path / str(len(extra)))

    plain, _ = distance([])
    # a weight that dominates the task loss: Adam then moves each weight ~lr (0.06 of a step here) toward its centre
    damped, steps = distance(["dampening.enabled=true", "dampening.weight=1000", "dampening.weight_final=1000"])
    assert all(x["dampening_weight"] == 1000 for x in steps)
    assert plain > 0.15 and damped < 0.05  # in quantization steps (0.25 if uniform within the bin); measured 0.22, 0.02


def test_resume_with_freezing_and_dampening_equals_an_uninterrupted_run(tmp_path):
    r = tiny_recipe(
        "freezing.enabled=true",
        "freezing.threshold=0.005",
        "freezing.threshold_final=0.002",
        "dampening.enabled=true",
        "optimizer.probe_every=3",
        "model.dropout=0.0",
    )
    full = Trainer(r, str(tmp_path / "full"), progress=False)
    full.train()
    part = Trainer(r, str(tmp_path / "part"), progress=False)
    part._stopping = lambda: part.global_step >= 21  # stopped as by SIGTERM: both schedules read the run's length
    assert part.train()["interrupted"]
    resumed = Trainer(r, str(tmp_path / "part"), resume=True, progress=False)
    resumed.train()
    assert torch.equal(_params(full.model), _params(resumed.model))
    assert all(torch.equal(a, b) for a, b in zip(full.freezer.frozen, resumed.freezer.frozen))


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["quant.enabled=false", "freezing.enabled=true"], "freezing.enabled' needs quantized weights"),
        (["freezing.enabled=true", "logging.oscillations=false"], "reads the oscillation tracker"),
        (["dampening.aggregation=median"], "dampening.aggregation' must be one of sum, mean, kernel_mean"),
        (["dampening.anneal_start=1.0"], "dampening.anneal_start' must be in [0, 1)"),
        (["freezing.threshold_final=-0.1"], "freezing.threshold_final' must be at least 0"),
    ],
)
def test_bad_oscillation_fix_settings_are_recipe_errors(extra, msg):
    with pytest.raises(RecipeError, match=re.escape(msg)):
        load_recipe(None, TINY + extra, bits=None if "quant.enabled=false" in extra else 4)


def test_freezing_needs_a_low_bit_weight(tmp_path):
    with pytest.raises(RecipeError, match="no weight quantizer of 4 bits or fewer"):
        Trainer(load_recipe(None, TINY + ["freezing.enabled=true"], bits=8), str(tmp_path), progress=False)


def test_compare_cells_carry_their_own_recipe_overrides(tmp_path):
    """The stability study's cells: a method is a recipe override of one cell (freezing, no BN
    re-estimation), and the effective-lr control of an S-Adam cell with freezing freezes too."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "\n".join(
            [
                "model: {name: small_cnn, width: 8}",
                "data: {name: synthetic, image_size: 8, batch_size: 128}",
                "quant: {bits: 4}",
                "epochs: 1",
                "calibration_batches: 1",
            ]
        )
    )
    out = tmp_path / "cmp"
    freeze = "freezing.enabled=true@freezing.threshold=0.003@freezing.anneal_start=0"
    cells = ["adamw", f"adamw@{freeze}", f"sadam@{freeze}", f"adamw-effective@{freeze}@of=sadam@{freeze}"]
    assert (
        main(["compare", str(recipe), "--optimizers", ",".join(cells), "--seeds", "1", "--out", str(out), "--quiet"])
        == 0
    )
    runs = {c: out / c.replace("@", "_").replace("=", "") / "seed0" for c in cells}
    summaries = {c: json.load(open(r / "summary.json")) for c, r in runs.items()}
    recipes = {c: yaml.safe_load(open(r / "recipe.yaml")) for c, r in runs.items()}
    assert not recipes["adamw"]["freezing"]["enabled"] and "frozen_frac" not in summaries["adamw"]
    for c in cells[1:]:
        assert recipes[c]["freezing"]["enabled"] and recipes[c]["freezing"]["threshold"] == 0.003
    eff, src = summaries[cells[3]], summaries[cells[2]]
    assert eff["lr"] == pytest.approx(1e-3 * src["mean_damping"]) and recipes[cells[3]]["optimizer"]["name"] == "adamw"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["recipe_overrides"] for r in rows] == ["", *[freeze.replace("@", " ")] * 3]
    md = (out / "results.md").read_text()
    assert "| frozen |" in md and "| osc > 0.01 |" in md
