"""Param groups for S-Adam on a QAT model: probe radii read from the quantizers' current steps."""

from __future__ import annotations

import torch
from torch import nn

from ..quant import FakeQuantize
from .sadam import rms

DEFAULT_RADIUS_MULTIPLE = 1.0


def quantized_weights(model: nn.Module) -> dict[torch.Tensor, FakeQuantize]:
    """Each fake-quantized weight parameter and the quantizer that reads it."""
    return {
        m.weight: m.weight_quant
        for m in model.modules()
        if isinstance(getattr(m, "weight_quant", None), FakeQuantize)
        and isinstance(getattr(m, "weight", None), nn.Parameter)
    }


class QuantStepRadius:
    """Probe radius: ``multiple`` x the current quantization step of a quantized weight (per channel
    where the scale is per channel); ``probe_scale`` x RMS for any other tensor."""

    def __init__(self, model: nn.Module, multiple: float = DEFAULT_RADIUS_MULTIPLE, probe_scale: float = 0.01):
        self.quantizers = quantized_weights(model)
        self.multiple, self.probe_scale = multiple, probe_scale

    def __call__(self, p: torch.Tensor):
        q = self.quantizers.get(p)
        if q is None:
            return self.probe_scale * rms(p)
        return self.multiple * q.step_size(p)


def sadam_param_groups(
    model: nn.Module,
    weight_decay: float = 1e-2,
    radius_multiple: float = DEFAULT_RADIUS_MULTIPLE,
    lam: float | None = None,
    scale_lam: float = 0.0,
    scale_lr: float | None = None,
    probe_scale: float = 0.01,
) -> list[dict]:
    """S-Adam's parameter groups for a QAT model (AdamW takes them too). Adam moves every parameter
    by about lr per step whatever its size, so scales of 1e-3 need a far smaller lr than weights or
    they cross zero within a few steps.

    Args:
        model: a model from ``prepare_qat`` (or any module).
        weight_decay: decoupled decay of the weights; biases, BatchNorm and scales get none.
        radius_multiple: the residual estimator's probe radius, in quantization steps of each weight.
        lam: the damping strength of the weights' group; None: the optimizer's default.
        scale_lam: damping of the quantizer scales (0: not damped).
        scale_lr: the scales' learning rate; None: the optimizer's.
        probe_scale: the radius, in RMS of the tensor, of a weight without a quantizer.

    Returns:
        Up to three groups (empty ones left out): ``weights`` (decayed, probed, damped), ``other``
        (biases, BatchNorm: no decay, not damped), ``quant_scales`` (learnable scales).
    """
    scale_ids = {
        id(m.scale) for m in model.modules() if isinstance(m, FakeQuantize) and isinstance(m.scale, nn.Parameter)
    }
    weights, others, scales = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (scales if id(p) in scale_ids else weights if p.dim() > 1 else others).append(p)
    weight_group = dict(
        name="weights",
        params=weights,
        weight_decay=weight_decay,
        probe_radius=QuantStepRadius(model, radius_multiple, probe_scale),
    )
    if lam is not None:
        weight_group["lam"] = lam
    scale_group = dict(
        name="quant_scales",
        params=scales,
        weight_decay=0.0,
        lam=scale_lam,
        **({"lr": scale_lr} if scale_lr is not None else {}),
    )
    groups = [weight_group, dict(name="other", params=others, weight_decay=0.0, lam=0.0), scale_group]
    return [g for g in groups if g["params"]]
