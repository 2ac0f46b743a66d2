"""FakeQuantize: a fake-quant module built on torch's native ops.

torch.fake_quantize_per_{tensor,channel}_affine round half to even (as ONNX QuantizeLinear)
and pass a straight-through gradient (1 inside the clip range, 0 outside);
_fake_quantize_learnable_per_channel_affine adds the LSQ gradient for a per-channel (weight) scale,
``LSQPerTensor`` (eager ops) and ``FusedLSQPerTensor`` (the same numbers in torch.compile'd loops)
for a per-tensor (activation) scale.
"""
from __future__ import annotations

import math
import os
import shutil

import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
from torch import nn

from ..errors import KernelBuildError
from .spec import QuantSpec

_MSE_GRID = torch.linspace(0.3, 1.0, 36)


class LSQPerTensor(torch.autograd.Function):
    """Per-tensor fake quantization with the LSQ scale gradient (Esser et al. 2020), integer zero point.

    Values and x gradient equal torch._fake_quantize_learnable_per_tensor_affine's bit for bit
    (x * (1/s) rounded half to even, plus the zero point, clamped, times s); the scale gradient
    agrees to float32 summation order. Written with vectorized elementwise ops because torch's CPU
    kernels for that op round element by element and its backward writes full-size gradients for
    the scale and the zero point before summing them (tools/bench_training_cost.py --components).
    The forward stores where x was clipped and the per-element scale derivative r (level - x/s
    inside the range, the clipped level outside), so the backward is one masked copy of dy and one
    product-sum; the output itself is not saved, so in-place ops after it are safe.
    """

    @staticmethod
    @torch.profiler.record_function("LSQPerTensor")  # a label for profilers (tools/bench_training_cost.py)
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_factor: float):
        # Two full-size float buffers and one mask, the rest in place: on CPU a fresh buffer of
        # activation size costs more than the arithmetic (its pages are faulted in on first touch).
        v = x * scale.reciprocal()
        q = torch.round(v)  # the level relative to the zero point, clipped below to [qmin - zp, qmax - zp]
        lo, hi = qmin - zero_point, qmax - zero_point  # int32: exact
        clipped = (q < lo).logical_or_(q > hi)
        q.clamp_(lo, hi)
        # masked_fill, not a product with the mask: a bool factor would be converted to float first
        r = torch.sub(q, v.masked_fill_(clipped, 0.0), out=v)  # r = q - v inside the range, q outside
        ctx.save_for_backward(clipped, r)
        ctx.grad_factor = grad_factor
        return q.mul_(scale)

    @staticmethod
    def values(x, scale, zero_point, qmin: int, qmax: int):
        """The forward's values alone (same ops, same order), for evaluation and probes without autograd."""
        return torch.mul(x, scale.reciprocal()).round_().clamp_(qmin - zero_point, qmax - zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, dy):
        clipped, r = ctx.saved_tensors
        # A product and torch's pairwise sum, not torch.dot: BLAS accumulates millions of terms in a
        # few float32 partial sums (1e-5 relative error here), enough to part data-parallel ranks.
        dscale = (dy * r).sum() * ctx.grad_factor
        return dy.masked_fill(clipped, 0.0), dscale.reshape(1), None, None, None, None


def _lsq_forward(x, scale, lo, hi):
    """FusedLSQPerTensor's forward, elementwise: the values and r, the encoded scale derivative:
    level - x/s inside the range (|r| <= 0.5), -2 / +2 where x clipped below / above. One float
    tensor holds both the mask and the derivative, so the fused loop stores no bool (inductor's
    bool store cost more than the rest of the loop, docs/benchmarks.md)."""
    v = x * scale.reciprocal()
    q = torch.round(v)  # the level relative to the zero point; [lo, hi] = [qmin - zp, qmax - zp]
    r = torch.where(q < lo, -2.0, torch.where(q > hi, 2.0, q - v))
    return q.clamp(lo, hi) * scale, r


def _lsq_backward(dy, r, lo, hi):
    """dx (dy inside the range, 0 where clipped) and dy times the scale derivative (the clipped level outside)."""
    level = torch.where(r < -1.0, lo, torch.where(r > 1.0, hi, r))
    return torch.where(r.abs() > 1.0, 0.0, dy), dy * level


# One generated loop each (dynamic shapes: one compile per rank, dtype and layout, a few seconds).
_fused_forward = torch.compile(_lsq_forward, dynamic=True)
_fused_backward = torch.compile(_lsq_backward, dynamic=True)


def _compiled(kernel, *args):
    try:
        return kernel(*args)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        cause = e.inner_exception
        raise KernelBuildError(f"the fused activation fake-quant could not be compiled ({type(cause).__name__}: "
                               f"{str(cause).splitlines()[0]}); set fake_quant_kernels: eager in the recipe "
                               "to run without them") from e


