"""Models users bring: one small member of each family, prepared, exported and bit-exact on ORT.

The full sweep is tools/benchmarks/model_zoo.py (docs/model-zoo/README.md); here each family's own modules run
at a small width and input size so that `make test` stays fast.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.efficientnet import EfficientNet, MBConvConfig
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

from qat_sadam import calibrate, prepare_qat
from qat_sadam.export import ExportError, export_onnx, ort_session, validate
from qat_sadam.export.qdq import ChannelAffine
from qat_sadam.workflows.zoo import TARGET, zoo_row

TV = torchvision.models
SMALL = {  # (builder, bits)
    "vit": (lambda: TV.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10), 4),
    "swin": (lambda: TV.SwinTransformer([4, 4], 16, [2, 2], [2, 2], [2, 2], num_classes=10), 8),
    "swin_v2": (
        lambda: TV.SwinTransformer(
            [4, 4],
            16,
            [2, 2],
            [2, 2],
            [2, 2],
            num_classes=10,
            block=SwinTransformerBlockV2,
            downsample_layer=PatchMergingV2,
        ),
        8,
    ),
    "convnext": (lambda: TV.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10), 4),
    "maxvit": (lambda: TV.MaxVit((32, 32), 16, 2, [16, 32], [1, 1], 8, 0.0, num_classes=10), 8),
    "densenet": (lambda: TV.DenseNet(8, (2, 2), 16, num_classes=10), 8),
    "mobilenet_v3": (lambda: TV.mobilenet_v3_small(num_classes=10, width_mult=0.25), 8),
    "efficientnet": (
        lambda: EfficientNet(
            [MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(6, 3, 2, 16, 24, 2)],
            0.2,
            stochastic_depth_prob=0.2,
            num_classes=10,
        ),
        8,
    ),
}


def _prepared(model: nn.Module, bits: int, size: int = 32, images: int = 8):
    torch.manual_seed(0)
    qat = prepare_qat(model.eval(), {"bits": bits})
    x = torch.randn(images, 3, size, size)
    calibrate(qat, [x])
    return qat.eval(), x


def _validated(qat, x, tmp_path):
    done = export_onnx(qat, x[:1], str(tmp_path / "m.onnx"), TARGET)
    with torch.no_grad():
        integer = done["integer"](x).numpy()
    return done, validate(
        done["path"], target=TARGET, inputs=[x.numpy()], integer_outputs=integer, out_dir=str(tmp_path)
    )


# Float ops whose ORT kernels round differently from torch's in the last bit (MLAS's polynomial erf /
# logistic / tanh, the hard sigmoid's (x/6 + 1/2) for torch's (x + 3)/6): where such an op feeds a
# quantizer, a value on a rounding tie can land one LSB apart (docs/model-zoo/README.md). Element-wise
# Mul/Add (a BatchNorm as an affine) round the same in both; LayerNorm is emulated (integer_reference).
INEXACT_FLOAT_OPS = {
    "Erf",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "Softmax",
    "ReduceMean",
    "Div",
    "Sqrt",
    "Pow",
    "ReduceL2",
}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_each_family_runs_as_integer_kernels_matching_the_integer_reference(family, tmp_path):
    build, bits = SMALL[family]
    torch.manual_seed(0)
    qat, x = _prepared(build(), bits)
    _, rep = _validated(qat, x, tmp_path)
    fu, parity = rep["fusion"], rep["parity"]["torch_integer_vs_ort"]
    assert fu["ok"] and not fu["float_compute_left"]
    layers = sum(type(m).__name__ in ("QuantConv2d", "QuantLinear") for m in qat.modules())
    matmuls = sum(1 for n in qat.graph.nodes if n.op == "call_function" and n.target is torch.matmul)
    assert fu["integer_kernels"] == layers + matmuls
    assert all(entry["reason"] for entry in fu["float_ops"].values())
    if set(fu["float_ops"]) & INEXACT_FLOAT_OPS:
        assert parity["max_lsb"] <= 2 + 1e-3 and parity["top1_agreement"] == 1.0
    else:  # integer kernels and exact element-wise ops only: bit for bit
        assert parity["max_lsb"] == 0


def test_attention_is_quantized_where_ort_has_integer_kernels(tmp_path):
    """ViT: every Linear a QGemm, both attention matmuls QLinearMatMul, the softmax QLinearSoftmax
    with its fixed output scale 1/256; LayerNorm and GELU in float with their reasons."""
    qat, x = _prepared(SMALL["vit"][0](), 8)
    softmax_q = [q for k, q in qat.activation_quantizers.items() if k.startswith("softmax")]
    assert softmax_q and all(float(q.scale) == 1 / 256 and q.spec.scale_mode == "frozen" for q in softmax_q)
    _, rep = _validated(qat, x, tmp_path)
    ops = rep["fusion"]["optimized_ops"]
    assert (
        ops["QLinearMatMul"] == 4 and ops["QLinearSoftmax"] == 2 and ops["QGemm"] == 13
    )  # 2 x (q, k, v, out, 2 mlp) + head
    assert {"LayerNormalization", "Erf"} <= set(rep["fusion"]["float_ops"])
    assert "LayerNorm" in rep["fusion"]["float_ops"]["LayerNormalization"]["reason"]


class _BiasedAttention(nn.Module):
    """Attention whose logits get a float scale and a learned position bias before the softmax (as in
    Swin V2 and MaxViT): the softmax's input is not the matmul's quantized output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.qkv = nn.Linear(16, 48)
        self.bias = nn.Parameter(torch.randn(4, 4))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        attn = (torch.matmul(q, k.transpose(-2, -1)) * 0.25 + self.bias).softmax(dim=-1)
        return self.head(torch.matmul(attn, v).flatten(1))


