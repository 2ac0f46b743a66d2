"""XNNPACK, the CPU kernels of Android and iOS apps, through ExecuTorch: the frozen torch graph is
rewritten into the quantized form ExecuTorch's XNNPACK partitioner matches (PT2E's
``quantized_decomposed`` quantize/dequantize ops), exported with torch.export, lowered with
``to_edge_transform_and_lower(XnnpackPartitioner)`` into a .pte program and run by ExecuTorch's
runtime. The rewrite maps, it does not re-quantize: the same scales, zero points and integers.

- Activations: XNNPACK's quantized tensors are int8, so our uint8 zero point z becomes z - 128.
- Each consumer of a quantized tensor gets its own dequantize node (PT2E's pattern; a shared one
  leaves all but one consumer in float).
- Sub-8-bit ranges: XNNPACK keeps a quantized tensor's scale and zero point but not the narrower
  quant_min/quant_max of the quantize op (its conv output range is then unbounded). A clamp to the
  range's dequantized bounds, between a quantize/dequantize pair, is fused into the producing
  kernel as its output range, which keeps the range.
- Identities (nn.Identity, eval-mode dropout) are removed first: torch.export drops them anyway,
  and a dequantize feeding one would end up shared by the identity's consumers, which joins the
  partitions before and after it into a cycle at a residual add ("Invalid partition, found
  dependency cycles" on ResNet-18 W4A4, whose CIFAR stem replaces the max pool by an Identity).
- Concatenations: XNNPACK's quantized concatenate takes inputs on the output's grid (ExecuTorch
  fails to load the program otherwise), so each input is first requantized to the output's scale
  and zero point, what QLinearConcat does inside: Q_out(cat(x, y)) = cat(Q_out(x), Q_out(y)).
- Weights: int8 per output channel (dequantize_per_channel); the bias as float, which XNNPACK
  quantizes to int32 with scale s_in * s_w, giving back our int32 bias.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ...errors import ValidationError
from ...quant.graph import node_is
from ..qdq import QConv, QLinear, QuantDequant
from .base import ModelFiles, Runtime, Session, Tolerance, first_line, missing_modules

INT8_SHIFT = 128  # uint8 container -> int8: q_int8 = q_uint8 - 128, zero point alike


def _ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed

    return torch.ops.quantized_decomposed


def _qdq_args(m: QuantDequant) -> tuple:
    return (float(m.scale), int(m.zero_point) - INT8_SHIFT, -INT8_SHIFT, m.hi - INT8_SHIFT, torch.int8)


def _rewrite_quant_dequant(gm: fx.GraphModule, node: fx.Node, m: QuantDequant) -> None:
    qd, args = _ops(), _qdq_args(m)
    g = gm.graph
    with g.inserting_before(node):
        q = g.call_function(qd.quantize_per_tensor.default, (node.args[0], *args))
        if m.hi < 255:  # keep the sub-8-bit range: clamp as a quantized op the producer absorbs
            zp = float(m.zero_point)
            lo, hi = float((0 - zp) * m.scale), float((m.hi - zp) * m.scale)
            clamped = g.call_function(
                torch.ops.aten.clamp.default, (g.call_function(qd.dequantize_per_tensor.default, (q, *args)), lo, hi)
            )
            q = g.call_function(qd.quantize_per_tensor.default, (clamped, *args))
    for user in list(node.users):
        with g.inserting_before(user):
            dq = g.call_function(qd.dequantize_per_tensor.default, (q, *args))
        user.replace_input_with(node, dq)
    g.erase_node(node)


def _rewrite_layer(gm: fx.GraphModule, node: fx.Node, m: QConv | QLinear, int4_linear: bool) -> None:
    qd, g = _ops(), gm.graph
    # XNNPACK lowers 4-bit per-channel weights (range [-8, 7], its qc4w) for Linear only: a 4-bit conv
    # fails to lower ("convert_to_qc4w: expecting input tensor to be 2d"), so convs keep the int8 container.
    four = int4_linear and isinstance(m, QLinear) and -8 <= int(m.weight_int.min()) and int(m.weight_int.max()) <= 7
    lo, hi = (-8, 7) if four else (-127, 127)
    prefix = node.target.replace(".", "_")
    gm.register_buffer(f"{prefix}_w", m.weight_int.clone())
    gm.register_buffer(f"{prefix}_ws", m.weight_scale.clone())
    gm.register_buffer(f"{prefix}_wz", m.weight_zero_point.long())
    gm.register_buffer(f"{prefix}_b", m.bias_int.float() * m.bias_scale)
    with g.inserting_before(node):
        w = g.call_function(
            qd.dequantize_per_channel.default,
            (
                g.get_attr(f"{prefix}_w"),
                g.get_attr(f"{prefix}_ws"),
                g.get_attr(f"{prefix}_wz"),
                0,
                lo,
                hi,
                torch.int8,
            ),
        )
        b = g.get_attr(f"{prefix}_b")
        if isinstance(m, QConv):
            out = g.call_function(m.function, (node.args[0], w, b, m.stride, m.padding, m.dilation, m.groups))
        else:
            out = g.call_function(F.linear, (node.args[0], w, b))
    node.replace_all_uses_with(out)
    g.erase_node(node)


def _concat_inputs_on_output_grid(gm: fx.GraphModule, modules: dict) -> None:
    """Before each concatenation whose output is quantized, its output quantizer on every input."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.cat, torch.concat) or len(node.users) != 1:
            continue
        (user,) = node.users
        if not (user.op == "call_module" and isinstance(modules.get(user.target), QuantDequant)):
            continue
        with gm.graph.inserting_before(node):
            inputs = [gm.graph.call_module(user.target, (a,)) for a in node.args[0]]
        node.args = (inputs, *node.args[1:])


