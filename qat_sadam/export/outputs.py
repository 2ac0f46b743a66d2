"""A model's outputs as the exported file holds them: one tensor ("logits"), or a dict, tuple or
list of tensors (a segmentation model's {"out", "aux"}, a detection head's (scores, boxes)), each
a named graph output in the order the model returns them."""

from __future__ import annotations

import torch

from ..errors import ExportError

SINGLE_OUTPUT = "logits"


def output_list(value) -> list[torch.Tensor]:
    """The output tensors in file order: a dict's values, a tuple's or list's items, or the tensor."""
    items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else [value]
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        kinds = sorted({type(t).__name__ for t in items})
        raise ExportError(
            f"the model returns {type(value).__name__} of {', '.join(kinds) or 'nothing'}: export takes a tensor, "
            "or a dict, tuple or list of tensors (not nested)"
        )
    return items


def output_names(value) -> list[str]:
    """The graph output names: "logits" for one tensor, a dict's keys, output_0... for a tuple or list."""
    output_list(value)
    if isinstance(value, dict):
        return [str(k) for k in value]
    if isinstance(value, (tuple, list)):
        return [f"output_{i}" for i in range(len(value))]
    return [SINGLE_OUTPUT]
