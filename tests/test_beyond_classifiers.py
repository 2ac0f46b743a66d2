"""Layers beyond image classifiers: transposed and 1-D convs, dense outputs."""

import collections

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_sadam import calibrate, prepare_qat
from qat_sadam.export import export_onnx, fold_check
from qat_sadam.export.outputs import output_list
from qat_sadam.export.qdq import ZeroUpsample
from qat_sadam.export.target import Target
from qat_sadam.export.validate import validate
from qat_sadam.quant import QuantConvTranspose2d
from qat_sadam.quant.modules import conv_to_transposed_layout, transposed_to_conv_layout

CPU = Target(name="test", weight_bits_max=7, checks=["fusion", "parity"])


class UNet(nn.Module):
    """An encoder, two transposed convs (one with output padding and BatchNorm, one grouped), a skip concat."""

    def __init__(self):
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.Sequential(
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.up2 = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a = self.down1(x)
        u = self.up(self.down2(a))
        return self.head(torch.cat([self.pool(self.up2(u)), a], 1))


class KeywordSpotter(nn.Module):
    """Conv1d + BatchNorm1d, a depthwise 1-D conv, max and global pooling, a linear classifier."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(8, 16, 5, padding=2),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(16, 16, 3, padding=1, groups=16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Conv1d(16, 32, 1),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(32, 5),
        )

    def forward(self, x):
        return self.body(x)


def _trained(model, x, bits):
    """Prepared, calibrated, BatchNorm with non-identity statistics and affine parameters."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data = torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=g) * torch.where(
                torch.rand(m.weight.shape, generator=g) < 0.2, -1.0, 1.0
            )
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.3
    qat = prepare_qat(model, {"bits": bits})
    calibrate(qat, [x])
    qat.train()
    with torch.no_grad():
        for _ in range(3):
            qat(x)
    return qat.eval()


@pytest.mark.parametrize(
    "dims,kw",
    [
        (2, dict(stride=2, padding=1, output_padding=1)),
        (2, dict(stride=3, dilation=2, groups=2)),
        (1, dict(stride=2, padding=2, output_padding=1)),
    ],
)
def test_zero_upsampling_then_flipped_conv_is_the_transposed_conv(dims, kw):
    torch.manual_seed(0)
    conv_t = (nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d)(4, 6, 3, **kw).double()
    x = torch.randn(2, 4, *[7] * dims, dtype=torch.float64)
    k, d, p = conv_t.kernel_size, conv_t.dilation, conv_t.padding
    before = [di * (ki - 1) - pi for ki, di, pi in zip(k, d, p)]
    after = [b + o for b, o in zip(before, conv_t.output_padding)]
    w = transposed_to_conv_layout(conv_t.weight, conv_t.groups).flip(tuple(range(2, 2 + dims)))
    up = ZeroUpsample(conv_t.stride, before, after)(x)
    y = (F.conv1d if dims == 1 else F.conv2d)(up, w, conv_t.bias, 1, 0, d, conv_t.groups)
    torch.testing.assert_close(y, conv_t(x), rtol=0, atol=1e-12)
    assert torch.equal(
        conv_to_transposed_layout(
            transposed_to_conv_layout(conv_t.weight, 2 if "groups" in kw else 1), 2 if "groups" in kw else 1
        ),
        conv_t.weight,
    )


def test_transposed_conv_weights_are_quantized_per_output_channel():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    qat = prepare_qat(nn.Sequential(layer), {"bits": 4, "first_last_bits": None})
    q = qat.get_submodule("0")
    assert isinstance(q, QuantConvTranspose2d) and q.weight_quant.scale.shape == (6,)
    w_conv = transposed_to_conv_layout(layer.weight, 2)
    # each output channel's weights take at most 15 values on its own grid, symmetric per channel
    codes = q.weight_quant.integer(w_conv.detach())
    assert codes.abs().max() <= 7 and codes.flatten(1).unique(dim=0).shape[0] > 1
    expected = conv_to_transposed_layout(codes * q.weight_quant.scale.view(-1, 1, 1, 1), 2)
    torch.testing.assert_close(q.quantized_weight(), expected)
    x = torch.randn(2, 4, 5, 5)
    y = q(x)
    torch.testing.assert_close(y, F.conv_transpose2d(x, expected, q.bias, 2, 0, 0, 2))
    y.square().sum().backward()  # straight through to the weights, LSQ to the per-channel scales
    assert q.weight.grad.abs().sum() > 0 and (q.weight_quant.scale.grad != 0).all()


