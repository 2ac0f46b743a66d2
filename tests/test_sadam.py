import copy
import math

import pytest
import torch
from torch import nn

from qat_sadam import ProxSGD, SAdam, prepare_qat, sadam_param_groups
from qat_sadam.models import build_model


def _net(dropout=0.0, bn=False):
    torch.manual_seed(1)
    layers = (
        [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)]
    )
    return nn.Sequential(*layers)


def _data(n=32):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _closure(model, opt, x, y, set_to_none=True, record=None):
    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        loss = nn.functional.cross_entropy(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        if record is not None:
            record.append(loss.detach().clone())
        return loss

    return closure


def _train(model, opt, steps=20, **kw):
    x, y = _data()
    for _ in range(steps):
        opt.step(_closure(model, opt, x, y, **kw))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _reference_by_hand(model, steps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=1e-2, k=2, sigma=0.01, lam=2.0):
    """Section 2 of docs/studies/sadam.md, line by line."""
    x, y = _data()
    x = x.double()
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    rhos = []
    for t in range(1, steps + 1):
        for p in params:
            p.grad = None
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        loss0 = float(loss.detach())
        d = []
        with torch.no_grad():
            for _ in range(k):
                us = []
                for p in params:
                    u = torch.randn_like(p)
                    u = u / (u.norm() + 1e-12)
                    p += sigma * u
                    us.append(u)
                li = float(nn.functional.cross_entropy(model(x), y))
                d.append((li - loss0) / sigma)
                for p, u in zip(params, us):
                    p -= sigma * u
            dt = torch.tensor(d, dtype=torch.float64)
            rho = (dt.var(unbiased=True) / ((dt**2).mean() + 1e-6)).item() if k > 1 else 0.0
            rhos.append(rho)
            damping = math.exp(-lam * min(rho, 10))
            for i, p in enumerate(params):
                g = p.grad
                p *= 1 - lr * wd
                m[i] = betas[0] * m[i] + (1 - betas[0]) * g
                v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
                p -= damping * lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t) * m[i] / (v[i].sqrt() + eps)
    return torch.cat([p.detach().flatten() for p in params]), rhos


@pytest.mark.parametrize("k", [2, 8])
def test_reference_mode_reproduces_published_algorithm(k):
    # float64: rho amplifies float noise (finite differences / sigma), and two independent
    # implementations that order float ops differently would drift apart in float32.
    hand, hand_rhos = _reference_by_hand(_net().double(), 20, k=k)  # _net() seeds the global generator
    model = _net().double()
    opt = SAdam(model.parameters(), lgi="reference", k=k)
    x, y = _data()
    x = x.double()
    rhos = []
    for _ in range(20):
        opt.step(_closure(model, opt, x, y))
        rhos.append(opt.rho[0])
    ours = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(ours, hand, rtol=0, atol=1e-6)
    assert rhos == pytest.approx(hand_rhos, rel=1e-6, abs=1e-9)
    assert all(r <= k / (k - 1) + 1e-9 for r in rhos)  # the flaw: the clip at 10 never acts


@pytest.mark.parametrize("foreach", [False, True])
def test_residual_lam0_is_adamw_bit_for_bit(foreach):
    a, b = _net(dropout=0.2), _net(dropout=0.2)
    torch.manual_seed(3)
    pa = _train(a, torch.optim.AdamW(a.parameters(), lr=1e-2, foreach=foreach))
    torch.manual_seed(3)
    pb = _train(b, SAdam(b.parameters(), lr=1e-2, lam=0.0, foreach=foreach))
    assert torch.equal(pa, pb)


def test_reference_lam0_is_adamw_up_to_eps_placement():
    # The published update puts eps outside the bias correction: m / (sqrt(v) + eps) * sqrt(bc2),
    # torch uses m / (sqrt(v) / sqrt(bc2) + eps). Same trajectory to float tolerance, not bit for bit.
    # Where a gradient is near eps the two placements differ, so the model is a smooth linear one.
    a, b = nn.Linear(6, 3), nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    x, y = _data()
    target = torch.randn(32, 3, generator=torch.Generator().manual_seed(4)) * 5
    for m, opt in (
        (a, torch.optim.AdamW(a.parameters(), lr=1e-2)),
        (b, SAdam(b.parameters(), lr=1e-2, lam=0.0, lgi="reference")),
    ):
        for _ in range(20):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), target).backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6)
    assert not torch.equal(a.weight, b.weight)


