"""The recipe's model: built by name and prepared for QAT."""
from __future__ import annotations

from torch import nn

from ..errors import RecipeError
from ..models import build_model
from ..quant import QATConfig, prepare_qat


def build_qat_model(recipe: dict, info: dict) -> nn.Module:
    """The recipe's model, prepared for QAT (not calibrated). ``info``: num_classes, in_channels, image_size."""
    m = recipe["model"]
    kw = {k: m[k] for k in ("cifar_stem", "widths", "width", "dropout") if k in m}
    model = build_model(m["name"], info["num_classes"], image_size=info["image_size"], in_channels=info["in_channels"], **kw)
    try:
        return prepare_qat(model, QATConfig.from_dict(recipe["quant"]))
    except ValueError as e:  # a pattern that matches nothing, a module that cannot be quantized
        raise RecipeError(str(e)) from None
