"""Properties of what users rely on, each checked against a reference computed another way: the
BatchNorm fold against the BN formula, the per-channel MSE range search against each channel searched
alone, the mixed-precision proposal against an exhaustive choice, the validation split against the
training split it is carved from. Each kills a one-line mutant the rest of the suite let through
(issue 52: sqrt(var) without eps, the error averaged over the whole tensor, the candidates sorted the
wrong way, a validation split overlapping the training images)."""

import itertools

import numpy as np
import torch
from torch import nn

from qat_sadam.export.freeze import _folded
from qat_sadam.quant import FakeQuantize, QATConfig, calibrate, prepare_qat
from qat_sadam.quant.config import default_weight_spec
from qat_sadam.quant.modules import QuantConv2d
from qat_sadam.train.data import load_data
from qat_sadam.train.recipe import DataSection
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