def _rho(f, x0, steps=1, **kw):
    x = nn.Parameter(x0.clone())
    every_step = {"probe_every": 1, "rho_ema": 0.0} if kw.get("lgi", "residual") == "residual" else {}
    opt = SAdam([x], lr=0.0, weight_decay=0.0, **every_step, **kw)

    def closure():
        opt.zero_grad()
        loss = f(x)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return opt.rho[0]


_N = 256
_A = torch.rand(_N, generator=torch.Generator().manual_seed(0)) + 0.5
_X0 = torch.randn(_N, generator=torch.Generator().manual_seed(1))


def _quadratic(x):
    return (_A * x * x).sum()


def test_reference_rho_is_about_one_on_a_smooth_quadratic():
    rhos = [_rho(_quadratic, _X0, lgi="reference", k=8) for _ in range(10)]
    assert 0.7 < sum(rhos) / len(rhos) <= 8 / 7
    # ... and falls towards zero at a kink, the reverse of its purpose
    assert _rho(lambda x: x.abs().sum(), torch.zeros(_N), lgi="reference", k=8) < 0.05


def test_residual_rho_small_on_smooth_large_at_kink():
    assert _rho(_quadratic, _X0, k=4, probe_radius=0.01) < 0.05
    near_kink = 1e-4 * _X0  # the probe ball (radius 0.01) contains the kink of every |x_j|
    assert _rho(lambda x: x.abs().sum(), near_kink, k=4, probe_radius=0.01) > 0.5


def test_residual_rho_responds_to_radius_on_a_quantized_quadratic():
    step = 0.1

    def quantized(x):  # step function with a straight-through gradient
        q = torch.fake_quantize_per_tensor_affine(x, step, 0, -128, 127)
        return ((q - 0.3) ** 2).sum()

    x0 = 0.5 * _X0
    tiny = _rho(quantized, x0, k=4, probe_radius=1e-4 * step)  # never crosses a bin edge: sees nothing
    half = _rho(quantized, x0, k=4, probe_radius=0.5 * step)
    one = _rho(quantized, x0, k=4, probe_radius=1.0 * step)
    assert tiny > 0.9
    assert one < half < 0.1


def test_probes_leave_batchnorm_statistics_as_the_gradient_pass_left_them():
    model = _net(bn=True)
    ref = copy.deepcopy(model)
    x, y = _data()
    opt = SAdam(model.parameters(), lr=0.0, weight_decay=0.0, probe_every=1, k=3, probe_buffers=model.buffers())
    opt.step(_closure(model, opt, x, y))
    nn.functional.cross_entropy(ref(x), y).backward()  # the gradient pass alone
    for a, b in zip(model.buffers(), ref.buffers()):
        assert torch.equal(a, b)


def test_probes_see_the_gradient_pass_dropout_masks():
    model = _net(dropout=0.5)
    x, y = _data()
    losses = []
    opt = SAdam(model.parameters(), probe_every=1, k=2, probe_radius=0.0)
    torch.manual_seed(7)
    opt.step(_closure(model, opt, x, y, record=losses))
    assert len(losses) == 5
    assert all(torch.equal(loss, losses[0]) for loss in losses[1:])
    # and training's own random stream continues as if no probe had run
    after = torch.rand(3)
    torch.manual_seed(7)
    nn.functional.cross_entropy(model(x), y)
    assert torch.equal(torch.rand(3), after)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_closure_zeroing_grads_does_not_lose_the_gradient(set_to_none):
    a, b = _net(), _net()
    # probe_radius=0: probes change nothing, rho=0 -> damping 1: the update must be AdamW's.
    pa = _train(a, torch.optim.AdamW(a.parameters()), steps=3)
    pb = _train(b, SAdam(b.parameters(), probe_every=1, probe_radius=0.0), steps=3, set_to_none=set_to_none)
    assert torch.equal(pa, pb)


