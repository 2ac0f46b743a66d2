"""The integer reference: what ONNX Runtime's fused integer kernels compute, run in torch.

The frozen graph (``freeze.py``) computes the ONNX QDQ semantics in float32: a conv of
dequantized values, then round(y / s_out). ORT's QLinearConv and QGemm accumulate exactly in
int32 and requantize once: round(float32(acc) * float32(s_in * s_w / s_out)). Both are right
to within float rounding, but near a rounding tie they can land on different integers, and in
a deep 4-bit network such one-LSB seeds cascade: on a ResNet-18 W4A4, 1e-7 to 5e-5 of each
layer's outputs differing in isolation grew to 7% top-1 disagreement at the logits
(docs/guide/export.md). This reference does the integer arithmetic itself (an exact
accumulation, ORT's requantization order), so what still differs from ORT is a fault of the
exporter or the kernel, not float noise.

16-bit activations (uint16): ORT CPU has no integer kernel for them and computes each conv in float
between DequantizeLinear and QuantizeLinear; this reference keeps the exact accumulation (what an
NPU's integer kernels compute), so the two can differ by one 16-bit LSB at a site where float
rounding lands on the other side of a tie (docs/guide/export.md). Adds, softmaxes and matmuls of
16-bit tensors keep the frozen graph's float QDQ semantics, as ORT runs them.

Emulated: conv/linear requantization, the element-wise add of two quantized tensors
(QLinearAdd, with ORT's AVX2 arithmetic on x86: float32 scale ratios, fused multiply-adds, one
rounding), QLinearSoftmax, and the float LayerNormalization and L2 normalization between DQ and Q
(their float32 rounding decides which side of a quantizer tie their outputs land on). Pooling and
reshapes keep the float QDQ semantics of the frozen graph: fed ORT's own inputs, each matched ORT
on every output measured (tools/benchmarks/export_site_parity.py).
"""

from __future__ import annotations

import abc
import inspect
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..quant.graph import QuantGraph
from .qdq import QConv, QLinear, QuantDequant


class _Pending(abc.ABC):
    """A fused kernel's result before its output quantizer: ``requantize`` is what the kernel
    writes, ``dequantize`` what ORT computes when the pattern is not fused."""

    @abc.abstractmethod
    def dequantize(self) -> torch.Tensor: ...

    @abc.abstractmethod
    def requantize(self, q: QuantDequant) -> torch.Tensor: ...

    @abc.abstractmethod
    def relu(self) -> "_Pending": ...


