"""Snapshot and restore of module buffers, for forward passes that must leave no trace."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn


def batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Running statistics (and batch counters) of every BatchNorm layer."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


@contextmanager
def restored(tensors: Iterable[torch.Tensor]):
    """Run a block, then put the given tensors back exactly as they were."""
    tensors = list(tensors)
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
