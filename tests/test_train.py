import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from qat_sadam import configs
from qat_sadam.cli import main
from qat_sadam.errors import RecipeError
from qat_sadam.quant import fake_quant
from qat_sadam.quant.kernels import use_fused_kernels
from qat_sadam.train import host_memory
from qat_sadam.train.oscillation import OscillationTracker
from qat_sadam.train.recipe import load_recipe
from qat_sadam.train.trainer import Trainer
from qat_sadam.workflows.compare import _recipe, parse_cell

TINY = [
    "data.name=synthetic",
    "data.image_size=8",
    "data.batch_size=64",
    "model.name=small_cnn",
    "model.width=8",
    "epochs=2",
    "calibration_batches=1",
    "data.eval_batch_size=256",
]


def tiny_recipe(*extra, optimizer="sadam"):
    return load_recipe(None, TINY + list(extra), bits=4, optimizer=optimizer)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def test_train_end_to_end_writes_metrics_and_checkpoints(tmp_path):
    r = tiny_recipe("optimizer.probe_every=2")
    t = Trainer(r, str(tmp_path), progress=False)
    s = t.train()
    assert s["epochs"] == 2 and s["steps"] == 32
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [x for x in recs if x["type"] == "step"]
    lam = t.optimizer.param_groups[0]["lam"]
    # the logged damping is the one the step used, exp(-lam rho), and the 4-bit loss is not smooth
    assert len(steps) == 32 and all(x["damping"] == pytest.approx(math.exp(-lam * x["rho"])) for x in steps)
    assert max(x["rho"] for x in steps) > 0.05
    assert {"flips", "oscillations", "osc_freq_mean", "loss_var50", "lr", "sec"} <= set(steps[-1])
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (tmp_path / "checkpoints" / "last.pt").exists() and (tmp_path / "checkpoints" / "best.pt").exists()
    assert (tmp_path / "recipe.yaml").exists()
    assert recs[0] == {"type": "kernels", "fake_quant": "fused", "host_memory": t.setup.host_memory}


@pytest.mark.parametrize("every", [0, 5])
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, every):
    r = tiny_recipe(
        "optimizer.probe_every=3",
        "model.dropout=0.0",
        f"checkpoint.every_steps={every}",
        "data.augment.flip=true",
        "data.augment.crop_padding=1",
    )
    full = Trainer(r, str(tmp_path / "full"), progress=False)
    full.train()
    stop = 21 if every else 16  # mid-epoch (16 steps per epoch) with periodic checkpoints, or at an epoch's end
    Trainer(r.replace(max_steps=stop), str(tmp_path / "part"), progress=False).train()
    resumed = Trainer(r, str(tmp_path / "part"), resume=True, progress=False)
    assert resumed.global_step == stop
    resumed.train()
    assert torch.equal(_params(full.model), _params(resumed.model))
    assert full.optimizer.rho == resumed.optimizer.rho


@pytest.mark.parametrize("fused", [True, False])
def test_oscillation_counter_matches_hand_sequence(fused):
    from qat_sadam import prepare_qat

    use_fused_kernels(fused)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.Flatten(), torch.nn.Linear(1, 1))
    qat = prepare_qat(
        model, {"bits": 4, "first_last_bits": None, "weight": {"scale_mode": "frozen", "per_channel": False}}
    )
    conv = qat.get_submodule("0")
    conv.weight_quant.scale.data.fill_(1.0)
    sequence = [0, 1, 2, 1, 1, 2, 3, 2, 3]  # integer weights over steps
    conv.weight.data.fill_(sequence[0])
    tr = OscillationTracker(qat, momentum=0.5)
    flips, oscs = [], []
    for v in sequence[1:]:
        conv.weight.data.fill_(v)
        m = tr.update()
        flips.append(int(m["flips"]))
        oscs.append(int(m["oscillations"]))
    # deltas: +1 +1 -1 0 +1 +1 -1 +1 -> flips at every nonzero delta, oscillations where the sign reverses
    assert flips == [1, 1, 1, 0, 1, 1, 1, 1]
    assert oscs == [0, 0, 1, 0, 1, 0, 1, 1]
    freq = 0.0
    for o in oscs:
        freq = 0.5 * freq + 0.5 * o
    assert float(tr.freq[0].item()) == pytest.approx(freq)


