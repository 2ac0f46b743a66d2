"""Nagel et al.'s two fixes for weight oscillations in QAT ("Overcoming Oscillations in
Quantization-Aware Training", ICML 2022), written from the paper and checked against the
behaviour of its public code (Qualcomm-AI-research/oscillations-qat):

- oscillation dampening: a regulariser pulling each latent weight toward the centre of its
  quantization bin, lambda * sum_layers agg((q(w) - clip(w))^2), q(w) not differentiated,
  lambda cosine-annealed from ``weight`` to ``weight_final``;
- iterative weight freezing: a weight whose EMA oscillation frequency (the oscillation tracker's)
  passes a threshold is fixed to the integer it held most, the rounded EMA of its integer codes;
  the threshold is cosine-annealed from ``threshold`` to ``threshold_final``, and nothing freezes
  before the annealing starts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..optim.groups import quantized_weights
from .oscillation import OscillationTracker

AGGREGATIONS = ("sum", "mean", "kernel_mean")


def annealed(step: int, total: int, start: float, final: float, anneal_start: float) -> float:
    """The paper's cosine schedule: ``start`` until ``anneal_start`` x total steps, then a half
    cosine to ``final`` at the last step."""
    begin = anneal_start * total
    if step < begin:
        return start
    t = min(1.0, (step - begin) / max(total - begin, 1))
    return final + 0.5 * (start - final) * (1 + math.cos(math.pi * t))


def dampening_loss(model: nn.Module, aggregation: str = "kernel_mean") -> torch.Tensor:
    """sum over quantized weights of agg((q(w) - clip(w))^2): q(w), the bin centre, is a constant
    and clip(w) keeps w in the quantizer's range, so the gradient only moves a weight toward its
    bin centre and never touches the step size. ``kernel_mean`` sums over output channels and
    averages over the rest (the reference code's default)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"dampening aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    total = None
    for w, q in quantized_weights(model).items():
        with torch.no_grad():
            centre = q.dequantize(q.integer(w))
        d = (centre - torch.clamp(w, *q.value_range(w))).square()
        term = d.sum() if aggregation == "sum" else d.mean() if aggregation == "mean" else d.sum(0).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("dampening: the model has no quantized weights")
    return total


class WeightFreezer:
    """Iterative weight freezing over the weights an ``OscillationTracker`` follows.

    A frozen weight keeps its integer code: after every optimizer step ``hold()`` writes its latent
    value back to that code's bin centre at the current step size. Writing the latent weight, rather
    than masking the quantizer's output as the reference code does, leaves the quantizers, the
    checkpoints' model state and the exporter as they are: the frozen code is what every later
    forward, evaluation and export reads. Call ``hold()`` after the optimizer step and before
    ``tracker.update()`` (so the tracker never sees a frozen weight move), then ``update(threshold)``.
    """

    def __init__(self, tracker: OscillationTracker):
        if not tracker:
            raise ValueError("weight freezing: no weight quantizer of 4 bits or fewer to freeze")
        self.tracker = tracker
        self.ema_int = [p.float() for p in tracker.prev]  # integer codes of the weights, EMA (momentum as tracked)
        self.frozen = [torch.zeros_like(p, dtype=torch.bool) for p in tracker.prev]
        self.level = [torch.zeros_like(p) for p in tracker.prev]

    @torch.no_grad()
    def hold(self) -> None:
        for (w, q), frozen, level in zip(self.tracker.tracked, self.frozen, self.level):
            w.copy_(torch.where(frozen, q.dequantize(level).to(w.dtype), w))

    @torch.no_grad()
    def update(self, threshold: float | None) -> torch.Tensor:
        """After ``tracker.update()``: freeze the weights whose frequency exceeds ``threshold`` (none
        when it is None), then advance the integer EMA. Returns the share of weights frozen (a device
        tensor)."""
        m = self.tracker.momentum
        frozen_count = torch.zeros((), device=self.frozen[0].device)
        for i, (cur, freq) in enumerate(zip(self.tracker.prev, self.tracker.freq)):
            if threshold is not None:
                new = (freq > threshold) & ~self.frozen[i]
                self.level[i] = torch.where(new, self.ema_int[i].round().to(cur.dtype), self.level[i])
                self.frozen[i] |= new
                # the tracker's last codes become the frozen ones: the jump onto them is no flip
                self.tracker.prev[i] = cur = torch.where(new, self.level[i], cur)
            self.ema_int[i].mul_(1 - m).add_(cur, alpha=m)
            frozen_count += self.frozen[i].count_nonzero()
        if threshold is not None:
            self.hold()
        return frozen_count / sum(f.numel() for f in self.frozen)

    def state_dict(self) -> dict:
        return {"ema_int": self.ema_int, "frozen": self.frozen, "level": self.level}

    def load_state_dict(self, sd: dict) -> None:
        self.ema_int, self.frozen, self.level = list(sd["ema_int"]), list(sd["frozen"]), list(sd["level"])
