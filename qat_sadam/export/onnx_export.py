"""export_onnx: a QAT model -> an INT8 QDQ ONNX file that ONNX Runtime runs as integer kernels."""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import onnx
import onnx.numpy_helper
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import ExportError
from ..quant import FakeQuantize, QATConfig
from ..quant.graph import failing_module, set_module
from .freeze import freeze
from .integer_reference import integer_reference
from .ort_format import write_ort
from .outputs import output_names
from .retype import (
    TORCHSCRIPT_MAX_OPSET,
    activation_container,
    drop_unused_initializers,
    int4_weights,
    to_opset,
    uint16_activations,
)
from .target import Target, load_target


class Replicate(nn.Module):
    """Adaptive average pooling from h x w to (k h) x (l w): each value copied into a k x l block
    (nearest-neighbour upsampling, exact), which ONNX expresses where adaptive pooling cannot."""

    def __init__(self, factor: tuple[int, int]):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.factor, mode="nearest")


def _exportable_pooling(model: nn.Module, example: torch.Tensor) -> None:
    """The ONNX exporter takes adaptive average pooling only where the input size is a multiple of
    the output size; where the output is a multiple of the input (VGG's 7x7 pool of a 1x1 map at
    small inputs) the pooling is a replication. Sizes come from a run on the example input."""
    if not isinstance(model, fx.GraphModule):
        return
    ShapeProp(model).propagate(example)
    for node in model.graph.nodes:
        m = model.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(m, nn.AdaptiveAvgPool2d):
            continue
        (h, w), (oh, ow) = node.args[0].meta["tensor_meta"].shape[-2:], node.meta["tensor_meta"].shape[-2:]
        if h % oh == 0 and w % ow == 0:
            continue
        if oh % h or ow % w:
            raise ExportError(
                f"module {node.target!r} (AdaptiveAvgPool2d) pools {h}x{w} to {oh}x{ow}: neither size "
                "divides the other, which ONNX cannot express; export at an input size where one does"
            )
        set_module(model, node.target, Replicate((oh // h, ow // w)))


def _onnx_export(model: nn.Module, example: torch.Tensor, path: str, target: Target) -> str:
    """Write ``model`` as ONNX for ``target``; returns its activation container (uint8 or uint16)."""
    if target.fixed_batch:
        example = example[:1].expand(target.fixed_batch, *example.shape[1:]).contiguous()
    with torch.no_grad():
        names = output_names(model.eval()(example))
    dynamic = None if target.fixed_batch else {n: {0: "batch"} for n in ("input", *names)}
    _exportable_pooling(model, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # dynamo=False: the TorchScript exporter honours autograd.Function.symbolic, which is how
        # the Q/DQ nodes are written (the dynamo exporter does not translate fake-quant, docs/guide/export.md).
        try:
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=False,
                opset_version=min(target.opset, TORCHSCRIPT_MAX_OPSET),
                input_names=["input"],
                output_names=names,
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
        except Exception as e:  # the exporter's errors name the op it cannot translate
            raise ExportError(
                f"the ONNX exporter refused {failing_module(model, e)}: "
                f"{str(e).splitlines()[0][:240] or type(e).__name__}"
            ) from None
    m = onnx.load(path)
    _flatten_as_reshape(m.graph)
    m = to_opset(m, target.opset)
    if uint16_activations(m):
        drop_unused_initializers(m.graph)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    return activation_container(m)


def _int4_copy(path: str) -> tuple[str, list[str]]:
    """``path`` with its 4-bit weights stored as INT4, written beside it as NAME.int4.onnx."""
    m = onnx.load(path)
    converted = int4_weights(m)
    drop_unused_initializers(m.graph)
    onnx.checker.check_model(m, full_check=True)
    out = os.path.splitext(path)[0] + ".int4.onnx"
    onnx.save(m, out)
    return out, converted


def check_target_fits(config: QATConfig, target: Target) -> None:
    """A QAT configuration's bit widths against what the target's files hold: one-line ExportErrors
    (checked before training a recipe that exports, and again at export)."""
    act_bits = {config.activation.bits} | {o.bits_for("activation") for o in config.overrides} - {None}
    refused = sorted(act_bits - set(target.activation_bits or act_bits))
    if refused:
        raise ExportError(
            f"target {target.name} takes activations of {' or '.join(map(str, target.activation_bits))} bits; "
            f"this model has {refused[0]}-bit ones"
        )
    if 16 in act_bits and target.activation_type == "uint8":
        raise ExportError(
            f"16-bit activations and target {target.name} runs uint8 activations only; export to a profile "
            "with activation_type: uint16 (qnn-htp)"
        )
    bits = config.weight.bits
    if target.weight_storage == "int4" and 4 < bits < 8:
        raise ExportError(
            f"target {target.name} stores weights as INT4 and this model's have {bits} bits, which INT4 cannot "
            "hold: train at 4 bits (--bits W4A8), or export to a profile with weight_storage: int8"
        )


def _stores_int4(model: nn.Module, target: Target) -> bool:
    return target.weight_storage == "int4" and model.qat_config.weight.bits <= 4


def _flatten_as_reshape(graph: onnx.GraphProto) -> None:
    """Flatten(axis=1) as Reshape(0, -1), the same op: ORT's QDQ propagation moves a DequantizeLinear
    forward through Reshape but not through Flatten, so a Transpose -> Flatten between a DQ and a
    Gemm (timm's ConvNeXt head: LayerNorm2d, flatten, fc) left the Gemm in float."""
    nodes = list(graph.node)
    for i, n in enumerate(nodes):
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if n.op_type != "Flatten" or axis != 1:
            continue
        shape = onnx.numpy_helper.from_array(np.array([0, -1], dtype=np.int64), name=f"{n.output[0]}_shape")
        graph.initializer.append(shape)
        nodes[i] = onnx.helper.make_node("Reshape", [n.input[0], shape.name], list(n.output), name=n.name)
    del graph.node[:]
    graph.node.extend(nodes)


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str, target: "str | Target | None" = None) -> dict:
    """Write the QDQ ONNX graph of a QAT model: BatchNorm folded, weights int8 per channel,
    activations per tensor in uint8 (2-8 bits: sub-8-bit ranges kept inside the 8-bit container) or,
    for 16-bit activations on a profile with ``activation_type: uint16``, uint16 at opset 21. A
    profile with ``weight_storage: int4`` also gets NAME.int4.onnx: the same graph with every weight
    of 4 bits or fewer stored as INT4, for runtimes that compute with it (ORT CPU's integer kernels
    take the int8 file). A profile listing ``ort`` among its ``formats`` (mobile-arm) also gets
    NAME.ort, ONNX Runtime's mobile format. A model returning a dict, tuple or list of tensors gets one named graph
    output each (the dict's keys, ``output_0``...; a single tensor is ``logits``).

    Args:
        model: a calibrated (and usually fine-tuned) model from ``prepare_qat``, in eval mode.
        example_input: one input batch of the shape the file takes (a profile's ``fixed_batch`` wins).
        path: the .onnx file to write.
        target: a shipped profile's name (``cpu-x86``, ``mobile-arm``: ``qat-sadam targets``), a
            profile YAML path or a ``Target``; None: the defaults.

    Returns:
        A dict: ``path``, ``ort_path`` (None unless the profile lists ``ort``), ``int4_path`` (None
        without INT4 storage), ``int4_weights`` (the weights
        stored as INT4), ``activation_type`` (uint8 or uint16), ``target``, ``requantized_to_max_bits``
        (layers narrowed to the target's weight container), ``frozen`` (the folded torch graph, float
        QDQ semantics) and ``integer`` (its integer reference: what the integer kernels compute, in torch).

    Raises:
        ExportError: a module that has no integer form; bit widths the target's files cannot hold.
    """
    target = load_target(target)
    frozen, report = freeze(model, target.weight_bits_max, example_input.detach())
    frozen = frozen.cpu()
    check_target_fits(model.qat_config, target)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    activation_type = _onnx_export(frozen, example_input.detach().cpu(), path, target)
    int4_path, int4 = _int4_copy(path) if _stores_int4(model, target) else (None, [])
    return {
        "path": path,
        "ort_path": write_ort(path) if "ort" in target.formats else None,
        "int4_path": int4_path,
        "int4_weights": int4,
        "activation_type": activation_type,
        "target": target.name,
        "requantized_to_max_bits": report["requantized"],
        "frozen": frozen,
        "integer": integer_reference(frozen),
    }


def float_model(model: nn.Module) -> nn.Module:
    """The same network with every quantizer removed: the float baseline for size and latency."""
    m = copy.deepcopy(model).cpu().eval()
    for name, q in list(m.named_modules()):
        if isinstance(q, FakeQuantize):
            set_module(m, name, nn.Identity())
    return m


def export_float_onnx(
    model: nn.Module, example_input: torch.Tensor, path: str, target: "str | Target | None" = None
) -> str:
    _onnx_export(float_model(model), example_input.detach().cpu(), path, load_target(target))
    return path