def test_fused_oscillation_tracker_equals_the_eager_one_bit_for_bit():
    from qat_sadam import calibrate, prepare_qat

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.Conv2d(8, 8, 1),
        torch.nn.Conv2d(8, 8, 3, groups=8),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 5),
    )
    qat = prepare_qat(model, {"bits": 3, "first_last_bits": None})
    calibrate(qat, [torch.randn(2, 3, 8, 8)])
    trackers = {fused: OscillationTracker(qat) for fused in (True, False)}
    weights = [w for w, _ in trackers[True].tracked]
    assert len(weights) == 4
    oscillations = 0
    for _ in range(12):
        with torch.no_grad():
            for w in weights:
                w.add_(torch.randn_like(w), alpha=0.3 * w.abs().mean().item())
        out = {}
        for fused, tr in trackers.items():
            use_fused_kernels(fused)
            out[fused] = {k: v.item() for k, v in tr.update().items()}
        assert out[True] == out[False]
        oscillations += out[True]["oscillations"]
    assert oscillations > 100
    for key, state in trackers[True].state_dict().items():
        assert all(torch.equal(a, b) for a, b in zip(state, trackers[False].state_dict()[key])), key


BAD = [
    (["train", "nope.yaml"], "recipe file not found: nope.yaml"),
    (["train", "quickstart", "--set", "data.batchsize=3"], "unknown recipe key 'data.batchsize'"),
    (["train", "quickstart", "--set", "epochs=ten"], "recipe key 'epochs' must be an integer"),
    (["train", "quickstart", "--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["train", "quickstart", "--bits", "9"], "--bits 9: weights take 2 to 8 bits, got 9"),
    (["train", "quickstart", "--bits", "1"], "--bits 1: weights take 2 to 8 bits, got 1"),
    (["train", "quickstart", "--bits", "W9A8"], "--bits W9A8: weights take 2 to 8 bits, got 9"),
    (["train", "quickstart", "--bits", "W4A12"], "--bits W4A12: activations take 2 to 8 bits or 16, got 12"),
    (["train", "quickstart", "--bits", "4bit"], "--bits takes a bit width (4: W4A4) or weight and activation bits"),
    (["train", "quickstart", "--set", "optimizer.lr=-1"], "Invalid learning rate"),
    (
        ["train", "quickstart", "--set", "data.name=imagenet"],
        "recipe key 'data.name' must be one of synthetic, digits, shapes, cifar10, cifar100, tinyimagenet, "
        "got 'imagenet'",
    ),
    (
        ["train", "quickstart", "--set", "data.name=cifar100", "--set", "data.root=/nonexistent"],
        "cifar100: not found under /nonexistent",
    ),
    (["compare", "quickstart", "--optimizers", "adamw,rmsprop"], "unknown optimizer 'rmsprop'"),
    (["compare", "quickstart", "--optimizers", "sadam,adamw-effective@of=adamw"], "'of' must name an S-Adam cell"),
    (["compare", "quickstart", "--optimizers", "sadam@lr=fast"], "'optimizer.lr' must be a number, got 'fast'"),
    (["eval", "/nonexistent/run"], "no such run directory or checkpoint"),
    (["validate", "/nonexistent.onnx"], "model not found"),
]


def test_a_cell_setting_reads_numbers_as_set_does():
    # YAML reads 5e-3 (no dot) as text; a cell's lr must not become the string '5e-3'
    assert parse_cell("sadam@lr=5e-3@k=8")[2] == {"name": "sadam", "lgi": "residual", "lr": 0.005, "k": 8}
    assert parse_cell("adamw@lr=5e-4@epochs=3")[4] == ["epochs=3"]
    # and the cell's recipe keeps it a number (JSON would write 5e-05, which YAML reads as text)
    assert _recipe("quickstart", [], None, parse_cell("adamw@lr=5e-5")[2], 0).optimizer["lr"] == 5e-5


def test_a_recipe_file_with_lr_as_text_gets_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\noptimizer: {name: adamw, lr: 5e-4}\n")
    with pytest.raises(RecipeError, match=r"'optimizer.lr' must be a number, got '5e-4' \(YAML reads 5e-4 as text"):
        load_recipe(str(recipe))


def test_a_key_given_twice_in_a_recipe_file_is_refused_not_the_last_one_taken(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(open(configs.resolve("recipe", "quickstart")).read() + "\noptimizer: {name: adamw, lr: 50.0}\n")
    with pytest.raises(RecipeError, match=r"r.yaml: not valid YAML \(key 'optimizer' given twice"):
        load_recipe(str(recipe))


@pytest.mark.parametrize("argv,msg", BAD)
def test_user_errors_exit_2_with_one_line(argv, msg, capsys, tmp_path):
    code = main(argv + (["--out", str(tmp_path / "run")] if argv[0] in ("train", "compare") else []))
    err = capsys.readouterr().err
    assert code == 2
    assert msg in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_platform_that_cannot_build_the_fused_kernels_gets_one_line_and_the_eager_switch(
    tmp_path, capsys, monkeypatch
):
    def no_compiler(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(None, RuntimeError("Compiler: cc is not found.\nmore"), None)

    monkeypatch.setattr(fake_quant._fused_values, "kernel", no_compiler)
    argv = [
        "train",
        "quickstart",
        "--bits",
        "4",
        *(a for kv in TINY + ["epochs=1"] for a in ("--set", kv)),
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "set fake_quant_kernels: eager" in err and "cc is not found" in err and err.count("\n") == 1
    assert (
        main(argv + ["--set", "fake_quant_kernels=eager", "--force", "--quiet"]) == 0
    )  # the eager kernels need no compiler
    monkeypatch.setenv(
        "CXX", "no-such-compiler"
    )  # auto: no compiler found, so the eager kernels run, and the log says so
    assert main(argv + ["--set", "fake_quant_kernels=auto", "--force", "--quiet"]) == 0
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any(x["type"] == "kernels" and x["fake_quant"] == "eager" for x in recs)


_PAGE_FAULTS = """
import resource, sys, torch
from qat_sadam.train.host_memory import set_host_memory
mode, faults = set_host_memory(sys.argv[1]), []
w = torch.ones(64, 1, 1, requires_grad=True)
x = torch.randn(16, 64, 96, 96)  # 36 MiB, above glibc's largest mmap threshold (32 MiB)
for _ in range(12):  # a training step's pattern: activations and gradients allocated, then all freed
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.batch_norm((x * w).relu(), None, None, training=True).square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(mode, *faults)
"""


def test_heap_host_memory_reuses_the_pages_a_training_step_freed():
    out = {}
    for mode in ("system", "heap"):  # each in a fresh process: mallopt settings are process-wide
        r = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        got, *faults = r.stdout.split()
        assert got == mode
        out[mode] = [int(f) for f in faults]
    system, heap = out["system"], out["heap"]
    assert min(system) > 0.5 * system[0]  # glibc maps every large buffer afresh: its pages fault in every step
    # heap: the first step faults its pages in; then glibc's bins settle (how fast varies with the
    # layout) and from the fifth step on a step faults none, or now and then a block's worth (<= 5% seen)
    assert heap[0] > 0.5 * system[0] and statistics.mean(heap[4:]) < 0.15 * system[0]


def test_heap_host_memory_without_glibc_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)

    def train(mode):
        sets = (a for kv in TINY + ["epochs=1", f"host_memory={mode}"] for a in ("--set", kv))
        return main(["train", "quickstart", *sets, "--out", str(tmp_path / mode), "--quiet"])

    assert train("heap") == 2
    err = capsys.readouterr().err
    assert "host_memory: heap needs glibc" in err and err.count("\n") == 1
    assert train("auto") == 0
    recs = [json.loads(line) for line in open(tmp_path / "auto" / "metrics.jsonl")]
    assert recs[0]["host_memory"] == "system"  # auto falls back where it cannot, and the log says so


def test_cli_train_refuses_existing_dir_without_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["train", "quickstart", "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["train", "quickstart", "--out", str(out), "--force"]) == 2
    assert "does not look like a qat-sadam run directory" in capsys.readouterr().err
    assert (out / "keep.txt").exists()


def test_compare_writes_tables_and_plots(tmp_path):
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
    assert (
        main(
            [
                "compare",
                str(recipe),
                "--optimizers",
                "adamw,sadam-reference@k=2,adamw-effective,sadam,adamw-effective@of=sadam",
                "--seeds",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    md = (out / "results.md").read_text()
    assert "| adamw |" in md and "| sadam-reference@k=2 |" in md and "| adamw-effective |" in md
    rows = list(__import__("csv").DictReader(open(out / "results.csv")))
    assert [r["seeds"] for r in rows] == ["2"] * 5
    ref_damping = float(rows[1]["mean_damping_mean"])
    assert 0 < ref_damping < 1
    eff = json.load(open(out / "adamw-effective" / "seed0" / "summary.json"))
    ref = json.load(open(out / "sadam-reference_k2" / "seed0" / "summary.json"))
    assert eff["lr"] == pytest.approx(1e-3 * ref["mean_damping"])
    eff_res = json.load(open(out / "adamw-effective_ofsadam" / "seed1" / "summary.json"))
    res = json.load(open(out / "sadam" / "seed1" / "summary.json"))
    assert eff_res["lr"] == pytest.approx(1e-3 * res["mean_damping"]) and res["mean_damping"] != ref["mean_damping"]
    assert os.path.getsize(out / "curves.png") > 10_000
    # --report-only tabulates what finished (2 of 3 seeds) and trains nothing
    assert (
        main(
            ["compare", str(recipe), "--optimizers", "adamw,sadam", "--seeds", "3", "--out", str(out), "--report-only"]
        )
        == 0
    )
    rows = list(__import__("csv").DictReader(open(out / "results.csv")))
    assert [(r["optimizer"], r["seeds"]) for r in rows] == [("adamw", "2"), ("sadam", "2")]
    assert not (out / "adamw" / "seed2").exists()
    # ... and with --export exports the finished runs that have no ORT accuracy yet
    assert (
        main(
            [
                "compare",
                str(recipe),
                "--optimizers",
                "adamw",
                "--seeds",
                "1",
                "--out",
                str(out),
                "--report-only",
                "--export",
                "cpu-x86",
            ]
        )
        == 0
    )
    s = json.load(open(out / "adamw" / "seed0" / "summary.json"))
    assert s["ort_agreement"] >= 0.995 and s["ort_acc"] == pytest.approx(s["integer_acc"], abs=0.005)
    assert "test acc (ORT INT8)" in (out / "results.md").read_text()
    # a column that only some seeds have says so
    assert (
        main(["compare", str(recipe), "--optimizers", "adamw", "--seeds", "2", "--out", str(out), "--report-only"]) == 0
    )
    assert "(1 of 2 seeds)" in (out / "results.md").read_text()


def test_help_and_eval(tmp_path, capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(c in usage for c in ("train", "eval", "compare", "export", "validate"))
    for cmd in ("train", "eval", "compare", "export", "validate"):
        assert main([cmd, "--help"]) == 0
    capsys.readouterr()
    r = tiny_recipe("epochs=1")
    Trainer(r, str(tmp_path / "run"), progress=False).train()
    assert main(["eval", str(tmp_path / "run")]) == 0
    out = json.loads(capsys.readouterr().out)
    best = json.loads((tmp_path / "run" / "summary.json").read_text())["best_acc"]
    assert out["test_acc"] == pytest.approx(best) and out["checkpoint"].endswith("best.pt")


def test_a_train_run_writes_curves_and_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sets = [x for t in TINY for x in ("--set", t)]
    assert (
        main(
            [
                "train",
                "quickstart",
                "--bits",
                "4",
                "--out",
                str(tmp_path / "run"),
                "--quiet",
                *sets,
                "--set",
                "epochs=2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        f"curves: {tmp_path / 'run' / 'curves.png'}" in out
        and (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    )
    ev = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    tags = ev.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/rho", "train/damping", "train/osc_freq_mean", "eval/test_acc"} <= set(tags)
    assert any(t.startswith("scale/activation/") for t in tags) and any(t.startswith("scale/weight/") for t in tags)
    steps = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"step"' in line]
    logged = [e.value for e in ev.Scalars("train/loss")]
    assert logged == pytest.approx([s["loss"] for s in steps if s["type"] == "step"])
    assert [e.step for e in ev.Scalars("eval/test_acc")] == [1, 2]
    assert any("recipe" in t for t in ev.Tags()["tensors"])
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["curves"].endswith("curves.png")


def test_tensorboard_required_but_absent_is_a_recipe_error(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    t = Trainer(tiny_recipe("epochs=1", "logging.tensorboard=true"), str(tmp_path / "a"), progress=False)
    with pytest.raises(RecipeError, match="logging.tensorboard: true, but the tensorboard package is not installed"):
        t.train()
    Trainer(tiny_recipe("epochs=1"), str(tmp_path / "b"), progress=False).train()  # auto: one line, no error
    assert "TensorBoard logging is off" in capsys.readouterr().err and not (tmp_path / "b" / "tensorboard").exists()


def test_compiled_training_follows_the_eager_trajectory(tmp_path, monkeypatch):
    """compile: true traces the prepared model (fake-quant modules, LSQPerTensor, S-Adam's no-grad
    probes) with dynamo and AOTAutograd. The aot_eager backend keeps make test fast; inductor's
    code generation is measured by tools/benchmarks/bench_training_cost.py, not here (minutes of compiling)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: compile_(m, backend="aot_eager"))
    losses = {}
    for compiled in (False, True):
        run = tmp_path / str(compiled)
        t = Trainer(
            tiny_recipe("max_steps=4", "optimizer.probe_every=2", f"compile={str(compiled).lower()}"),
            str(run),
            progress=False,
        )
        assert (t.net is not t.model) == compiled
        t.train()
        losses[compiled] = [
            json.loads(line)["loss"] for line in open(run / "metrics.jsonl") if '"type": "step"' in line
        ]
    assert len(losses[True]) == 4 and losses[True] == losses[False]
