import math

import pytest
import torch

from qat_sadam import QATConfig, QuantSpec, calibrate, prepare_qat
from qat_sadam.models import build_model
from qat_sadam.optim.groups import quantized_weights
from qat_sadam.quant import FakeQuantize, quantizers
from qat_sadam.quant.kernels import use_fused_kernels


def _fq(bits=4, **kw):
    spec = QuantSpec(bits=bits, **{"scale_mode": "frozen", **kw})
    q = FakeQuantize(spec, "activation", channels=kw.get("per_channel") and 3)
    q.scale.data.fill_(0.5)
    q.initialized.fill_(True)
    return q


def test_straight_through_gradient_is_one_inside_zero_outside():
    q = _fq(bits=4)  # signed 4 bit: levels -8..7, scale 0.5 -> range [-4, 3.5]
    x = torch.tensor([-5.0, -3.9, -0.2, 0.0, 1.3, 3.4, 3.9, 10.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0, 0]


def test_rounds_half_to_even_like_quantize_linear():
    q = _fq(bits=8)
    x = torch.tensor([0.25, 0.75, -0.25, 1.25])  # x/s = 0.5, 1.5, -0.5, 2.5
    assert (q(x) / 0.5).tolist() == [0.0, 2.0, -0.0, 2.0]


def test_lsq_scale_gradient_matches_formula():
    spec = QuantSpec(bits=3, scale_mode="lsq")  # levels -4..3
    q = FakeQuantize(spec, "weight")
    q.scale.data.fill_(0.4)
    q.initialized.fill_(True)
    x = torch.tensor([-2.0, -0.5, 0.1, 0.7, 1.9])
    q(x).sum().backward()
    # LSQ: d xq / d s = -x/s + round(x/s) inside, qmin / qmax outside, times g = 1/sqrt(N Qp)
    v = x / 0.4
    inside = (v >= -4) & (v <= 3)
    d = torch.where(inside, torch.round(v) - v, torch.where(v < -4, torch.tensor(-4.0), torch.tensor(3.0)))
    expected = d.sum() / math.sqrt(5 * 3)
    assert q.scale.grad.item() == pytest.approx(expected.item(), rel=1e-5)


def _lsq_with(q, x, dy, fused: bool):
    use_fused_kernels(fused)
    q.scale.grad, x.grad = None, None
    y = q(x)
    y.backward(dy)
    return y.detach(), x.grad.clone(), q.scale.grad.clone()


@pytest.mark.parametrize("bits,signed,zero_point", [(4, False, 0), (4, False, 3), (8, False, 17), (3, True, 0)])
def test_per_tensor_lsq_equals_torchs_learnable_op(bits, signed, zero_point):
    """LSQPerTensor (eager) and FusedLSQPerTensor (inductor) against torch's native learnable op:
    values and x gradient bit for bit; the two kernels' scale gradients bit for bit with each other."""
    q = FakeQuantize(QuantSpec(bits=bits, signed=signed, symmetric=False, scale_mode="lsq"), "activation")
    q.scale.data.fill_(0.07)
    q.zero_point.fill_(zero_point)
    q.initialized.fill_(True)
    torch.manual_seed(0)
    x = (torch.randn(16, 8, 12, 12) * 0.6).requires_grad_()
    dy = torch.randn(16, 8, 12, 12)
    eager, fused = _lsq_with(q, x, dy, fused=False), _lsq_with(q, x, dy, fused=True)
    x.grad = None
    scale = q.scale.detach().reshape(1).clone().requires_grad_()
    ref = torch._fake_quantize_learnable_per_tensor_affine(
        x, scale, torch.full((1,), float(zero_point)), q.spec.qmin, q.spec.qmax, q.lsq_grad_factor(x)
    )
    ref.backward(dy)
    for ours, ours_dx, _ in (eager, fused):
        assert torch.equal(ours, ref) and torch.equal(ours_dx, x.grad)
    assert torch.equal(eager[2], fused[2])
    for fused in (False, True):  # the path without autograd (evaluation, probes) gives the same values
        use_fused_kernels(fused)
        with torch.no_grad():
            assert torch.equal(q(x), ref)
    assert 0.0 < (eager[1] == 0).float().mean() < 0.9  # some elements clip, most do not: both branches count
    assert eager[2].item() == pytest.approx(scale.grad.item(), rel=1e-4)


def test_fused_lsq_clips_values_far_outside_the_range_as_the_eager_kernels_do():
    # torch's own op converts x / s to an integer first (it wraps at 1e30), so the reference here is the eager path
    q = FakeQuantize(QuantSpec(bits=4, signed=True, symmetric=False, scale_mode="lsq"), "activation")
    q.init_from(torch.linspace(-1, 1, 50))
    x = torch.tensor([float("inf"), -float("inf"), 1e30, -1e30, 5e8, 0.3, -0.2], requires_grad=True)
    dy = torch.arange(1.0, 8.0)
    eager, fused = _lsq_with(q, x, dy, fused=False), _lsq_with(q, x, dy, fused=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, fused))
    lo, hi = q.value_range(x)
    assert eager[0][:5].tolist() == [hi.item(), lo.item(), hi.item(), lo.item(), hi.item()]
    assert eager[1].tolist() == [0.0] * 5 + [6.0, 7.0]  # dy inside the range, nothing where clipped


