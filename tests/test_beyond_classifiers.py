"""Layers beyond image classifiers: transposed and 1-D convs, dense outputs."""

import collections
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_sadam import calibrate, prepare_qat, sadam_param_groups
from qat_sadam.cli import main
from qat_sadam.export import export_onnx, fold_check
from qat_sadam.export.outputs import output_list
from qat_sadam.export.qdq import ZeroUpsample
from qat_sadam.export.target import Target
from qat_sadam.export.validate import validate
from qat_sadam.metrics import score
from qat_sadam.quant import QuantConvTranspose2d
from qat_sadam.quant.modules import transposed_to_conv_layout
from qat_sadam.train.data import Loader, Split, load_data
from qat_sadam.train.recipe import DataSection

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
    """Conv1d + BatchNorm1d, a transposed 1-D conv, a depthwise 1-D conv, max and global pooling, a linear."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(8, 16, 5, padding=2),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.ConvTranspose1d(16, 16, 4, stride=2, padding=1),
            nn.BatchNorm1d(16),
            nn.ReLU(),
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
    """Prepared, calibrated, BatchNorm with non-identity affine parameters, then three QAT steps (on
    random labels: the weights, scales and running statistics move as training moves them)."""
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
    opt = torch.optim.AdamW(sadam_param_groups(qat, scale_lr=1e-6), lr=1e-3)  # scales ~1e-2 move slowly
    for _ in range(3):
        outs = output_list(qat(x))
        labels = [torch.randint(o.shape[1], (o.shape[0], *o.shape[2:]), generator=g) for o in outs]
        opt.zero_grad()
        sum(F.cross_entropy(o, t) for o, t in zip(outs, labels)).backward()
        opt.step()
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


def test_transposed_conv_weights_are_quantized_per_output_channel():
    torch.manual_seed(0)
    layers = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2), nn.ConvTranspose2d(6, 6, 3, groups=2))
    qat = prepare_qat(layers, {"bits": 4, "first_last_bits": None})
    q, grouped = qat.get_submodule("0"), qat.get_submodule("1")
    assert isinstance(q, QuantConvTranspose2d) and q.weight_quant.scale.shape == (6,)
    # with groups, per output channel of a group (axis 1 of (in, out/groups, k, k)), as torch.ao does
    assert grouped.weight_quant.scale.shape == (3,) and grouped.weight_quant.spec.axis == 1
    codes = q.weight_quant.integer(q.weight.detach())
    assert codes.abs().max() <= 7 and codes.transpose(0, 1).flatten(1).unique(dim=0).shape[0] > 1
    expected = codes * q.weight_quant.scale.view(1, -1, 1, 1)
    x = torch.randn(2, 4, 5, 5)
    y = q(x)
    torch.testing.assert_close(y, F.conv_transpose2d(x, expected, q.bias, 2))
    y.square().sum().backward()  # straight through to the weights, LSQ to the per-channel scales
    assert q.weight.grad.abs().sum() > 0 and (q.weight_quant.scale.grad != 0).all()


@pytest.mark.parametrize("name,bits", [("unet", 8), ("unet", 4), ("kws", 8), ("kws", 4)])
def test_transposed_and_1d_convs_export_as_integer_kernels_bit_exact(tmp_path, name, bits):
    model, x = (UNet(), torch.randn(8, 3, 16, 16)) if name == "unet" else (KeywordSpotter(), torch.randn(8, 8, 40))
    qat = _trained(model, x, bits)
    assert fold_check(qat, x)["ok"]
    done = export_onnx(qat, x[:1], str(tmp_path / "m.onnx"), CPU)
    ops = collections.Counter(n.op_type for n in onnx.load(done["path"]).graph.node)
    kinds = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
    layers = sum(isinstance(m, kinds) for m in model.modules())
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
        # the frozen graph (BatchNorm folded, transposed convs rewritten) computes the QAT graph: rounding
        # at ties (2 LSB at 8 bits); at 4 bits such seeds cascade (measured 4-8 LSB), fold_check holds each layer
        gap = float((done["frozen"](x) - qat(x)).abs().max()) / rep["output_lsb"]
    assert gap <= (2 + 1e-4 if bits == 8 else 16)
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


def test_shapes_masks_are_deterministic_and_move_with_their_images():
    data = load_data(DataSection(name="shapes", image_size=16))
    again = load_data(DataSection(name="shapes", image_size=16))
    assert data.task == "segmentation" and data.num_classes == 4 and data.train.y.shape == (2048, 16, 16)
    assert torch.equal(data.train.y, again.train.y) and torch.equal(data.test.x, again.test.x)
    assert set(data.train.y.unique().tolist()) == {0, 1, 2, 3}
    # an image that spells its own label map: after random crops and flips it still does
    y = data.train.y[:64]
    split = Split((y * 60).to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous(), y)
    loader = Loader(split, 16, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), shuffle=True, crop_padding=3, flip=True)
    moved = 0
    for x, labels in loader.batches(epoch=1):
        assert torch.equal(x[:, 0].round().long(), labels * 60)
        moved += int((labels != y[: len(labels)]).any())
    assert moved  # the augmentation did move them


def test_miou_counts_each_class_over_its_union():
    labels = torch.tensor([[[0, 0, 1, 1]], [[2, 2, 2, 0]]])
    pred = torch.tensor([[[0, 1, 1, 1]], [[2, 2, 0, 0]]])
    logits = F.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    # class 0: 2 hits / 4 in union; class 1: 2 / 3; class 2: 2 / 3
    assert score(logits, labels) == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)
    assert score(torch.eye(3)[[0, 1, 1]], torch.tensor([0, 1, 2])) == pytest.approx(2 / 3)  # top-1 for (N,)


def test_a_segmentation_recipe_trains_fine_tunes_and_exports_in_miou(tmp_path, capsys):
    small = ["data.image_size=16", "data.subset=256", "data.test_subset=64", "fake_quant_kernels=eager"]
    sets = [a for s in small for a in ("--set", s)]
    float_run, ft = tmp_path / "float", tmp_path / "ft"
    assert main(["train", "shapes_float", "--out", str(float_run), "--quiet", "--set", "max_steps=16"] + sets) == 0
    sets += ["--set", f"model.checkpoint={float_run}", "--set", "max_steps=4"]
    assert main(["train", "shapes_finetune", "--bits", "W4A8", "--out", str(ft), "--quiet"] + sets) == 0
    rep = json.loads((ft / "export" / "validation.json").read_text())
    assert rep["passed"] and rep["accuracy"]["metric"] == "mIoU"
    assert rep["parity"]["torch_integer_vs_ort"]["max_lsb"] == 0 and rep["fusion"]["integer_kernels"] == 8
    ladder = rep["ladder"]
    assert 0 < ladder["ptq_acc"] < 1 and 0 < ladder["qat_acc"] < 1 and ladder["float_acc"] > 0.25