class FusedLSQPerTensor(LSQPerTensor):
    """LSQPerTensor with its elementwise work in two loops generated by torch.compile (inductor):
    the same values, x gradient and per-element scale derivative bit for bit (summed by the same
    pairwise sum), in about half the eager time on CPU (tools/bench_training_cost.py --components):
    the eager ops write a fresh activation-size buffer per op, and each costs more than its arithmetic."""

    @staticmethod
    @torch.profiler.record_function("LSQPerTensor")
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_factor: float):
        lo, hi = qmin - zero_point, qmax - zero_point  # int32: exact
        y, r = _compiled(_fused_forward, x, scale, lo, hi)
        ctx.save_for_backward(r, lo, hi)
        ctx.grad_factor = grad_factor
        return y

    @staticmethod
    def backward(ctx, dy):
        r, lo, hi = ctx.saved_tensors
        dx, dy_r = _compiled(_fused_backward, dy, r, lo, hi)
        return dx, (dy_r.sum() * ctx.grad_factor).reshape(1), None, None, None, None


_lsq_kernels = {"fused": True}


def use_fused_fake_quant(enabled: bool) -> None:
    """Per-tensor LSQ fake quantization through FusedLSQPerTensor (default) or LSQPerTensor's eager
    ops, for a platform where inductor cannot build (no C++ compiler)."""
    _lsq_kernels["fused"] = bool(enabled)


def fused_kernels_buildable(device: torch.device) -> bool:
    """Whether inductor can build the fused kernels here: Triton on CUDA, a C++ compiler on CPU."""
    return device.type == "cuda" or shutil.which(os.environ.get("CXX") or inductor_config.cpp.cxx[-1]) is not None


