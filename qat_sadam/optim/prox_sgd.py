"""Prox-SGD, the paper's other baseline: heavy-ball SGD followed by soft-thresholding (L1 prox)."""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class ProxSGD(Optimizer):
    """buf = momentum * buf + g;  p -= lr * buf;  p = sign(p) * max(|p| - lr * l1, 0)."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9, l1: float = 1e-4):
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if l1 < 0:
            raise ValueError(f"Invalid l1 value: {l1}")
        super().__init__(params, dict(lr=lr, momentum=momentum, l1=l1))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, threshold = group["lr"], group["lr"] * group["l1"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(p.grad)
                p.sub_(lr * buf)
                if threshold > 0:
                    p.copy_(p.sign() * (p.abs() - threshold).clamp_min(0))
        return loss
