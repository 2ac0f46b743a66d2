"""The integer reference: what ONNX Runtime's fused integer kernels compute, run in torch.

The frozen graph (``freeze.py``) computes the ONNX QDQ semantics in float32: a conv of
dequantized values, then round(y / s_out). ORT's QLinearConv and QGemm accumulate exactly in
int32 and requantize once: round(float32(acc) * float32(s_in * s_w / s_out)). Both are right
to within float rounding, but near a rounding tie they can land on different integers, and in
a deep 4-bit network such one-LSB seeds cascade: on a ResNet-18 W4A4, 1e-7 to 5e-5 of each
layer's outputs differing in isolation grew to 7% top-1 disagreement at the logits
(docs/export.md). This reference does the integer arithmetic itself (an exact
accumulation, ORT's requantization order), so what still differs from ORT is a fault of the
exporter or the kernel, not float noise.

Only conv/linear requantization is emulated. Adds, pooling and reshapes keep the float QDQ
semantics of the frozen graph: isolated op by op they matched ORT on every output measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .qdq import QConv2d, QLinear, QuantDequant


@dataclass
class _Accumulator:
    """A conv/linear output before requantization: the exact int32 accumulator and its scale."""
    acc: torch.Tensor  # integer-valued float32 or float64, exact (see _exact_dtype)
    scale: torch.Tensor  # per output channel, float32 s_in * s_w

    def channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.view((1, -1) + (1,) * (self.acc.dim() - 2))

    def dequantize(self) -> torch.Tensor:
        return self.acc.float() * self.channel(self.scale)

    def relu(self) -> "_Accumulator":  # fused: the output quantizer's zero point clamps at 0 too
        return _Accumulator(self.acc.clamp_min(0), self.scale)


_FLOAT32_EXACT = 2.0 ** 24  # every integer of smaller magnitude is a float32


def _exact_dtype(w_int: torch.Tensor, b_int: torch.Tensor, x_int: torch.Tensor) -> torch.dtype:
    """float32 when no partial sum can reach 2**24 (then every product and sum, in any order, is an
    exact float32 integer: 4-bit layers, 3-5x faster than float64 on CPU), float64 otherwise."""
    bound = w_int.double().abs().flatten(1).sum(1).max() * x_int.abs().max() + b_int.double().abs().max()
    return torch.float32 if float(bound) < _FLOAT32_EXACT else torch.float64


def _accumulate(m: QConv2d | QLinear, x: torch.Tensor) -> _Accumulator:
    x_int = torch.round(x / m.input_scale)  # x is (q - zp) * s_in on the grid: exact integers
    dtype = _exact_dtype(m.weight_int, m.bias_int, x_int)
    x_int, w, b = x_int.to(dtype), m.weight_int.to(dtype), m.bias_int.to(dtype)
    acc = F.conv2d(x_int, w, b, m.stride, m.padding, m.dilation, m.groups) if isinstance(m, QConv2d) else F.linear(x_int, w, b)
    return _Accumulator(acc, m.input_scale * m.weight_scale)


def _requantize(a: _Accumulator, q: QuantDequant) -> torch.Tensor:
    multiplier = a.scale / q.scale  # float32, as the kernel computes it
    y = torch.round(a.acc.float() * a.channel(multiplier)) + q.zero_point.float()
    return (torch.clamp(y, 0, q.hi) - q.zero_point.float()) * q.scale


_RELUS = (torch.relu, F.relu)


class IntegerReference(fx.Interpreter):
    """Run a frozen graph with conv/linear -> [ReLU] -> quantize computed as integer kernels."""

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        x = args[0] if args else None
        if isinstance(m, (QConv2d, QLinear)):
            return _accumulate(m, x)
        if isinstance(x, _Accumulator):
            if isinstance(m, QuantDequant):
                return _requantize(x, m)
            if isinstance(m, nn.ReLU):
                return x.relu()
        return super().call_module(target, tuple(self._floats(args)), kwargs)

    def call_function(self, target, args, kwargs):
        if target in _RELUS and isinstance(args[0], _Accumulator):
            return args[0].relu()
        return super().call_function(target, tuple(self._floats(args)), kwargs)

    def call_method(self, target, args, kwargs):
        return super().call_method(target, tuple(self._floats(args)), kwargs)

    @staticmethod
    def _floats(args):
        # An accumulator that meets any other op is not a fused pattern: ORT runs it dequantized.
        return (a.dequantize() if isinstance(a, _Accumulator) else a for a in args)

    def output(self, target, args, kwargs):
        out = args[0]
        return out.dequantize() if isinstance(out, _Accumulator) else out


def integer_reference(frozen: fx.GraphModule):
    """A callable x -> logits computing the frozen graph as ORT's integer kernels do."""
    interp = IntegerReference(frozen)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return interp.run(x)

    return run