class FakeQuantize(nn.Module):
    """Quantizes a weight (``kind="weight"``) or an activation (``kind="activation"``)."""

    def __init__(self, spec: QuantSpec, kind: str = "activation", channels: int | None = None):
        super().__init__()
        if kind not in ("weight", "activation"):
            raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
        if spec.per_channel and not channels:
            raise ValueError("a per-channel quantizer needs the number of channels")
        self.spec = spec
        self.kind = kind
        shape = (channels,) if spec.per_channel else ()
        scale = torch.ones(shape)
        if spec.scale_mode == "lsq":
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("initialized", torch.tensor(False))
        self.calibrating = False
        self._ready = False
        self._calib: list[torch.Tensor] = []

    def _load_from_state_dict(self, *args, **kwargs):
        self._ready = False
        super()._load_from_state_dict(*args, **kwargs)

    # -- range estimation -------------------------------------------------------------
    def _reduce_dims(self, x: torch.Tensor) -> list[int]:
        if not self.spec.per_channel:
            return list(range(x.dim()))
        axis = self.spec.axis % x.dim()
        return [d for d in range(x.dim()) if d != axis]

    def _range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) of x per scale element, by the spec's init method."""
        x = x.detach().float()
        dims = self._reduce_dims(x)
        if self.spec.init == "percentile":
            flat = x.movedim(self.spec.axis % x.dim(), 0).flatten(1) if self.spec.per_channel else x.flatten()[None]
            q = self.spec.percentile / 100.0
            lo, hi = torch.quantile(flat, 1 - q, dim=1), torch.quantile(flat, q, dim=1)
            if not self.spec.per_channel:
                lo, hi = lo[0], hi[0]
        else:
            lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        if self.spec.init == "mse":
            lo, hi = self._mse_clip(x, lo, hi, dims)
        return lo, hi

    def _qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        if s.fixed_scale is not None:
            return torch.full_like(lo, s.fixed_scale), torch.full_like(lo, s.qmin, dtype=torch.int32)
        if s.symmetric:
            top = s.max_level if s.max_level is not None else s.qmax
            scale = torch.maximum(-lo, hi) / top
            zp = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale = (hi - lo) / (s.qmax - s.qmin)
            zp = (s.qmin - torch.round(lo / scale.clamp_min(s.scale_floor))).clamp(s.qmin, s.qmax).int()
        return scale.clamp_min(s.scale_floor), zp

    def _mse_clip(self, x, lo, hi, dims):
        """Shrink the range by the factor in _MSE_GRID that minimises the quantization MSE."""
        best_err, best_lo, best_hi = None, lo, hi
        for a in _MSE_GRID.tolist():
            scale, zp = self._qparams(lo * a, hi * a)
            err = (self._quantize(x, scale, zp) - x).pow(2).mean(dim=dims)
            better = err < best_err if best_err is not None else torch.ones_like(err, dtype=torch.bool)
            best_err = torch.where(better, err, best_err) if best_err is not None else err
            best_lo, best_hi = torch.where(better, lo * a, best_lo), torch.where(better, hi * a, best_hi)
        return best_lo, best_hi

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Set scale and zero point from a tensor (the weight itself, or one activation batch)."""
        scale, zp = self._qparams(*self._range(x))
        self._set(scale, zp)

    def _set(self, scale, zp):
        self.scale.data.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zp.reshape(self.zero_point.shape))
        self.initialized.fill_(True)
        self._ready = True

    # -- calibration ------------------------------------------------------------------
    def start_calibration(self) -> None:
        self.calibrating, self._calib = True, []

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Average the per-batch ranges seen since start_calibration (minmax takes the extremes)."""
        self.calibrating = False
        if not self._calib:
            return
        los, his = (torch.stack(t) for t in zip(*self._calib))
        if self.spec.init == "minmax":
            lo, hi = los.amin(0), his.amax(0)
        else:
            lo, hi = los.mean(0), his.mean(0)
        self._set(*self._qparams(lo, hi))
        self._calib = []

    # -- forward ----------------------------------------------------------------------
    def _observe(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            lo, hi = self._range(x)
            if self.kind == "activation" and dist.is_available() and dist.is_initialized():
                # Data-parallel ranks see different batches: agree on one range so scales stay identical.
                dist.all_reduce(lo, op=dist.ReduceOp.MIN)
                dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            scale, zp = self._qparams(lo, hi)
            m = self.spec.observer_momentum
            if self.kind == "activation" and m < 1.0 and self.is_initialized:
                scale = torch.lerp(self.scale, scale.reshape(self.scale.shape), m)
            self._set(scale, zp)

    def _quantize(self, x, scale, zp):
        s = self.spec
        if s.per_channel:
            return torch.fake_quantize_per_channel_affine(x, scale, zp, s.axis % x.dim(), s.qmin, s.qmax)
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, s.qmin, s.qmax)

    def lsq_grad_factor(self, x: torch.Tensor) -> float:
        """LSQ's gradient scale 1/sqrt(N * Qp): N weights per scale, or features per sample."""
        n = x.numel() / self.scale.numel() if self.kind == "weight" else x[0].numel()
        return 1.0 / math.sqrt(n * self.spec.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if self.calibrating:
            self._calib.append(tuple(t.detach() for t in self._range(x)))
            return x
        if s.scale_mode == "observer" and self.training:
            self._observe(x)
        elif not self.is_initialized:
            self.init_from(x)
        if s.scale_mode != "lsq":
            return self._quantize(x, self.scale, self.zero_point)
        scale = self.scale.clamp_min(s.scale_floor)
        g = self.lsq_grad_factor(x)
        if s.per_channel:
            return torch._fake_quantize_learnable_per_channel_affine(x, scale, self.zero_point.float(), s.axis % x.dim(),
                                                                     s.qmin, s.qmax, g)
        args = (x, scale.reshape(1), self.zero_point.reshape(1), s.qmin, s.qmax)
        if not torch.is_grad_enabled():  # evaluation, S-Adam's probes: no mask or derivative to keep
            return LSQPerTensor.values(*args)
        return (FusedLSQPerTensor if _lsq_kernels["fused"] else LSQPerTensor).apply(*args, g)

    @property
    def is_initialized(self) -> bool:
        # Cached so that a warm forward does not sync with the device to read the flag.
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    def _broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.per_channel:
            return t
        shape = [1] * x.dim()
        shape[self.spec.axis % x.dim()] = -1
        return t.reshape(shape)

    @torch.no_grad()
    def integer(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of x (int32): clamp(round_half_even(x / scale) + zero_point)."""
        scale = self.step_size(x)
        zp = self._broadcast(self.zero_point, x)
        return torch.div(x, scale).round_().add_(zp).clamp_(self.spec.qmin, self.spec.qmax).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """The values of integer codes (a weight's bin centres): (codes - zero_point) * step."""
        return (codes - self._broadcast(self.zero_point, codes)) * self.step_size(codes)

    def value_range(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest and highest representable values, broadcastable against ``like``."""
        zp, step = self._broadcast(self.zero_point, like), self.step_size(like)
        return (self.spec.qmin - zp) * step, (self.spec.qmax - zp) * step

    def step_size(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """The current quantization step; broadcastable against ``like`` when given."""
        step = self.scale.detach().clamp_min(self.spec.scale_floor)
        return step if like is None else self._broadcast(step, like)

    def extra_repr(self) -> str:
        s = self.spec
        gran = f"per_channel(axis={s.axis})" if s.per_channel else "per_tensor"
        return f"{self.kind}, bits={s.bits}, range=[{s.qmin},{s.qmax}], {gran}, scale_mode={s.scale_mode}"
