"""Frozen quantized ops whose torch forward equals what their ONNX translation computes.

Each op is a torch.autograd.Function with a ``symbolic`` method, so torch.onnx.export (the
TorchScript exporter) writes exactly the QDQ pattern ONNX Runtime fuses into integer kernels:
QuantizeLinear -> DequantizeLinear for activations (uint8; below 8 bits with a float Min and a
second pair), an int8 initializer ->
DequantizeLinear(axis 0) for weights, an int32 initializer -> DequantizeLinear for biases.
torch's own fake-quant ops export only three integer ranges and the learnable ones not at all
(docs/guide/export.md), hence these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExportError
from ..quant import FakeQuantize

UINT8_MAX, UINT16_MAX = 255, 65535


class _QuantDequantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, hi: int):
        q = torch.clamp(torch.round(x / scale) + zero_point.float(), 0, hi)  # round half to even, as ONNX
        return (q - zero_point.float()) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, hi: int):
        """Q -> DQ, and below 8 bits Q -> DQ -> Min(., DQ(hi)) -> Q -> DQ: the second Q lands on
        min(q, hi) (the first Q already clamps at 0). Every runtime here reads this form as written.
        A Clip on the uint8 tensor says the same to ORT CPU, but QNN reads a uint8 tensor between Q and
        DQ without a quantization encoding and rejects it; a float Clip between DQ and Q, QNN HTP
        accepts and then ignores (its outputs run past the bound: docs/guide/runtimes.md)."""
        q = g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)
        if hi in (UINT8_MAX, UINT16_MAX):
            return q
        bound = g.op(
            "DequantizeLinear", g.op("Constant", value_t=torch.tensor(hi, dtype=torch.uint8)), scale, zero_point
        )
        return g.op(
            "DequantizeLinear", g.op("QuantizeLinear", g.op("Min", q, bound), scale, zero_point), scale, zero_point
        )


class _DequantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, scale, zero_point):
        shape = (-1,) + (1,) * (q.dim() - 1)
        return (q.float() - zero_point.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=0)


class QuantDequant(nn.Module):
    """Per-tensor quantize-dequantize in a uint8 container with integer range [0, hi], or for 16-bit
    activations (hi = 65535) a uint16 one: its zero point is written as int32 (torch's ONNX exporter
    has no uint16) and retyped in the ONNX file (``retype.uint16_activations``)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, hi: int):
        super().__init__()
        if not (0 < hi <= UINT8_MAX or hi == UINT16_MAX):
            raise ExportError(f"an activation range [0, {hi}] has no container: 2 to 8 bits (uint8) or 16 (uint16)")
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        dtype = torch.uint8 if hi <= UINT8_MAX else torch.int32
        self.register_buffer("zero_point", zero_point.detach().reshape(()).to(dtype).clone())
        self.hi = int(hi)

    @property
    def container(self) -> str:
        return "uint8" if self.hi <= UINT8_MAX else "uint16"

    @classmethod
    def from_quantizer(cls, q: FakeQuantize) -> "QuantDequant":
        s = q.spec
        return cls(q.step_size(), q.zero_point - s.qmin, s.qmax - s.qmin)

    def forward(self, x):
        return _QuantDequantFn.apply(x, self.scale, self.zero_point, self.hi)

    def extra_repr(self):
        return f"scale={self.scale.item():.4g}, zero_point={int(self.zero_point)}, range=[0,{self.hi}]"


