"""Statistics from data: activation scales (``calibrate``) and BatchNorm running statistics
re-estimated with the quantized weights (``reestimate_batchnorm``, Nagel et al. 2022)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from ..buffers import batchnorm_buffers, restored
from .graph import failing_module
from .prepare import quantizers


def _inputs(batch, device) -> torch.Tensor:
    return (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)


def _run(model: nn.Module, x: torch.Tensor, what: str) -> None:
    try:
        model(x)
    except Exception as e:  # a shape or type error deep in the user's model: name where
        raise ValueError(
            f"{what}: {failing_module(model, e)} failed on input {tuple(x.shape)}: "
            f"{str(e).splitlines()[0][:200] or type(e).__name__}"
        ) from e


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> int:
    """Initialise activation scales from data, seen as training will see it.

    The model runs in train mode (BatchNorm normalises with batch statistics, as in QAT; in eval
    mode an untrained network's activations can vanish with depth), and the BatchNorm running
    statistics are restored afterwards.

    Args:
        model: a model from ``prepare_qat``.
        batches: an iterable of input tensors or (input, target) pairs.
        max_batches: stop after this many; None: all of them.

    Returns:
        The number of batches used.
    """
    acts = [q for _, q in quantizers(model, "activation")]
    was_training = model.training
    model.train()
    for q in acts:
        q.start_calibration()
    used = 0
    device = next(model.parameters()).device
    try:
        with restored(batchnorm_buffers(model)):
            for batch in itertools.islice(batches, max_batches):
                _run(model, _inputs(batch, device), "calibrate")
                used += 1
    finally:
        for q in acts:
            q.finish_calibration()
        model.train(was_training)
    if used == 0:
        raise ValueError("calibrate: no batches were given")
    return used


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> dict:
    """Re-estimate the running statistics of every BatchNorm with the model as it now computes
    (quantized weights): reset them, then average the batch statistics of up to ``max_batches``
    batches; every other module stays in eval mode (quantizer scales and dropout untouched).

    Returns how wrong the old statistics were, in units of the new ones: ``bn_mean_error`` = mean
    over channels of |old mean - new mean| / new std, ``bn_var_error`` = mean |old var / new var - 1|.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return {"bn_layers": 0}
    old = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    momenta, was_training = [m.momentum for m in bns], model.training
    device = next(model.parameters()).device
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    used = 0
    try:
        for batch in itertools.islice(batches, max_batches):
            _run(model, _inputs(batch, device), "reestimate_batchnorm")
            used += 1
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    if used == 0:
        for m, (mean, var) in zip(bns, old):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        raise ValueError("reestimate_batchnorm: no batches were given")
    mean_err = torch.cat(
        [((mu - m.running_mean).abs() / (m.running_var + m.eps).sqrt()) for m, (mu, _) in zip(bns, old)]
    )
    var_err = torch.cat([(v / (m.running_var + m.eps) - 1).abs() for m, (_, v) in zip(bns, old)])
    return {
        "bn_layers": len(bns),
        "bn_batches": used,
        "bn_mean_error": float(mean_err.mean()),
        "bn_var_error": float(var_err.mean()),
    }