def test_a_softmax_of_float_logits_gets_an_input_quantizer_and_runs_as_qlinearsoftmax(tmp_path):
    """ORT's float Softmax uses MLAS's ISA-specific exp, which the integer reference does not follow;
    a quantizer on the biased logits makes it QLinearSoftmax (a table), which it does, bit for bit."""
    qat, x = _prepared(_BiasedAttention(), 8, size=8, images=64)
    softmax = next(n for n in qat.graph.nodes if n.op == "call_method" and n.target == "softmax")
    assert softmax.args[0].op == "call_module" and softmax.args[0].target.startswith("activation_quantizers.")
    _, rep = _validated(qat, x, tmp_path)
    assert rep["fusion"]["optimized_ops"]["QLinearSoftmax"] == 1 and "Softmax" not in rep["fusion"]["float_ops"]
    assert rep["parity"]["torch_integer_vs_ort"]["max_lsb"] == 0


def test_what_parameters_alone_compute_is_folded_in_torch_before_export(tmp_path):
    """Swin V2's exp(logit scale) and 16 * sigmoid(position-bias MLP) become initializers computed by
    torch: ORT would fold them with its own exp and sigmoid, off in the last bit from the values the
    integer reference uses."""
    import onnx

    qat, x = _prepared(SMALL["swin_v2"][0](), 8)
    done, rep = _validated(qat, x, tmp_path)
    ops = {n.op_type for n in onnx.load(done["path"]).graph.node}
    assert not ops & {"Exp", "Sigmoid"} and rep["fusion"]["optimized_ops"]["QLinearSoftmax"] == 4
    assert rep["parity"]["torch_integer_vs_ort"]["max_lsb"] == 0


def test_dropout_in_functional_form_follows_train_and_eval():
    """fx records F.dropout(x, p, self.training) with the mode at trace time; it must switch."""
    vit = TV.VisionTransformer(32, 8, 1, 2, 32, 64, dropout=0.5, attention_dropout=0.5, num_classes=10)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero
    qat = prepare_qat(vit, {"bits": 8})
    x = torch.randn(4, 3, 32, 32)
    calibrate(qat, [x])
    qat.eval()
    with torch.no_grad():
        assert torch.equal(qat(x), qat(x))
        qat.train()
        assert not torch.equal(qat(x), qat(x))


def test_batchnorm_without_a_conv_exports_as_an_affine_between_dq_and_q(tmp_path):
    """DenseNet's BatchNorm -> ReLU -> conv: no conv before it to fold into, and folding into the next
    conv would move it past that conv's input quantizer. It becomes x * a + b, exact against the
    QAT graph's BatchNorm in eval mode, and the integer reference equals ORT."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    with torch.no_grad():  # statistics and an affine that are not the identity
        for bn in (model[1], model[3]):
            (
                bn.running_mean.uniform_(-1, 1),
                bn.running_var.uniform_(0.5, 2),
                bn.weight.uniform_(-2, 2),
                bn.bias.uniform_(-1, 1),
            )
    qat, x = _prepared(model, 8, size=16)
    done, rep = _validated(qat, x, tmp_path)
    frozen = done["frozen"]
    assert isinstance(frozen.get_submodule("3"), ChannelAffine) and not hasattr(frozen, "1")  # folded into conv 0
    t = torch.randn(64, 8, 5, 5)
    torch.testing.assert_close(frozen.get_submodule("3")(t), qat.get_submodule("3")(t), rtol=1e-6, atol=1e-6)
    assert rep["parity"]["torch_integer_vs_ort"]["max_lsb"] == 0 and rep["fusion"]["ok"]
    assert {"Mul", "Add"} <= set(rep["fusion"]["float_ops"])


def test_adaptive_pooling_to_a_larger_size_exports_as_a_replication(tmp_path):
    """VGG's 7x7 adaptive pool of a 1x1 map (small inputs): ONNX has no such pooling; it is a copy."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(72, 10),
    )
    qat, x = _prepared(model, 8, size=16)
    _, rep = _validated(qat, x, tmp_path)
    assert rep["fusion"]["ok"] and rep["parity"]["torch_integer_vs_ort"]["max_lsb"] == 0
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(5), nn.Flatten(), nn.Linear(200, 10))
    qat, x = _prepared(model, 8, size=9)  # 7x7 to 5x5: neither divides the other
    with pytest.raises(ExportError, match="module '1' \\(AdaptiveAvgPool2d\\) pools 7x7 to 5x5"):
        export_onnx(qat, x[:1], str(tmp_path / "m2.onnx"), TARGET)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(self.conv(x)).mean((2, 3))