def test_fused_lsq_serves_every_activation_shape_of_a_rank_with_one_build():
    """Batch 1, N == C, odd sizes: no recompile once a rank has been built (dynamo's limit is 8 per
    function, past which it would silently run eager ops)."""
    q = FakeQuantize(QuantSpec(bits=4, signed=False, symmetric=False, scale_mode="lsq"), "activation")
    q.init_from(torch.rand(100))

    def run(*shape):
        x = torch.rand(*shape, requires_grad=True)
        q(x).backward(torch.ones(shape))
        with torch.no_grad():
            y = q(x)
        return y, x.grad

    run(4, 8, 6, 6), run(4, 8)
    for shape in [(1, 8, 6, 6), (8, 8, 6, 6), (3, 16, 1, 1), (5, 2, 7, 3), (1, 8), (9, 9)]:
        torch.manual_seed(1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            fused = run(*shape)
        use_fused_kernels(False)
        torch.manual_seed(1)
        eager = run(*shape)
        use_fused_kernels(True)
        assert fused[0].shape == shape and all(torch.equal(a, b) for a, b in zip(fused, eager)), shape


@pytest.mark.parametrize(
    "shape",
    [(8, 3, 3, 3), (16, 1, 3, 3), (12, 7), (6, 6, 1, 1)],
    ids=["conv", "depthwise", "linear", "1x1 with C == K"],
)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fused_per_channel_lsq_equals_torchs_learnable_op_bit_for_bit(shape, bits):
    """The weight quantizer's fused kernels against torch._fake_quantize_learnable_per_channel_affine:
    values, x gradient and the per-channel scale gradient bit for bit, with values at exact half
    levels (rounded half to even) and values clipped on both sides."""
    q = FakeQuantize(
        QuantSpec(bits=bits, per_channel=True, narrow_range=True, scale_mode="lsq"), "weight", channels=shape[0]
    )
    torch.manual_seed(bits)
    q.scale.data.copy_(torch.rand(shape[0]) * 0.1 + 0.01)
    q.initialized.fill_(True)
    step = q.step_size(torch.empty(shape)).expand(shape).reshape(-1)
    x = torch.randn(shape).reshape(-1) * 0.3
    x[:8] = torch.tensor([0.5, 1.5, -0.5, -2.5, 200.0, -200.0, 0.0, 2.5])[:8] * step[:8]  # halves; clipped
    x = x.reshape(shape).requires_grad_()
    dy = torch.randn(shape)
    fused = _lsq_with(q, x, dy, fused=True)
    x.grad = None
    scale = q.scale.detach().clone().requires_grad_()
    ref = torch._fake_quantize_learnable_per_channel_affine(
        x, scale, torch.zeros(shape[0]), 0, q.spec.qmin, q.spec.qmax, q.lsq_grad_factor(x)
    )
    ref.backward(dy)
    assert torch.equal(fused[0], ref) and torch.equal(fused[1], x.grad) and torch.equal(fused[2], scale.grad)
    with torch.no_grad():
        assert torch.equal(q(x), ref)
    assert 0.0 < (fused[1] == 0).float().mean() < 0.9 or bits == 2  # both branches of the gradient are exercised


def test_fused_per_channel_lsq_builds_few_variants_for_a_whole_network():
    """Every weight of MobileNetV2 (conv, depthwise, 1x1, linear) through the fused per-channel
    kernels, forward, backward and no-grad, without reaching dynamo's recompile limit (8)."""
    torch._dynamo.reset()
    model = prepare_qat(build_model("mobilenet_v2", 10), QATConfig.from_dict({"bits": 4}))
    weights = list(quantized_weights(model).items())
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        for w, fq in weights:
            fq(w).sum().backward()
            with torch.no_grad():
                fq(w)
    assert all(w.grad is not None and fq.scale.grad is not None for w, fq in weights)


def test_per_tensor_lsq_output_may_be_modified_in_place():
    q = FakeQuantize(QuantSpec(bits=4, signed=False, symmetric=False, scale_mode="lsq"), "activation")
    q.init_from(torch.rand(100))
    x = torch.rand(4, 100, requires_grad=True)
    torch.nn.functional.hardswish(q(x), inplace=True).sum().backward()
    assert x.grad.abs().sum() > 0 and q.scale.grad.abs() > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_each_channel_takes_at_most_2_pow_b_values(bits):
    w = torch.randn(6, 5, 3, 3)
    q = FakeQuantize(QuantSpec(bits=bits, per_channel=True, narrow_range=False, scale_mode="lsq"), "weight", channels=6)
    q.init_from(w)
    out = q(w)
    for c in range(6):
        n = out[c].unique().numel()
        assert 2 <= n <= 2**bits


def test_mse_init_clips_outliers_less_error_than_minmax():
    w = torch.randn(4096)
    w[0] = 40.0
    err = {}
    for init in ("minmax", "mse"):
        q = FakeQuantize(QuantSpec(bits=4, init=init, scale_mode="frozen"), "weight")
        q.init_from(w)
        err[init] = (q(w) - w).pow(2).mean().item()
    assert err["mse"] < 0.5 * err["minmax"]


def test_w8a8_resnet18_is_close_to_float():
    model = build_model("resnet18", 10, cifar_stem=True)
    x = torch.randn(8, 3, 32, 32)
    for m in model.modules():  # BN statistics of the data, as a trained model would have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model(x)
    model.eval()
    qat = prepare_qat(model, QATConfig.from_dict({"bits": 8}))
    calibrate(qat, [x])
    qat.eval()
    with torch.no_grad():
        ref, out = model(x), qat(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1, rel


@pytest.mark.parametrize(
    "name,kw", [("resnet18", {"cifar_stem": True}), ("mobilenet_v2", {}), ("mobilenet_v3_small", {}), ("paper_cnn", {})]
)
def test_w4a4_forward_backward(name, kw):
    model = build_model(name, 10, **kw)
    qat = prepare_qat(model, QATConfig.from_dict({"bits": 4}))
    x = torch.randn(4, 3, 32, 32)
    calibrate(qat, [x])
    qat.train()
    qat(x).logsumexp(1).sum().backward()
    ws = quantizers(qat, "weight")
    assert ws and all(q.spec.bits in (4, 8) for _, q in ws)
    assert sum(q.spec.bits == 8 for _, q in ws) == 2  # first and last layer
    for _, q in ws + quantizers(qat, "activation"):
        assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()
    conv_grads = [p.grad for n, p in qat.named_parameters() if n.endswith("weight") and p.dim() == 4]
    assert all(g is not None and g.abs().sum() > 0 for g in conv_grads)


def test_resnet_sites_cover_every_add_and_relu_reuse():
    qat = prepare_qat(build_model("resnet18", 10, cifar_stem=True), {"bits": 4})
    names = set(qat.activation_quantizers)
    assert {"layer1_0_relu", "layer1_0_relu_1", "layer1_0_bn2", "avgpool", "fc", "x"} <= names
    assert qat.activation_quantizers["x"].spec.bits == 8
    assert qat.activation_quantizers["layer1_0_relu"].spec.bits == 4


def test_overrides_by_pattern():
    qat = prepare_qat(
        build_model("resnet18", 10, cifar_stem=True),
        {"bits": 4, "overrides": [{"pattern": "layer4.*", "bits": 6}, {"pattern": "layer1.0.conv1", "enabled": False}]},
    )
    assert qat.get_submodule("layer4.0.conv1").weight_quant.spec.bits == 6
    assert qat.activation_quantizers["layer4_0_relu"].spec.bits == 6
    assert not hasattr(qat.get_submodule("layer1.0.conv1"), "weight_quant")


def test_paper_placement_quantizes_conv_inputs_only():
    cfg = {
        "bits": 2,
        "first_last_bits": None,
        "placement": "conv_inputs",
        "weight": {
            "per_channel": False,
            "narrow_range": False,
            "scale_mode": "observer",
            "init": "minmax",
            "max_level": 1.5,
        },
        "activation": {
            "signed": True,
            "symmetric": True,
            "scale_mode": "observer",
            "observer_momentum": 1.0,
            "init": "minmax",
            "max_level": 1.5,
        },
    }
    qat = prepare_qat(build_model("paper_cnn", 100), cfg)
    assert list(qat.activation_quantizers) == ["x", "features_2"]
    x = torch.randn(2, 3, 32, 32)
    qat.train()
    out = qat.activation_quantizers["x"](x)
    levels = (out / (x.abs().max() / 1.5)).round().unique()
    assert set(levels.tolist()) <= {-2.0, -1.0, 0.0, 1.0}


@pytest.mark.parametrize(
    "cfg,msg",
    [
        ({"bits": 1}, "bits must be an integer from 2 to 8"),
        ({"bits": 9}, "bits must be an integer from 2 to 8"),
        ({"weight": {"granularity": "per_block"}}, "unknown key 'granularity'"),
        ({"weight": {"init": "magic"}}, "unknown scale init 'magic'"),
        ({"overrides": [{"pattern": "nonexistent.*", "bits": 8}]}, "pattern 'nonexistent.*' matches no"),
        ({"placement": "everywhere"}, "unknown placement"),
    ],
)
def test_bad_config_raises_value_error_naming_the_problem(cfg, msg):
    with pytest.raises(ValueError, match=msg.replace(".", r"\.").replace("*", r"\*")):
        prepare_qat(build_model("paper_cnn", 10), cfg)


def test_unsupported_module_is_named():
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3))
    with pytest.raises(ValueError, match="module '0' \\(Conv3d\\)"):
        prepare_qat(model, {})


def test_calibrate_sets_activation_range_from_data():
    qat = prepare_qat(build_model("small_cnn", 10, in_channels=1), {"bits": 8, "activation": {"init": "minmax"}})
    x = torch.rand(16, 1, 8, 8) * 3.0
    calibrate(qat, [(x, None)])
    q = qat.activation_quantizers["x"]
    assert q.scale.item() == pytest.approx(x.max().item() / 255, rel=1e-5)
    assert q.zero_point.item() == 0