@pytest.mark.parametrize("name,bits", [("unet", 8), ("unet", 4), ("kws", 8), ("kws", 4)])
def test_transposed_and_1d_convs_export_as_integer_kernels_bit_exact(tmp_path, name, bits):
    model, x = (UNet(), torch.randn(8, 3, 16, 16)) if name == "unet" else (KeywordSpotter(), torch.randn(8, 8, 40))
    qat = _trained(model, x, bits)
    assert fold_check(qat, x)["ok"]
    done = export_onnx(qat, x[:1], str(tmp_path / "m.onnx"), CPU)
    ops = collections.Counter(n.op_type for n in onnx.load(done["path"]).graph.node)
    layers = sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) for m in model.modules())
    assert ops["Conv"] + ops["Gemm"] == layers and not ops["ConvTranspose"]
    with torch.no_grad():
        rep = validate(
            done["path"],
            target=CPU,
            inputs=[x.numpy()],
            frozen_outputs=done["frozen"](x).numpy(),
            integer_outputs=done["integer"](x).numpy(),
            out_dir=str(tmp_path),
        )
        # the frozen graph (BatchNorm folded, transposed convs rewritten) computes the QAT graph: one LSB
        # of rounding at 8 bits; at 4 bits such seeds cascade (measured 4-8 LSB), fold_check holds each layer
        gap = float((done["frozen"](x) - qat(x)).abs().max()) / rep["output_lsb"]
    assert gap <= (1 + 1e-4 if bits == 8 else 16)
    assert rep["fusion"]["ok"] and rep["fusion"]["integer_kernels"] == layers, rep["fusion"]
    assert rep["parity"]["torch_integer_vs_ort"]["max_lsb"] == 0


class TwoHeads(nn.Module):
    """A dense output and a pooled one, returned as a dict (torchvision's segmentation models do)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.seg, self.cls = nn.Conv2d(8, 4, 1), nn.Linear(8, 3)

    def forward(self, x):
        f = self.body(x)
        return {"out": self.seg(f), "aux": self.cls(f.mean((2, 3)))}


def test_every_output_is_exported_named_and_gated(tmp_path):
    x = torch.randn(8, 3, 12, 12)
    qat = _trained(TwoHeads(), x, 8)
    done = export_onnx(qat, x[:1], str(tmp_path / "m.onnx"), CPU)
    assert [o.name for o in onnx.load(done["path"]).graph.output] == ["out", "aux"]
    with torch.no_grad():
        integer = [o.numpy() for o in output_list(done["integer"](x))]
    rep = validate(done["path"], target=CPU, inputs=[x.numpy()], integer_outputs=integer, out_dir=str(tmp_path))
    assert rep["passed"] and set(rep["outputs"]) == {"out", "aux"}
    assert all(o["torch_integer_vs_ort"]["max_lsb"] == 0 for o in rep["outputs"].values())
    assert rep["outputs"]["aux"]["output_lsb"] == pytest.approx(qat.activation_quantizers["cls"].scale.item())
    # a wrong second output fails the file, named, though the first still agrees
    integer[1] = np.roll(integer[1], 1, axis=1)  # every argmax moves to the next class
    rep = validate(done["path"], target=CPU, inputs=[x.numpy()], integer_outputs=integer, out_dir=str(tmp_path))
    assert not rep["passed"] and any(f.startswith("aux: top-1 agreement") for f in rep["failures"])
