"""Weight oscillation metrics of Nagel et al., "Overcoming Oscillations in QAT" (ICML 2022).

In the integer domain of each weight quantizer: a flip is a change of w_int between steps; an
oscillation is a flip whose sign is opposite to that weight's previous flip; the oscillation
frequency of a weight is an EMA (momentum 0.01) of its oscillation indicator.
"""
from __future__ import annotations

import torch
from torch import nn

from ..optim.groups import quantized_weights


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
        # Per-tensor sums instead of one concatenated frequency vector: this runs every step over
        # every tracked weight, so it avoids copies and int8 products stand in for sign comparisons.
        totals = torch.zeros(5, device=self.freq[0].device if self.freq else None)
        for i, (w, q) in enumerate(self.tracked):
            cur = q.integer(w)
            direction = (cur - self.prev[i]).sign_().to(torch.int8)
            osc = (direction * self.last_dir[i]) == -1  # a flip against the previous one
            self.last_dir[i] = torch.where(direction != 0, direction, self.last_dir[i])
            self.freq[i].mul_(1 - self.momentum).add_(osc, alpha=self.momentum)
            self.prev[i] = cur
            f = self.freq[i]
            totals += torch.stack([direction.count_nonzero(), osc.count_nonzero(), f.sum(), (f > 0.005).count_nonzero(),
                                   (f > 0.01).count_nonzero()]).float()
        flips, oscs, freq_sum, above_5e3, above_1e2 = totals
        n = max(sum(f.numel() for f in self.freq), 1)
        return {"flips": flips, "oscillations": oscs, "osc_freq_mean": freq_sum / n,
                "osc_frac_0.005": above_5e3 / n, "osc_frac_0.01": above_1e2 / n}

    def state_dict(self) -> dict:
        return {"prev": self.prev, "last_dir": self.last_dir, "freq": self.freq}

    def load_state_dict(self, sd: dict) -> None:
        self.prev, self.last_dir, self.freq = list(sd["prev"]), list(sd["last_dir"]), list(sd["freq"])