class ChannelAffine(nn.Module):
    """A BatchNorm that no conv precedes, in inference: y = x * a + b per channel (axis 1). Written
    as two element-wise ops (ONNX Mul and Add) that ORT computes in float32 exactly as torch does,
    one rounding each, between the DequantizeLinear of its input and the next QuantizeLinear."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a.detach().float().clone())
        self.register_buffer("b", b.detach().float().clone())

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "ChannelAffine":
        a = torch.rsqrt(bn.running_var + bn.eps)
        a = a * bn.weight.detach() if bn.affine else a
        b = (bn.bias.detach() if bn.affine else torch.zeros_like(a)) - bn.running_mean * a
        return cls(a, b)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.a.view(shape) + self.b.view(shape)


class _FrozenWeights(nn.Module):
    """int8 weight and int32 bias with per-output-channel scales (bias scale = s_in * s_w)."""

    def _init_parts(self, w_int, w_scale, bias, in_scale):
        if int(w_int.abs().max()) > 127:
            raise ValueError("weights do not fit int8")
        self.register_buffer("weight_int", w_int.to(torch.int8))
        self.register_buffer("weight_scale", w_scale.float().clone())
        self.register_buffer("weight_zero_point", torch.zeros(w_int.shape[0], dtype=torch.int8))
        self.register_buffer(
            "input_scale", torch.as_tensor(in_scale).float().reshape(()).clone()
        )  # for integer_reference
        bias_scale = (in_scale * w_scale).float()
        self.register_buffer("bias_int", torch.round(bias / bias_scale).clamp(-(2**31), 2**31 - 1).to(torch.int32))
        self.register_buffer("bias_scale", bias_scale)
        self.register_buffer("bias_zero_point", torch.zeros(w_int.shape[0], dtype=torch.int32))

    def weight_bias(self):
        return (
            _DequantFn.apply(self.weight_int, self.weight_scale, self.weight_zero_point),
            _DequantFn.apply(self.bias_int, self.bias_scale, self.bias_zero_point),
        )


CONV_FUNCTIONS = {3: F.conv1d, 4: F.conv2d}  # by the weight's rank


class QConv(_FrozenWeights):
    """A 1-D or 2-D conv with integer weights (a transposed conv is one too: see ``ZeroUpsample``)."""

    @classmethod
    def from_parts(cls, w_int, w_scale, bias, in_scale, *, stride, padding, dilation, groups) -> "QConv":
        m = cls()
        m._init_parts(w_int, w_scale, bias, in_scale)
        m.stride, m.padding, m.dilation, m.groups = stride, padding, dilation, groups
        return m

    @property
    def function(self):
        return CONV_FUNCTIONS[self.weight_int.dim()]

    def forward(self, x):
        w, b = self.weight_bias()
        return self.function(x, w, b, self.stride, self.padding, self.dilation, self.groups)


def _zero_upsample_steps(shape: tuple, stride: tuple):
    """Per spatial axis with a stride: the 4-D shape (-1, S, 1, inner) whose third axis is padded with
    s - 1 zeros, and the (N, C, ...) shape after it. 4-D throughout: QNN HTP and XNNPACK refuse the
    6-D form (N, C, H, s, W, s)."""
    c, sizes = shape[0], list(shape[1:])
    for i, s in enumerate(stride):
        if s > 1:
            yield i, s, (-1, sizes[i], 1, math.prod(sizes[i + 1 :])), (-1, c, *sizes[:i], sizes[i] * s, *sizes[i + 1 :])
            sizes[i] *= s


def _border(stride: tuple, before: tuple, after: tuple) -> tuple[list[int], list[int]]:
    """(pads, crops) per spatial axis after the zero insertion, which leaves s - 1 zeros after the last
    value: the padding after an axis counts them, and a Slice crops those it does not need (a Slice
    only then: QNN HTP fails to compile some graphs with an unneeded one)."""
    extra = [a - (s - 1) for s, a in zip(stride, after)]
    return [max(e, 0) for e in extra], [min(e, 0) for e in extra]


class _ZeroUpsampleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shape: tuple, stride: tuple, before: tuple, after: tuple):
        for _, s, spread, merged in _zero_upsample_steps(shape, stride):
            x = F.pad(x.reshape(spread), (0, 0, 0, s - 1)).reshape(merged)
        pads, crops = _border(stride, before, after)
        x = x[(slice(None), slice(None), *[slice(0, c or None) for c in crops])]
        return F.pad(x, [p for b, a in zip(reversed(before), reversed(pads)) for p in (b, a)])

    @staticmethod
    def symbolic(g, x, shape: tuple, stride: tuple, before: tuple, after: tuple):
        """Reshape, Pad, Slice with constant shapes: the spatial sizes are static in the exported graph
        (only the batch is dynamic), where torch's own translation would compute them from Shape ops at
        run time, arithmetic the optimized graph keeps."""

        def const(values):
            return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

        for _, s, spread, merged in _zero_upsample_steps(shape, stride):
            x = g.op("Pad", g.op("Reshape", x, const(spread)), const([0, 0, 0, 0, 0, 0, s - 1, 0]))
            x = g.op("Reshape", x, const(merged))
        pads, crops = _border(stride, before, after)
        cropped = [i for i, c in enumerate(crops) if c]
        if cropped:
            ends = [shape[1 + i] * stride[i] + crops[i] for i in cropped]
            x = g.op("Slice", x, const([0] * len(cropped)), const(ends), const([2 + i for i in cropped]))
        return g.op("Pad", x, const([0, 0, *before, 0, 0, *pads]))


class ZeroUpsample(nn.Module):
    """The input side of a transposed conv written as a plain conv: ``stride - 1`` zeros between
    neighbouring values, then zero padding. ConvTranspose(x, w, stride s, padding p) equals
    Conv(ZeroUpsample(x), w flipped and transposed, stride 1, dilation d) with
    ``d * (k - 1) - p`` zeros before and that plus ``output_padding`` after each spatial axis.
    ORT has no integer ConvTranspose (no QLinearConvTranspose on CPU): this form runs as QLinearConv,
    exactly as the integer reference computes it, at the price of multiplying the inserted zeros
    (stride**2 times the MACs of the transposed conv in 2-D). Zeros are on every grid (zero point)
    and the rest is data movement, exact in any runtime."""

    def __init__(self, stride: tuple, before: tuple, after: tuple):
        super().__init__()
        self.stride, self.before, self.after = tuple(stride), tuple(before), tuple(after)

    def forward(self, x):
        return _ZeroUpsampleFn.apply(x, tuple(int(v) for v in x.shape[1:]), self.stride, self.before, self.after)

    def extra_repr(self):
        return f"stride={self.stride}, before={self.before}, after={self.after}"


class QLinear(_FrozenWeights):
    @classmethod
    def from_parts(cls, w_int, w_scale, bias, in_scale) -> "QLinear":
        m = cls()
        m._init_parts(w_int, w_scale, bias, in_scale)
        return m

    def forward(self, x):
        w, b = self.weight_bias()
        if x.dim() == 2:
            return F.linear(x, w, b)
        # A linear layer on (..., C) exports as MatMul + Add, which ORT runs as MatMulIntegerToFloat
        # with a float bias; flattened to 2-D it is a Gemm that becomes QGemm with its int32 bias,
        # the arithmetic of every other layer (and of the integer reference).
        return F.linear(x.reshape(-1, x.shape[-1]), w, b).reshape(x.shape[:-1] + (w.shape[0],))