class _Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # control flow on a value: fx cannot trace it


def test_untraceable_and_failing_models_name_the_module_and_op():
    with pytest.raises(ValueError, match="cannot trace module 'gate' \\(_Gate\\) with torch.fx: symbolically traced"):
        prepare_qat(_DataDependent(), {"bits": 8})
    bad = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(99, 10))  # wrong in_features
    qat = prepare_qat(bad, {"bits": 8})
    with pytest.raises(ValueError, match=r"calibrate: module '2' \(QuantLinear\) failed on input \(2, 3, 8, 8\): mat1"):
        calibrate(qat, [torch.randn(2, 3, 8, 8)])


def test_timm_models_through_their_own_source():
    pytest.importorskip("timm", reason="timm is an optional extra (make venv installs it)")
    for name in ("mobilenetv3_small_050", "tf_efficientnet_lite0"):  # timm's Linear head; its 'SAME' padding
        row = zoo_row(name, "timm", bits=8, images=4)
        assert row["stage"] == "done" and row["bit_exact"], row
    row = zoo_row("no_such_model", "timm")
    assert row["stage"] == "build" and "unknown timm model 'no_such_model'" in row["error"]


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)  # control flow on a value: fx cannot trace it


class _TimmLike(nn.Module):
    __module__ = "timm.models.test"  # prepare_qat tries timm's fx leaf registry for timm's models only

    def __init__(self):
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 4, 3), _Branchy(), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def test_a_module_fx_cannot_see_into_is_named_and_its_layers_reported_float(tmp_path):
    """A module in timm's fx leaf registry is traced as one call: prepare_qat says so, records it,
    and the export's fusion check reports its conv as float compute."""
    timm = pytest.importorskip("timm", reason="timm is an optional extra (make venv installs it)")
    timm.layers.register_notrace_module(_Branchy)
    with pytest.warns(UserWarning, match=r"traced _Branchy x1 as opaque calls"):
        qat, x = _prepared(_TimmLike(), 8)
    assert qat.opaque_modules == {"_Branchy": 1}
    _, rep = _validated(qat, x, tmp_path)
    assert not rep["fusion"]["ok"] and rep["fusion"]["float_compute_left"] == {"Conv": 1}


def test_timm_efficientvit_attention_is_traced_inside():
    """EfficientViT's attention modules were timm fx leaves (a device test in LiteMLA, size-chosen
    windows in LocalWindowAttention); both have traceable forms, traced here (both models integer and
    bit-exact in the zoo sweep, docs/model-zoo; b0 exported here, m0's row costs 18 s). A model
    evaluated once holds cached position biases that deepcopy refused."""
    timm = pytest.importorskip("timm", reason="timm is an optional extra (make venv installs it)")
    for name in ("efficientvit_m0", "efficientvit_b0"):
        model = timm.create_model(name, num_classes=10).eval()
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))  # fills m0's attention-bias caches
        assert prepare_qat(model, {"bits": 8}).opaque_modules == {}, name
    row = zoo_row("efficientvit_b0", "timm", bits=8, images=4, attempts=1)
    assert row["opaque_modules"] == {} and row["bit_exact"], row


class _ShapeBuiltEncoding(nn.Module):
    """EdgeNeXt's positional encoding: a conv on a tensor built from the input's shape alone, added."""

    def __init__(self):
        super().__init__()
        self.conv, self.pos, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(2, 4, 1), nn.Linear(4, 10)

    def forward(self, x):
        y = self.conv(x)
        b, _, h, w = y.shape
        grid = torch.ones((b, 2, h, w)).cumsum(2)
        return self.fc((y + self.pos(grid)).mean((2, 3)))