def test_state_dict_resumes_bit_exactly():
    def make():
        m = _net(dropout=0.1)
        return m, SAdam(m.parameters(), lr=1e-2, probe_every=2, k=2, seed=11)

    x, y = _data()
    m1, o1 = make()
    torch.manual_seed(0)
    for _ in range(10):
        o1.step(_closure(m1, o1, x, y))
    m2, o2 = make()
    torch.manual_seed(0)
    for _ in range(5):
        o2.step(_closure(m2, o2, x, y))
    saved = copy.deepcopy((m2.state_dict(), o2.state_dict(), torch.get_rng_state()))
    m3, o3 = make()
    m3.load_state_dict(saved[0])
    o3.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    for _ in range(5):
        o3.step(_closure(m3, o3, x, y))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))
    assert o1.rho == o3.rho and o1.rho[0] > 0


def test_lr_scheduler_and_missing_closure():
    m = _net()
    opt = SAdam(m.parameters(), lr=1e-2, probe_every=2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    x, y = _data()
    opt.step(_closure(m, opt, x, y))
    sched.step()
    assert opt.param_groups[0]["lr"] < 1e-2
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()  # step 1 is not a probe step: no closure needed
    with pytest.raises(RuntimeError, match="needs a closure on probe steps"):
        opt.step()


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"lr": -1}, "Invalid learning rate"),
        ({"k": 0}, "Invalid number of probe"),
        ({"lgi": "magic"}, "lgi must be"),
        ({"lam": -1}, "Invalid lam"),
        ({"lgi": "reference", "probe_every": 4}, "probe_every applies to lgi='residual' only"),
        ({"sigma": 0.01}, "sigma applies to lgi='reference' only"),
        ({"lgi": "reference", "probe_radius": 0.01}, "probe_radius applies to lgi='residual' only"),
        ({"lgi": "reference", "probe_scale": 0.01}, "probe_scale applies to lgi='residual' only"),
        ({"stabilize_eps": 1e-6}, "stabilize_eps applies to lgi='reference' only"),
        ({"probe_radius": 0.1, "probe_scale": 0.1}, "not both"),
        ({"probe_scale": 0.0}, "Invalid probe_scale"),
        ({"lgi": "reference", "sigma": -1.0}, "Invalid sigma"),
    ],
)
def test_invalid_hyperparameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SAdam(_net().parameters(), **kw)


def test_a_group_option_of_the_other_estimator_is_refused():
    net = _net()
    with pytest.raises(ValueError, match="param group: sigma applies to lgi='reference' only"):
        SAdam([{"params": net[0].parameters(), "sigma": 0.1}, {"params": net[-1].parameters()}])


def test_probe_radius_is_absolute_and_probe_scale_relative_to_rms():
    # The new user's trial of the old API: sum|x| near its kink. An absolute radius of 0.01 contains
    # every kink (rho high); 0.01 x RMS(x) = 1e-6 does not (rho near 0).
    near_kink = 1e-4 * _X0
    absolute = _rho(lambda x: x.abs().sum(), near_kink, k=4, probe_radius=0.01)
    relative = _rho(lambda x: x.abs().sum(), near_kink, k=4, probe_scale=0.01)
    scaled_up = _rho(lambda x: x.abs().sum(), near_kink, k=4, probe_scale=100.0)  # 100 x RMS = 0.01 again, about
    assert absolute > 0.5 and relative < 0.05 and scaled_up > 0.5


