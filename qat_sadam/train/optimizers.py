"""Optimizers by name, as recipes and `compare` name them."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import RecipeError
from ..optim import ProxSGD, SAdam, sadam_param_groups

_ADAM = {"lr", "betas", "eps", "weight_decay", "scale_lr_ratio"}
SCALE_LR_RATIO = 0.01  # learnable quantizer scales train at 1% of the weights' lr (see sadam_param_groups)
KEYS = {
    "adamw": _ADAM,
    "sadam": _ADAM
    | {
        "lgi",
        "k",
        "lam",
        "sigma",
        "probe_every",
        "rho_ema",
        "stabilize_eps",
        "radius_multiple",
        "probe_scale",
        "scale_lam",
    },
    "prox_sgd": {"lr", "momentum", "l1"},
    "sgd": {"lr", "momentum", "weight_decay", "nesterov"},
}


def check_optimizer(cfg: dict) -> None:
    """Validate an optimizer section without a model (so that bad recipes fail before training)."""
    name = cfg.get("name")
    if name not in KEYS:
        raise RecipeError(f"unknown optimizer {name!r}; choose one of {', '.join(KEYS)}")
    unknown = sorted(set(cfg) - KEYS[name] - {"name"})
    if unknown:
        raise RecipeError(
            f"unknown recipe key 'optimizer.{unknown[0]}' for {name} (known: {', '.join(sorted(KEYS[name]))})"
        )
    for k, v in cfg.items():
        if k not in ("name", "lgi", "betas", "nesterov") and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise RecipeError(
                f"recipe key 'optimizer.{k}' must be a number, got {v!r}"
                + (" (YAML reads 5e-4 as text: write 5.0e-4)" if isinstance(v, str) else "")
            )
    if "betas" in cfg:
        b = cfg["betas"]
        if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, (int, float)) for x in b)):
            raise RecipeError(f"recipe key 'optimizer.betas' must be a list of two numbers, got {b!r}")
    try:
        build_optimizer(cfg, nn.Linear(1, 1))
    except (ValueError, TypeError) as e:
        raise RecipeError(f"optimizer: {e}") from None


def build_optimizer(cfg: dict, model: nn.Module, seed: int = 0, probe_buffers=None) -> torch.optim.Optimizer:
    """Adam-family optimizers get S-Adam's grouping (decay on weights only, none on biases, BatchNorm
    and quantizer scales) so that comparisons differ in the optimizer alone."""
    kw = {k: v for k, v in cfg.items() if k != "name"}
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    name = cfg["name"]
    if name == "prox_sgd":
        return ProxSGD(model.parameters(), **kw)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **kw)
    wd = kw.pop("weight_decay", 1e-2)
    radius = {k: kw[k] for k in ("probe_scale",) if k in kw}  # SAdam reads it too: for groups without a radius
    if "radius_multiple" in kw:
        if kw.get("lgi") == "reference":
            raise ValueError(
                "radius_multiple applies to lgi='residual' only (the reference estimator's probe step is sigma)"
            )
        radius["radius_multiple"] = kw.pop("radius_multiple")
    scale_lr = kw.get("lr", 1e-3) * kw.pop("scale_lr_ratio", SCALE_LR_RATIO)
    groups = sadam_param_groups(model, weight_decay=wd, scale_lam=kw.pop("scale_lam", 0.0), scale_lr=scale_lr, **radius)
    if name == "adamw":
        return torch.optim.AdamW(
            [{k: v for k, v in g.items() if k in ("name", "params", "weight_decay", "lr")} for g in groups], **kw
        )
    if kw.get("lgi") == "reference":  # the published method: one probed group (quantizer scales apart, as above)
        probed = [p for g in groups if g["name"] != "quant_scales" for p in g["params"]]
        return SAdam(
            [{"params": probed}] + [g for g in groups if g["name"] == "quant_scales"], weight_decay=wd, seed=seed, **kw
        )
    return SAdam(groups, seed=seed, probe_buffers=probe_buffers, **kw)
