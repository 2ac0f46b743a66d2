"""Weight oscillation metrics of Nagel et al., "Overcoming Oscillations in QAT" (ICML 2022).

In the integer domain of each weight quantizer: a flip is a change of w_int between steps; an
oscillation is a flip whose sign is opposite to that weight's previous flip; the oscillation
frequency of a weight is an EMA (momentum 0.01) of its oscillation indicator.
"""

from __future__ import annotations

import torch
from torch import nn

from ..optim.groups import quantized_weights
from ..quant.fake_quant import integer_codes
from ..quant.kernels import FusedKernel, channel_view, fused_kernels_enabled


def _advance(w, scale, zero_point, qmin: int, qmax: int, prev, last_dir, freq, momentum: float):
    """One tracker step over one weight tensor: its codes, last flip directions and frequencies,
    and the counts of flips, oscillations and frequencies above 0.005 and 0.01. Int8 products
    stand in for sign comparisons; the frequency update is eager's ``mul_`` then ``add_``."""
    cur = integer_codes(w, scale, zero_point, qmin, qmax)
    direction = (cur - prev).sign_().to(torch.int8)
    osc = (direction * last_dir) == -1  # a flip against the previous one
    last_dir = torch.where(direction != 0, direction, last_dir)
    freq = freq.mul(1 - momentum).add_(osc, alpha=momentum)
    # int32 sums, not count_nonzero's int64: cheaper in the fused loop, exact below 2**31 weights a tensor
    counts = torch.stack([t.sum(dtype=torch.int32) for t in (direction != 0, osc, freq > 0.005, freq > 0.01)])
    return cur, last_dir, freq, counts


# It runs every step over every tracked weight: one generated loop instead of a dozen passes.
_fused_advance = FusedKernel(_advance)


class OscillationTracker:
    """Tracks every weight quantizer of ``max_bits`` bits or fewer. Call ``update()`` after each step."""

    def __init__(self, model: nn.Module, max_bits: int = 4, momentum: float = 0.01):
        self.tracked = [(w, q) for w, q in quantized_weights(model).items() if q.spec.bits <= max_bits]
        self.momentum = momentum
        self.prev = [q.integer(w) for w, q in self.tracked]
        self.last_dir = [torch.zeros_like(p, dtype=torch.int8) for p in self.prev]
        self.freq = [torch.zeros_like(p, dtype=torch.float32) for p in self.prev]

    def __bool__(self) -> bool:
        return bool(self.tracked)

    @torch.no_grad()
    def update(self) -> dict[str, torch.Tensor]:
        """Advance one step; returns device tensors (flips, oscillations, mean frequency, share above thresholds)."""
        advance = _fused_advance if fused_kernels_enabled() else _advance
        device = self.freq[0].device if self.freq else None
        counts, freq_sum = torch.zeros(4, dtype=torch.int64, device=device), torch.zeros((), device=device)
        for i, (w, q) in enumerate(self.tracked):
            axis = q.spec.axis % w.dim() if q.spec.per_channel else 0
            args = (channel_view(t, axis) for t in (w, q.step_size(w), q.zero_point_like(w)))
            state = (channel_view(t, axis) for t in (self.prev[i], self.last_dir[i], self.freq[i]))
            *state, c = advance(*args, q.spec.qmin, q.spec.qmax, *state, self.momentum)
            self.prev[i], self.last_dir[i], self.freq[i] = (t.view(w.shape) for t in state)
            counts, freq_sum = counts + c, freq_sum + self.freq[i].sum()  # torch's pairwise sum, as before
        flips, oscs, above_5e3, above_1e2 = counts.float()
        n = max(sum(f.numel() for f in self.freq), 1)
        return {
            "flips": flips,
            "oscillations": oscs,
            "osc_freq_mean": freq_sum / n,
            "osc_frac_0.005": above_5e3 / n,
            "osc_frac_0.01": above_1e2 / n,
        }

    def state_dict(self) -> dict:
        return {"prev": self.prev, "last_dir": self.last_dir, "freq": self.freq}

    def load_state_dict(self, sd: dict) -> None:
        self.prev, self.last_dir, self.freq = list(sd["prev"]), list(sd["last_dir"]), list(sd["freq"])
