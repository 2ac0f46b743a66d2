"""export_onnx: a QAT model -> an INT8 QDQ ONNX file that ONNX Runtime runs as integer kernels."""
from __future__ import annotations

import copy
import os
import warnings

import onnx
import torch
from torch import nn

from ..quant import FakeQuantize
from .freeze import freeze
from .integer_reference import integer_reference
from .target import Target, load_target


def _onnx_export(model: nn.Module, example: torch.Tensor, path: str, target: Target) -> None:
    dynamic = None if target.fixed_batch else {"input": {0: "batch"}, "logits": {0: "batch"}}
    if target.fixed_batch:
        example = example[:1].expand(target.fixed_batch, *example.shape[1:]).contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # dynamo=False: the TorchScript exporter honours autograd.Function.symbolic, which is how
        # the Q/DQ nodes are written (the dynamo exporter does not translate fake-quant, docs/export.md).
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=target.opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes=dynamic, do_constant_folding=True)
    onnx.checker.check_model(onnx.load(path))


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str, target: "str | Target | None" = None) -> dict:
    """Write the INT8 QDQ graph of a prepared QAT model to ``path``; returns what was done, with the
    frozen torch graph (``frozen``, float QDQ semantics) and its integer reference (``integer``).

    BatchNorm is folded, weights are int8 per-channel, activations uint8 per-tensor (sub-8-bit
    ranges kept by a Clip in the 8-bit container: int8 kernels, not 4-bit storage)."""
    target = load_target(target)
    frozen, report = freeze(model, target.weight_bits_max)
    frozen = frozen.cpu()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _onnx_export(frozen, example_input.detach().cpu(), path, target)
    return {"path": path, "target": target.name, "requantized_to_max_bits": report["requantized"], "frozen": frozen,
            "integer": integer_reference(frozen)}


def float_model(model: nn.Module) -> nn.Module:
    """The same network with every quantizer removed: the float baseline for size and latency."""
    m = copy.deepcopy(model).cpu().eval()
    for name, q in list(m.named_modules()):
        if isinstance(q, FakeQuantize):
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, nn.Identity())
    return m


def export_float_onnx(model: nn.Module, example_input: torch.Tensor, path: str, target: "str | Target | None" = None) -> str:
    _onnx_export(float_model(model), example_input.detach().cpu(), path, load_target(target))
    return path

