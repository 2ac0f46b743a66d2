"""Properties of what users rely on, each checked against a reference computed another way: the
BatchNorm fold against the BN formula, the per-channel MSE range search against each channel searched
alone, the mixed-precision proposal against an exhaustive choice, the validation split against the
training split it is carved from. Each kills a one-line mutant the rest of the suite let through
(issue 52: sqrt(var) without eps, the error averaged over the whole tensor, the candidates sorted the
wrong way, a validation split overlapping the training images)."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from qat_sadam.errors import CheckpointError
from qat_sadam.export.freeze import _folded
from qat_sadam.export.runtimes import lsb_stats
from qat_sadam.optim.groups import QuantStepRadius
from qat_sadam.quant import FakeQuantize, QATConfig, QuantSpec, calibrate, prepare_qat
from qat_sadam.quant.config import default_weight_spec
from qat_sadam.quant.fake_quant import integer_codes
from qat_sadam.quant.modules import QuantConv2d
from qat_sadam.train.checkpoint import load_checkpoint
from qat_sadam.train.data import load_data
from qat_sadam.train.oscillation import _advance
from qat_sadam.train.recipe import DataSection
from qat_sadam.train.trainer import _lr_lambda
from qat_sadam.workflows.sensitivity import propose


def test_the_fold_follows_the_batchnorm_formula_for_tiny_and_zero_variances():
    """Trained depthwise MobileNets hold channels with a near-zero running variance: there eps decides."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        net[1].running_var.copy_(torch.tensor([0.0, 1e-8, 1e-3, 2.0]))
        net[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        net[1].weight.copy_(torch.tensor([1.5, -0.5, 2.0, 1.0]))
        net[1].bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.4]))
    qat = prepare_qat(net, QATConfig.from_dict({"bits": 8}))
    calibrate(qat, [torch.randn(8, 3, 8, 8)])
    conv = next(m for m in qat.modules() if isinstance(m, QuantConv2d))
    bn = next(m for m in qat.modules() if isinstance(m, nn.BatchNorm2d))
    w_int, scale, bias = _folded(conv, bn)
    a = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # the formula, written out
    q_weight = conv.weight_quant(conv.weight).detach()
    expected_w = q_weight * a.view(-1, 1, 1, 1)
    expected_b = (conv.bias.detach() - bn.running_mean) * a + bn.bias.detach()
    torch.testing.assert_close(w_int.float() * scale.view(-1, 1, 1, 1), expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias, expected_b, rtol=1e-5, atol=1e-6)


def test_the_per_channel_mse_search_picks_each_channel_its_own_clipping():
    """Searched per channel over the whole tensor = each channel searched alone (brute force)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 256, generator=gen)
    # channel 0 Gaussian: clipping its tails pays
    w[1] = torch.linspace(-1, 1, 256)  # uniform: no clipping pays
    w[2] *= 0.01
    spec = default_weight_spec(4)
    together = FakeQuantize(spec, "weight", channels=3)
    lo, hi = together._range(w)
    for c in range(3):
        alone = FakeQuantize(spec, "weight", channels=1)
        lo_c, hi_c = alone._range(w[c : c + 1])
        torch.testing.assert_close(hi[c : c + 1], hi_c)
        torch.testing.assert_close(lo[c : c + 1], lo_c)
    factor = hi / w.abs().amax(dim=1)
    assert factor[0] < 0.9 < factor[1]  # the channels really want different clipping


def test_the_mixed_precision_proposal_is_the_best_choice_within_the_budget():
    gains = [0.004, 0.05, 0.01, 0.03, -0.01, 0.02]
    rows = [{"layer": f"l{i}", "weights": 100, "gain": g} for i, g in enumerate(gains)]
    low, budget = 4, 1.34  # room for two of the six layers at 8 bits: 600*4*1.34 >= 2400 + 2*400
    chosen = {o["pattern"] for o in propose(rows, low, budget)}
    base = sum(r["weights"] * low for r in rows)

    def fits(subset):
        return base + sum(r["weights"] * (8 - low) for r in subset) <= budget * base

    best = max(
        (s for n in range(len(rows) + 1) for s in itertools.combinations(rows, n) if fits(s)),
        key=lambda s: sum(r["gain"] for r in s),
    )
    assert chosen == {r["layer"] for r in best} == {"l1", "l3"}


def _rows(x: torch.Tensor) -> list[bytes]:
    return sorted(bytes(img.numpy().tobytes()) for img in x)


def test_the_validation_split_is_disjoint_from_training_and_the_same_every_run():
    full = load_data(DataSection(name="digits"))
    carved = load_data(DataSection(name="digits", val_split=0.2, eval_on="val"))
    again = load_data(DataSection(name="digits", val_split=0.2, eval_on="val"))
    n = len(full.train.y)
    assert len(carved.test.y) == round(0.2 * n) and len(carved.train.y) + len(carved.test.y) == n
    # training and validation images together are the training set, each image once
    assert _rows(torch.cat([carved.train.x, carved.test.x])) == _rows(full.train.x)
    assert torch.equal(carved.test.x, again.test.x) and torch.equal(carved.train.y, again.train.y)
    assert np.array_equal(carved.test.y.numpy(), again.test.y.numpy())


def test_integer_codes_round_half_to_even_like_torchs_quantizer():
    """The codes the oscillation tracker and the integer view count: clamp(round_half_even(x / s) + zp),
    what torch.quantize_per_tensor (and ONNX's QuantizeLinear) compute, negatives and ties included."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1000, generator=g) * 3, torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]) * 0.1])
    for scale, zp in ((0.1, 0), (0.037, 128)):
        want = torch.quantize_per_tensor(x, scale, zp, torch.quint8).int_repr().to(torch.int32)
        assert torch.equal(integer_codes(x, torch.tensor(scale), torch.tensor(zp), 0, 255), want)


def test_an_observer_scale_moves_by_its_momentum_towards_each_batch():
    """scale_mode observer: the first batch sets the scale, each later one moves it by observer_momentum
    of the way to that batch's own estimate (1.0 would jump to it: the paper's per-batch scheme)."""
    spec = QuantSpec(bits=8, signed=False, symmetric=False, scale_mode="observer", observer_momentum=0.25)
    q = FakeQuantize(spec, "activation").train()
    q(torch.linspace(0, 2.55, 100))  # range [0, 2.55]: scale 0.01
    first = float(q.scale)
    q(torch.linspace(0, 5.1, 100))  # this batch alone: scale 0.02
    assert first == pytest.approx(0.01) and float(q.scale) == pytest.approx(0.01 + 0.25 * (0.02 - 0.01))


@pytest.mark.parametrize("warmup", [0, 10])
def test_the_cosine_schedule_runs_from_the_lr_to_its_floor_after_a_linear_warmup(warmup):
    """lr multiplier: (step + 1) / warmup over the warm-up (the first step already moves), then a half
    cosine from 1 at step 0 to min_lr_ratio at the last step, and constant after it."""
    f = _lr_lambda(100, warmup, "cosine", 0.1)
    ramp = (lambda s: min(1.0, (s + 1) / warmup)) if warmup else (lambda s: 1.0)
    for step in (0, 4, 50, 99, 100, 150):
        cosine = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(step, 100) / 100))
        assert f(step) == pytest.approx(ramp(step) * cosine)
    assert f(100) == pytest.approx(0.1) and (f(0) == pytest.approx(0.1) if warmup else f(0) == 1.0)
    assert _lr_lambda(100, warmup, "constant", 0.1)(0) == (0.1 if warmup else 1.0)