@dataclass
class _Accumulator(_Pending):
    """A conv/linear output before requantization: the exact int32 accumulator and its scale."""

    acc: torch.Tensor  # integer-valued float32 or float64, exact (see _exact_dtype)
    scale: torch.Tensor  # per output channel, float32 s_in * s_w
    axis: int  # where the output channels are: 1 for a conv (NCHW), -1 for a linear layer (..., C)

    def channel(self, t: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.acc.dim()
        shape[self.axis] = -1
        return t.view(shape)

    def dequantize(self) -> torch.Tensor:
        return self.acc.float() * self.channel(self.scale)

    def requantize(self, q: QuantDequant) -> torch.Tensor:
        multiplier = self.scale / q.scale  # float32, as the kernel computes it
        y = torch.round(self.acc.float() * self.channel(multiplier)) + q.zero_point.float()
        return (torch.clamp(y, 0, q.hi) - q.zero_point.float()) * q.scale

    def relu(self) -> "_Accumulator":  # fused: the output quantizer's zero point clamps at 0 too
        return _Accumulator(self.acc.clamp_min(0), self.scale, self.axis)


_FLOAT32_EXACT = 2.0**24  # every integer of smaller magnitude is a float32


def _exact_dtype(w_int: torch.Tensor, b_int: torch.Tensor, x_int: torch.Tensor) -> torch.dtype:
    """float32 when no partial sum can reach 2**24 (then every product and sum, in any order, is an
    exact float32 integer: 4-bit layers, 3-5x faster than float64 on CPU), float64 otherwise."""
    bound = w_int.double().abs().flatten(1).sum(1).max() * x_int.abs().max() + b_int.double().abs().max()
    return torch.float32 if float(bound) < _FLOAT32_EXACT else torch.float64


def _accumulate(m: QConv | QLinear, x: torch.Tensor) -> _Accumulator:
    x_int = torch.round(x / m.input_scale)  # x is (q - zp) * s_in on the grid: exact integers
    dtype = _exact_dtype(m.weight_int, m.bias_int, x_int)
    x_int, w, b = x_int.to(dtype), m.weight_int.to(dtype), m.bias_int.to(dtype)
    acc = (
        m.function(x_int, w, b, m.stride, m.padding, m.dilation, m.groups)
        if isinstance(m, QConv)
        else F.linear(x_int, w, b)
    )
    return _Accumulator(acc, m.input_scale * m.weight_scale, 1 if isinstance(m, QConv) else -1)


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add: a*b is exact in float64 (two float32 factors), and so is a*b + c
    for the requantization operands (an 8-bit integer times a float32, plus a float32 within 2**30 of
    it), then rounded once. For arbitrary float32 (LayerNorm) the float64 sum rounds first, which
    differs from one rounding only when it lands on a float32 rounding midpoint (about 2**-29 of
    cases)."""
    return (a.double() * b.double() + c.double()).float()


@dataclass
class _PendingAdd(_Pending):
    """Two quantized tensors that ORT adds as one QLinearAdd, resolved by the quantizer that follows."""

    xa: torch.Tensor
    qa: QuantDequant
    xb: torch.Tensor
    qb: QuantDequant

    def dequantize(self) -> torch.Tensor:
        return self.xa + self.xb

    def requantize(self, qc: QuantDequant) -> torch.Tensor:
        """ORT's QLinearAdd on x86 with AVX2 (mlas qladd_avx2.cpp): float32 ratios r = s/s_c, a fixed
        part z_c - (r_a z_a + r_b z_b) whose first product the compiler fused into the sum (one FMA),
        then fma(b, r_b, fixed), fma(a, r_a, that), rounded to nearest even and saturated to uint8 (a
        ReLU before a zero point of 0 adds nothing to that clamp). Matched to ORT 1.32 on 4 million
        element pairs (tests/test_export.py::test_kernel_emulations_match_ort_op_by_op)."""
        ia, ib = (torch.round(x / q.scale) + q.zero_point.float() for x, q in ((self.xa, self.qa), (self.xb, self.qb)))
        ra, rb = self.qa.scale / qc.scale, self.qb.scale / qc.scale
        za, zb, zc = (q.zero_point.float() for q in (self.qa, self.qb, qc))
        fixed = zc - _fma32(ra, za, rb * zb)
        y = torch.round(_fma32(ia, ra, _fma32(ib, rb, fixed))).clamp(0, 255)
        return (y.clamp(0, qc.hi) - zc) * qc.scale

    def relu(self) -> "_PendingAdd":  # only matched before a quantizer with zero point 0 (its clamp)
        return self


@dataclass
class _PendingSoftmax(_Pending):
    """A softmax of a quantized tensor, which ORT runs as QLinearSoftmax (contrib_ops
    qlinear_softmax.cc): exp from a 256-entry float32 table built in double precision (its shift from
    a float32 log), the row's sum accumulated in float32 in order, and the output requantized with
    floor(1 / s_out), not 1 / s_out (prepare_qat fixes s_out at 1/2^bits, where the two agree), the
    quotient rounded from double precision. Matched to ORT 1.32 on 550,000 rows of 5 to 197 values
    (tests/test_export.py::test_kernel_emulations_match_ort_op_by_op)."""

    x: torch.Tensor
    q: QuantDequant
    dim: int

    def dequantize(self) -> torch.Tensor:
        return torch.softmax(self.x, self.dim)

    def requantize(self, qc: QuantDequant) -> torch.Tensor:
        xi = (torch.round(self.x / self.q.scale) + self.q.zero_point.float()).movedim(self.dim, -1)
        d, s = xi.shape[-1], float(self.q.scale)
        shift = max(0.0, float(np.log(np.float32(np.finfo(np.float32).max) / np.float32(d))) - 5.0) / s
        table = torch.exp((torch.arange(256, dtype=torch.float64) - 255 + shift) * s).float()
        t = table[(xi - xi.amax(-1, keepdim=True) + 255).long()]
        total = t[..., 0].clone()
        for j in range(1, d):  # float32, in order: the kernel's loop
            total += t[..., j]
        scale = torch.floor(torch.ones((), dtype=torch.float32) / qc.scale)
        zc = qc.zero_point.float()
        y = (torch.round(t.double() * scale / total.unsqueeze(-1).double()).float() + zc).clamp(max=255).clamp(0, qc.hi)
        return ((y - zc) * qc.scale).movedim(-1, self.dim)

    def relu(self) -> "_PendingSoftmax":  # a softmax is never negative
        return self


def _ort_layer_norm(x: torch.Tensor, shape, weight, bias, eps: float) -> torch.Tensor:
    """ORT's float32 LayerNormalization on x86 (CPU EP, AVX2 path), inferred from its outputs: the
    mean in double precision; the variance a two-pass sum of (x - mean)^2 over 8 float32 lanes with
    fused multiply-adds, the lanes added in halves (8 -> 4 -> 2 -> 1), a tail of fewer than 8 values
    added after it one product at a time; inv_std = 1 / sqrt(var / n + eps) in float32; then
    y = fma((x - mean) * inv_std, weight, bias). Matched to ORT 1.32 bit for bit on every output for
    rows of 8 to 768 values whose length is a multiple of 8 (tests/test_export.py::
    test_kernel_emulations_match_ort_op_by_op); shorter rows take another kernel, not emulated, so
    they keep torch's layer_norm."""
    n = int(np.prod(shape))
    if n < 8:
        return F.layer_norm(x, shape, weight, bias, eps)
    rows = x.reshape(-1, n)
    mean = (rows.double().sum(-1, keepdim=True) / n).float()
    diff = rows - mean
    lanes = torch.zeros(rows.shape[0], 8)
    body = n - n % 8
    for j in range(0, body, 8):
        lanes = _fma32(diff[:, j : j + 8], diff[:, j : j + 8], lanes)
    while lanes.shape[1] > 1:
        half = lanes.shape[1] // 2
        lanes = lanes[:, :half] + lanes[:, half:]
    total = lanes[:, 0]
    for j in range(body, n):
        total = total + diff[:, j] * diff[:, j]
    # Division and square root in float64, then rounded: the correctly rounded float32 results
    # (float64 has enough bits for that), which torch's float32 ops are not always (it multiplies
    # by the reciprocal of a 0-dim divisor; its vectorized sqrt is off in the last bit at times).
    var = (total.double() / n).float() + torch.tensor(eps, dtype=torch.float32)
    inv_std = (1.0 / torch.sqrt(var.double()).float().double()).float()
    y = diff * inv_std.unsqueeze(-1)
    w = weight.reshape(-1) if weight is not None else torch.ones(n)
    y = _fma32(y, w, bias.reshape(-1)) if bias is not None else y * w
    return y.reshape(x.shape)


def _ort_l2_normalize(x: torch.Tensor, p: float, dim: int, eps: float) -> torch.Tensor:
    """F.normalize as exported (ReduceL2, Clip at eps, Div) and run by ORT's CPU kernels: over the
    last axis, ReduceL2 sums the float32 squares one after another, then takes the square root
    (matched to ORT 1.32 on rows of 16 to 64 values, tests/test_export.py::
    test_kernel_emulations_match_ort_op_by_op). Other norms and axes keep torch's F.normalize."""
    if p != 2 or dim not in (-1, x.dim() - 1):
        return F.normalize(x, p, dim, eps)
    total = x[..., 0] * x[..., 0]
    for j in range(1, x.shape[-1]):  # in order: the kernel's loop
        total = total + x[..., j] * x[..., j]
    norm = torch.sqrt(total.double()).float().clamp_min(eps).unsqueeze(-1)  # correctly rounded, as ORT's
    return (x.double() / norm.double()).float()


_RELUS = (torch.relu, F.relu)
_ADDS = {operator.add, operator.iadd, torch.add}
_SOFTMAXES = {torch.softmax, F.softmax}
_MATMULS = {torch.matmul, operator.matmul}
_LAYER_NORMS = {F.layer_norm, torch.layer_norm}


def _arguments(fn, args, kwargs) -> dict:
    """A call's arguments by name, defaults filled in from ``fn``'s signature."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _uint8(*quantizers: QuantDequant | None) -> bool:
    """All present and 8-bit: ORT's QLinearAdd, QLinearSoftmax and QLinearMatMul take uint8 only;
    with a 16-bit tensor ORT runs the op in float between DequantizeLinear and QuantizeLinear, which
    the frozen graph computes."""
    return all(q is not None and q.container == "uint8" for q in quantizers)


def _integers(x: torch.Tensor, q: QuantDequant) -> torch.Tensor:
    """x - zero point in integers: exact, since x = (q - zp) * scale lies on q's grid."""
    return torch.round(x / q.scale)


class IntegerReference(fx.Interpreter):
    """Run a frozen graph with conv/linear -> [ReLU] -> quantize and quantized adds computed as
    ORT's integer kernels compute them."""

    def __init__(self, frozen: fx.GraphModule):
        super().__init__(frozen)
        self.roles = QuantGraph(frozen)
        self._node: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self._node = n
        return super().run_node(n)

    def _is_relu(self, n: fx.Node) -> bool:
        return (
            (n.op == "call_function" and n.target in _RELUS)
            or (n.op == "call_method" and n.target == "relu")
            or (isinstance(self.roles.module(n), nn.ReLU))
        )

    def _quantizer(self, n: fx.Node) -> QuantDequant | None:
        m = self.roles.module(n)
        return m if isinstance(m, QuantDequant) else None

    def _qlinear_add(self, n: fx.Node, args) -> _PendingAdd | None:
        """DQ, DQ -> Add [-> ReLU] -> Q, which ORT runs as one QLinearAdd (a ReLU is dropped before a
        quantizer with zero point 0); None when n is not that pattern."""
        is_add = (n.op == "call_function" and n.target in _ADDS) or (
            n.op == "call_method" and n.target in ("add", "add_")
        )
        if not (
            is_add
            and not n.kwargs
            and len(n.args) == 2
            and all(isinstance(a, fx.Node) for a in n.args)
            and len(n.users) == 1
        ):
            return None
        (user,) = n.users
        if self._is_relu(user) and len(user.users) == 1:
            (after,) = user.users
            q = self._quantizer(after)
            if q is None or int(q.zero_point) != 0:
                return None
        else:
            q = self._quantizer(user)
        qa, qb = (self._quantizer(self.roles.source(a)) for a in n.args)  # the grids the inputs lie on
        if not _uint8(q, qa, qb) or any(isinstance(a, _Pending) for a in args):
            return None
        return _PendingAdd(args[0], qa, args[1], qb)

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        x = args[0] if args else None
        if isinstance(m, (QConv, QLinear)):
            return _accumulate(m, x)
        if type(m) is nn.LayerNorm:  # a subclass may compute something else
            (x,) = self._floats((x,))
            return _ort_layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
        if isinstance(x, _Pending):
            if isinstance(m, QuantDequant):
                return x.requantize(m)
            if isinstance(m, nn.ReLU):
                return x.relu()
        return super().call_module(target, tuple(self._floats(args)), kwargs)

    def _qlinear_softmax(self, n: fx.Node, args, kwargs) -> _PendingSoftmax | None:
        """DQ -> Softmax -> Q, which ORT runs as one QLinearSoftmax; None when n is not that pattern."""
        is_softmax = (n.op == "call_function" and n.target in _SOFTMAXES) or (
            n.op == "call_method" and n.target == "softmax"
        )
        if not is_softmax or len(n.users) != 1:
            return None
        q = self._quantizer(self.roles.source(n.args[0]))
        if not _uint8(q, self._quantizer(next(iter(n.users)))) or isinstance(args[0], _Pending):
            return None
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        return _PendingSoftmax(args[0], q, dim)

    def _qlinear_matmul(self, n: fx.Node, args) -> _Accumulator | None:
        """DQ, DQ -> MatMul -> Q, which ORT runs as QLinearMatMul: an exact integer product of the
        inputs less their zero points, requantized like a conv; None when n is not that pattern."""
        is_matmul = (n.op == "call_function" and n.target in _MATMULS) or (
            n.op == "call_method" and n.target == "matmul"
        )
        if not is_matmul or len(n.users) != 1:
            return None
        qa, qb = (self._quantizer(self.roles.source(a)) for a in n.args[:2])
        if not _uint8(qa, qb, self._quantizer(next(iter(n.users)))) or any(isinstance(a, _Pending) for a in args):
            return None
        a, b = _integers(args[0], qa), _integers(args[1], qb)
        bound = a.abs().amax() * b.abs().amax() * a.shape[-1]
        dtype = torch.float32 if float(bound) < _FLOAT32_EXACT else torch.float64
        return _Accumulator(torch.matmul(a.to(dtype), b.to(dtype)), qa.scale * qb.scale, -1)

    def _fused(self, args, kwargs):
        return (
            self._qlinear_add(self._node, args)
            or self._qlinear_softmax(self._node, args, kwargs)
            or self._qlinear_matmul(self._node, args)
        )

    def call_function(self, target, args, kwargs):
        if target in _RELUS and isinstance(args[0], _Pending):
            return args[0].relu()
        if target in _LAYER_NORMS:  # torch.layer_norm's sixth argument (cudnn_enable) does not matter here
            a = _arguments(F.layer_norm, tuple(self._floats(args))[:5], kwargs)
            return _ort_layer_norm(a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"])
        if target is F.normalize:
            a = _arguments(F.normalize, tuple(self._floats(args)), kwargs)
            return _ort_l2_normalize(a["input"], a["p"], a["dim"], a["eps"])
        return self._fused(args, kwargs) or super().call_function(target, tuple(self._floats(args)), kwargs)

    def call_method(self, target, args, kwargs):
        if target == "relu" and isinstance(args[0], _Pending):
            return args[0].relu()
        return self._fused(args, kwargs) or super().call_method(target, tuple(self._floats(args)), kwargs)

    @staticmethod
    def _floats(args):
        # A pending result that meets any other op is not a fused pattern: ORT runs it dequantized.
        return (a.dequantize() if isinstance(a, _Pending) else a for a in args)

    def output(self, target, args, kwargs):
        out = args[0]
        return out.dequantize() if isinstance(out, _Pending) else out


def integer_reference(frozen: fx.GraphModule):
    """A callable x -> logits computing the frozen graph as ORT's integer kernels do."""
    interp = IntegerReference(frozen)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return interp.run(x)

    return run