def test_param_groups_radius_follows_quantization_step():
    qat = prepare_qat(build_model("small_cnn", 10, in_channels=1), {"bits": 4})
    groups = sadam_param_groups(qat, radius_multiple=0.5)
    assert [(g["name"], g.get("lam")) for g in groups] == [("weights", None), ("other", 0.0), ("quant_scales", 0.0)]
    conv = qat.get_submodule("body.0")
    r = groups[0]["probe_radius"](conv.weight)
    assert r.shape == (conv.out_channels, 1, 1, 1)
    torch.testing.assert_close(r.flatten(), 0.5 * conv.weight_quant.scale.detach())
    opt = SAdam(groups, probe_buffers=qat.buffers())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    opt.step(_closure(qat, opt, x, y))
    assert opt.rho[0] > 0 and opt.rho[1:] == [0.0, 0.0]  # only the weights probe (lam 0 elsewhere)
    assert opt.param_groups[0]["damping"] == pytest.approx(math.exp(-opt.param_groups[0]["lam"] * opt.rho[0]))


def test_prox_sgd_matches_hand_computation():
    p = nn.Parameter(torch.tensor([1.0, -0.5, 0.00001]))
    opt = ProxSGD([p], lr=0.1, momentum=0.9, l1=1e-3)
    g = torch.tensor([0.5, -0.2, 0.0])
    expected, buf = p.detach().clone(), torch.zeros(3)
    for _ in range(3):
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        expected = expected - 0.1 * buf
        expected = expected.sign() * (expected.abs() - 1e-4).clamp_min(0)
    torch.testing.assert_close(p.detach(), expected)
    assert p[2].item() == 0.0


def _two_groups(**kw):
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(-torch.ones(4))  # same shape: equal-looking groups
    opt = SAdam([{"params": [a]}, {"params": [b]}], lr=0.01, lgi="residual", probe_every=1, k=2, **kw)

    def closure():
        opt.zero_grad()
        loss = (a.abs() + (b - 0.3).round().pow(2)).sum()
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    return opt, closure


def test_rho_is_an_ema_of_probes_and_a_non_finite_probe_keeps_the_last_value(monkeypatch):
    opt, closure = _two_groups(rho_ema=0.9)
    raw = iter([1.0, 0.5, 0.0, 0.5, float("nan"), float("nan"), 0.0, 0.5])  # group 0, group 1, per step
    monkeypatch.setattr(SAdam, "_residual_rho", lambda self, *a: next(raw))
    seen = []
    for _ in range(4):
        opt.step(closure)
        seen += list(opt.rho)
    # first probe taken as is, then rho = 0.9 rho + 0.1 raw; the NaN probe (step 3) changes nothing
    assert seen == pytest.approx([1.0, 0.5, 0.9, 0.5, 0.9, 0.5, 0.81, 0.5])
    assert opt.param_groups[0]["probes"] == 3  # the NaN probe is not counted
    assert all(math.isfinite(v) for v in opt.param_groups[0]["params"][0].detach())


def test_probe_directions_are_drawn_anew_each_step_and_group(monkeypatch):
    import qat_sadam.optim.sadam as sadam_module

    seeds = []
    real = sadam_module._mix
    monkeypatch.setattr(sadam_module, "_mix", lambda *a: seeds.append(real(*a)) or seeds[-1])
    opt, closure = _two_groups()
    for _ in range(3):
        opt.step(closure)
    assert len(seeds) == 6 and len(set(seeds)) == 6  # 3 steps x 2 groups, no direction reused


def test_two_groups_with_equal_looking_parameters_both_probe():
    opt, closure = _two_groups()
    for _ in range(2):
        opt.step(closure)
    assert [g["probes"] for g in opt.param_groups] == [2, 2]
    assert opt.rho[0] != opt.rho[1]  # |a| and round(b - 0.3)^2: each group its own estimate


def test_loss_closure_is_the_closure_sadam_expects():
    """qat_sadam.optim.loss_closure (what the tools use) gives the trajectory of the hand-written
    closure, probes included: backward only outside S-Adam's no-grad probes."""
    from qat_sadam.optim import loss_closure

    x, y = _data()
    nets = [_net(), _net()]
    opts = [SAdam(n.parameters(), lr=1e-2, lam=1.0, probe_every=1, seed=0) for n in nets]
    for _ in range(5):
        opts[0].step(_closure(nets[0], opts[0], x, y))
        opts[1].step(loss_closure(opts[1], lambda: nn.functional.cross_entropy(nets[1](x), y)))
    assert opts[1].rho[0] > 0
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