@pytest.mark.parametrize("tie_lsb", [0.0, 2.0])
def test_a_sample_is_decisive_only_where_the_references_margin_exceeds_the_tie_width(tie_lsb):
    """Top-1 agreement over decisive samples leaves out those whose reference top-2 margin is within
    the comparison's tolerance (at 0: exact ties, whose top-1 is the runtime's coin toss)."""
    ref = np.array([[3.0, 3.0, 0.0], [5.0, 3.0, 0.0], [9.0, 0.0, 0.0]], dtype=np.float32)  # margins 0, 2, 9 LSB
    other = np.array([[2.0, 3.0, 0.0], [3.0, 4.0, 0.0], [9.0, 0.0, 0.0]], dtype=np.float32)  # flips the first two
    s = lsb_stats(ref, other, scale=1.0, tie_lsb=tie_lsb)
    assert s["near_ties"] == (1 if tie_lsb == 0 else 2) and s["top1_agreement"] == pytest.approx(1 / 3)
    assert s["top1_agreement_decisive"] == pytest.approx(1 / 2 if tie_lsb == 0 else 1.0)


def test_the_probe_radius_of_a_weight_without_quantizer_is_probe_scale_times_its_rms():
    model = prepare_qat(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), QATConfig.from_dict({"bits": 4}))
    bn = model.get_submodule("1").weight
    with torch.no_grad():
        bn.copy_(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    radius = QuantStepRadius(model, probe_scale=0.01)(bn)
    assert float(radius) == pytest.approx(0.01 * float(bn.detach().pow(2).mean().sqrt()))


def test_the_oscillation_frequency_is_an_ema_of_reversals_with_the_trackers_momentum():
    """Codes 0, 1, 0, 1, 1: moves up, down (a reversal), up (a reversal), none. The frequency is
    (1 - m) f + m * reversal at every step."""
    m, f, expected = 0.25, 0.0, []
    for reversal in (0, 1, 1, 0):
        f = (1 - m) * f + m * reversal
        expected.append(f)
    prev, last, freq = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int8), torch.zeros(1)
    got = []
    for code in (1, 0, 1, 1):
        prev, last, freq, _ = _advance(
            torch.tensor([float(code)]), torch.tensor(1.0), torch.tensor(0), -8, 7, prev, last, freq, m
        )
        got.append(float(freq))
    assert got == pytest.approx(expected)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": _RunsCodeWhenUnpickled(str(marker)), "recipe": {}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(str(tmp_path / "evil.pt"))
    assert not marker.exists()
