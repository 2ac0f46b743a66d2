"""The sub-byte and 16-bit forms of an exported QDQ graph (ONNX opset 21): UINT16 activations and
INT4 weight storage.

torch's TorchScript exporter writes opsets up to 20 and has no uint16 or int4 tensor type, so the
graph is exported at opset 20 with 16-bit activation zero points as int32 (``qdq.QuantDequant``),
converted to opset 21 by ONNX's version converter (20 -> 21 only widens Q/DQ's type lists), and
retyped here: the zero point of every QuantizeLinear that holds an int32 becomes UINT16 (no valid
QuantizeLinear has an int32 zero point; biases' int32 DequantizeLinear have no QuantizeLinear), and
weights become INT4 initializers (two values per byte, low nibble first) where their integers fit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx.numpy_helper
import onnx.version_converter

from ..errors import ExportError

TORCHSCRIPT_MAX_OPSET = 20
INT4_RANGE = (-8, 7)


def to_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` converted to ``opset`` by ONNX's version converter (unchanged when it is there)."""
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current == opset:
        return model
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as e:  # the converter raises RuntimeError or its own types, naming the op
        raise ExportError(f"ONNX's version converter cannot take the graph to opset {opset}: {e}") from None


def _inline_constant_aliases(graph: onnx.GraphProto) -> dict:
    """The graph's initializers by name, after inlining the Identity nodes the exporter writes where
    two modules hold equal constants (deduplicated: a zero point, a requantizer's copied scale)."""
    inits = {t.name: t for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    keep = [n for n in graph.node if n.output[0] not in alias or n.output[0] in {o.name for o in graph.output}]
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(keep)
    return inits


def uint16_activations(model: onnx.ModelProto) -> int:
    """Retype the int32 zero points of QuantizeLinear nodes, and of the DequantizeLinear nodes that
    read those quantizers, as UINT16 (a copy per quantizer, so nothing else that shares the
    initializer changes). Returns the number of 16-bit quantizers."""
    graph, inits = model.graph, _inline_constant_aliases(model.graph)
    readers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    count = 0
    for n in graph.node:
        zp = inits.get(n.input[2]) if n.op_type == "QuantizeLinear" and len(n.input) > 2 else None
        if zp is None or zp.data_type != onnx.TensorProto.INT32:
            continue
        value = onnx.numpy_helper.to_array(zp)
        if value.min() < 0 or value.max() > np.iinfo(np.uint16).max:
            raise ExportError(f"16-bit quantizer {n.name!r}: zero point {value} outside uint16")
        name = f"{n.output[0]}_zero_point_u16"
        graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.uint16), name))
        n.input[2] = name
        for dq in readers.get(n.output[0], []):
            if dq.op_type == "DequantizeLinear":
                dq.input[2] = name
        count += 1
    retyped = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[2].endswith("_u16")}
    stale = [v for v in graph.value_info if v.name in retyped]  # the exporter typed them int32
    for v in stale:
        graph.value_info.remove(v)
    return count


def int4_weights(model: onnx.ModelProto) -> list[str]:
    """Store every int8 weight initializer that a per-channel DequantizeLinear reads and whose
    integers lie in [-8, 7] as INT4, with an INT4 zero point (0). Returns the weights converted."""
    graph, inits = model.graph, _inline_constant_aliases(model.graph)
    converted = []
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3:
            continue
        w, zp = inits.get(n.input[0]), inits.get(n.input[2])
        if w is None or zp is None or len(w.dims) < 2:
            continue
        zeros = onnx.numpy_helper.to_array(zp)
        if w.data_type == onnx.TensorProto.INT8:
            values = onnx.numpy_helper.to_array(w)
            if values.min() < INT4_RANGE[0] or values.max() > INT4_RANGE[1] or zeros.any():
                continue
            _replace(graph, w, onnx.numpy_helper.from_array(values.astype(ml_dtypes.int4), w.name))
            converted.append(w.name)
        elif w.data_type != onnx.TensorProto.INT4:  # INT4 already: a weight two layers share
            continue
        zp4 = f"{n.name or w.name}_zero_point_int4"
        graph.initializer.append(onnx.numpy_helper.from_array(zeros.astype(ml_dtypes.int4), zp4))
        n.input[2] = zp4
    return converted


def _replace(graph: onnx.GraphProto, old: onnx.TensorProto, new: onnx.TensorProto) -> None:
    for i, t in enumerate(graph.initializer):
        if t.name == old.name:
            graph.initializer[i].CopyFrom(new)
            return


def activation_container(model: onnx.ModelProto) -> str:
    """uint16 when a QuantizeLinear of the graph writes 16-bit integers, else uint8."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    wide = any(
        n.op_type == "QuantizeLinear" and len(n.input) > 2 and types.get(n.input[2]) == onnx.TensorProto.UINT16
        for n in model.graph.node
    )
    return "uint16" if wide else "uint8"


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for n in graph.node for name in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