def pt2e_form(frozen: fx.GraphModule, int4_linear: bool = False) -> fx.GraphModule:
    """The frozen graph with our Q/DQ modules and integer layers as quantized_decomposed ops; with
    ``int4_linear``, linear layers whose integers fit [-8, 7] as 4-bit weights."""
    gm = copy.deepcopy(frozen).eval()
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node_is(node, modules, (nn.Identity, nn.Dropout), set(), set()):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    _concat_inputs_on_output_grid(gm, modules)
    for node in list(gm.graph.nodes):
        m = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(m, QuantDequant):
            _rewrite_quant_dequant(gm, node, m)
        elif isinstance(m, (QConv, QLinear)):
            _rewrite_layer(gm, node, m, int4_linear)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _placement(edge_program) -> dict:
    """How many subgraphs XNNPACK took, and the ops left to ExecuTorch's portable CPU kernels."""
    graph = edge_program.exported_program().graph
    delegated, left = 0, {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(n.target, "__name__", str(n.target))
        if "call_delegate" in name:
            delegated += 1
        elif name != "getitem":
            left[name] = left.get(name, 0) + 1
    return {"XNNPACK delegate subgraphs": delegated, "portable kernels (not delegated)": left or "none"}


class ExecutorchXnnpack(Runtime):
    name = "executorch-xnnpack"
    install = "pip install executorch  (or: pip install -e '.[runtimes]')"
    what = "ExecuTorch with the XNNPACK delegate (Android/iOS CPU kernels), .pte program, batch 1"
    tolerances = {
        "uint8": Tolerance(
            8.0,
            0.95,
            "XNNPACK requantizes with its own fp32 arithmetic (not ORT's float32 scale ratio and "
            "rounding order): ties can round apart; measured within 1 LSB on ResNet-18 and MobileNetV2 "
            "(docs/guide/runtimes.md)",
        )
    }
    refuses = {"uint16": "XNNPACK's quantized operators take 8-bit activations"}

    def missing(self) -> str | None:
        return missing_modules("executorch")

    def load(self, files: ModelFiles, int8: bool = True) -> Session:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # optional extra
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime as EtRuntime

        model = files.frozen if int8 else files.float_torch
        if model is None or files.example is None:
            raise ValidationError(
                "executorch-xnnpack lowers the frozen torch graph: validate a run (--run RUN_DIR), "
                "not a model file alone"
            )
        example = torch.from_numpy(np.ascontiguousarray(files.example[:1], dtype=np.float32))
        try:
            int4 = files.int4_onnx is not None  # the target stores 4-bit weights as 4 bits
            program = torch.export.export(pt2e_form(model, int4) if int8 else copy.deepcopy(model).eval(), (example,))
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            pte = os.path.join(files.work_dir, "model.pte" if int8 else "float.pte")
            with open(pte, "wb") as f:
                f.write(edge.to_executorch().buffer)
            method = EtRuntime.get().load_program(pte).load_method("forward")
        except Exception as e:  # torch.export / ExecuTorch raise many types; the first line names the op
            raise ValidationError(f"ExecuTorch/XNNPACK cannot lower the model: {first_line(e)}") from None

        def run(x: np.ndarray) -> np.ndarray:
            return np.concatenate([method.execute([torch.from_numpy(x[i : i + 1])])[0].numpy() for i in range(len(x))])

        return Session(
            run,
            _placement(edge),
            {
                "precision": (
                    f"int8 activations (zero point - 128), int8 weights{', 4-bit Linear weights' if int4 else ''}"
                    if int8
                    else "float32"
                ),
                "pte_bytes": os.path.getsize(pte),
            },
        )