def test_a_conv_on_a_tensor_built_from_shapes_is_a_constant(tmp_path):
    """Such a conv has no quantized input: it is a float constant, not an export error. The exporter
    computes it in torch at the example's size (the same for every image of a batch, only added)
    and writes its value, so no float conv is left for ORT; at batch 5 the graph still agrees."""
    qat, x = _prepared(_ShapeBuiltEncoding(), 8)
    assert type(qat.pos) is nn.Conv2d and type(qat.conv).__name__ == "QuantConv2d"
    done, rep = _validated(qat, x, tmp_path)
    assert not rep["fusion"]["float_compute_left"] and rep["parity"]["torch_integer_vs_ort"]["max_lsb"] == 0
    assert not any(isinstance(m, nn.Conv2d) and type(m) is nn.Conv2d for m in done["frozen"].modules())
    sess = ort_session(done["path"])
    with torch.no_grad():
        assert np.array_equal(sess.run(None, {"input": x[:5].numpy()})[0], done["integer"](x[:5]).numpy())


class _PadWithOnes(nn.Module):
    """EfficientViT's value padding: ones appended to a quantized tensor before a linear; a cast."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.fc2 = nn.Conv2d(3, 4, 3), nn.Linear(37, 10), nn.Linear(10, 10)

    def forward(self, x):
        y = self.fc(F.pad(self.conv(x).flatten(2), (0, 1), mode="constant", value=1.0))
        return self.fc2(y.to(y.dtype)).mean(1)


def test_padding_with_a_constant_off_the_grid_is_a_float_op(tmp_path):
    """F.pad with ones is not grid-preserving (zero padding is): the linear after it gets its own
    input quantizer, so training sees the ones as deployment does (rounded to a grid), rather than
    exact in training and rounded to the conv's grid only in the deployed graph. A node named 'to'
    (x.to(dtype)) does not collide with Module.to."""
    qat, x = _prepared(_PadWithOnes(), 8, size=8)
    assert "pad" in qat.activation_quantizers and "to_site" in qat.activation_quantizers
    _, rep = _validated(qat, x, tmp_path)
    assert rep["fusion"]["ok"] and rep["parity"]["torch_integer_vs_ort"]["max_lsb"] == 0


def test_the_integer_reference_is_checked_against_ort_with_the_output_lsb(tmp_path):
    qat, x = _prepared(SMALL["mobilenet_v3"][0](), 8)
    done, rep = _validated(qat, x, tmp_path)
    ort = ort_session(done["path"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.array_equal(done["integer"](x).numpy(), ort)
    assert rep["output_lsb"] == pytest.approx(float(done["frozen"].activation_quantizers["classifier_3"].scale))


def test_timm_mobilevitv2_is_traced_inside_and_resizes_on_small_inputs():
    """MobileViTv2's block branches on its input's size (fx fell back to it as an opaque leaf,
    leaving its 45 convs float); at 32x32 its last stage is 1x1 and is resized to a whole patch,
    whose size the ONNX export once computed as 0 (a negative floor division traced as ONNX Div)."""
    pytest.importorskip("timm", reason="timm is an optional extra (make venv installs it)")
    row = zoo_row("mobilevitv2_050", "timm", bits=8, images=4, attempts=1)
    assert row["size"] == 32 and row["stage"] == "done" and row["bit_exact"] and row["integer_kernels"] == 65, row
    assert "Resize" in row["float_ops"]


class _ChannelsLastNormHead(nn.Module):
    """timm's ConvNeXt head: pooled features, LayerNorm over channels (permute, norm, permute back), flatten,
    identities (pre-logits, dropout), fc."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.norm, self.fc = (
            nn.Conv2d(3, 8, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.LayerNorm(8),
            nn.Linear(8, 10),
        )
        self.pre_logits, self.drop = nn.Identity(), nn.Dropout(0.0)

    def forward(self, x):
        x = self.pool(self.conv(x))
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(self.drop(self.pre_logits(torch.flatten(x, 1))))


def test_a_transpose_then_flatten_before_a_linear_keeps_it_an_integer_kernel(tmp_path):
    """ORT moves a DequantizeLinear forward through Transpose and Reshape but not Flatten: the exporter
    writes Flatten(axis=1) as Reshape, or the Gemm stays float (timm's convnext_atto)."""
    qat, x = _prepared(_ChannelsLastNormHead(), 8)
    _, rep = _validated(qat, x, tmp_path)
    fu = rep["fusion"]
    assert fu["ok"] and fu["integer_kernels"] == 2 and fu["optimized_ops"].get("QGemm") == 1, fu
