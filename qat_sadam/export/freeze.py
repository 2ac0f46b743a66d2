"""freeze: a QAT model -> an inference graph with integer weights and fixed Q/DQ points.

- BatchNorm is folded into the preceding conv. Weights are symmetric per output channel, so
  folding only rescales each channel: the integer weights stay those trained, the scale
  becomes s * |a| and the sign of a moves into the integers (narrow range: -q never overflows).
  A BatchNorm that follows no conv (DenseNet's pre-activation) becomes a per-channel affine.
- Dropout and stochastic depth are removed (identities at inference). What is computed from
  parameters alone (Swin V2's position-bias MLP, its exp(logit scale)) is evaluated here, in torch,
  and becomes a buffer: left in the graph, ONNX Runtime folds it with its own exp and sigmoid, whose
  last bits differ from torch's, and the integer reference would start from other constants. For
  export, constants built from static shapes are folded as well (EdgeNeXt's positional encoding,
  whose conv would otherwise run in float on a tensor ORT cannot fold: it has the dynamic batch).
- Activation quantizers become QuantDequant nodes in a uint8 container: the n-bit range
  [qmin, qmax] is shifted to [0, qmax - qmin] (a Min keeps it there below 8 bits).
- Biases become int32 at scale s_in * s_w, as ONNX Runtime's integer kernels need.
- Grid-preserving ops (max-pool, flatten, reshape) get a QuantDequant with their input's
  parameters after them, so that every integer op sees quantized inputs.
The frozen torch model computes what the ONNX graph computes; it is the exporter's source and
the parity reference. Modules are from ``qdq.py``; each has an ONNX translation.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

from ..errors import ExportError
from ..quant import QUANT_CONVS, QUANT_TRANSPOSED, FakeQuantize, QuantLinear
from ..quant.graph import RANDOM_IN_TRAINING, QuantGraph, set_module
from ..quant.modules import QUANT_MODULES, transposed_to_conv_layout
from .qdq import ChannelAffine, QConv, QLinear, QuantDequant, ZeroUpsample

QUANT_LAYERS = (*QUANT_CONVS, QuantLinear)


def _requantize(w_int: torch.Tensor, scale: torch.Tensor, max_bits: int | None):
    """Narrow weights to at most ``max_bits`` (e.g. 7 for CPUs without VNNI): new integers and scales."""
    qmax = int(w_int.abs().amax())
    if max_bits is None or qmax <= 2 ** (max_bits - 1) - 1:
        return w_int, scale, False
    new_max = 2 ** (max_bits - 1) - 1
    ratio = w_int.abs().flatten(1).amax(1).clamp_min(1).float() / new_max
    ratio = torch.where(ratio > 1, ratio, torch.ones_like(ratio))
    shape = (-1,) + (1,) * (w_int.dim() - 1)
    new = torch.round(w_int.float() / ratio.view(shape)).clamp(-new_max, new_max).to(torch.int32)
    return new, scale * ratio, True


def _folded(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm | None):
    """(integer weight, per-output-channel weight scale, float bias) with BatchNorm folded in; the
    weight with output channels first (a transposed conv's in conv layout, ``transposed_to_conv_layout``)."""
    q: FakeQuantize = layer.weight_quant
    weight = layer.weight.detach()
    w_int, step = q.integer(weight).to(torch.int32), q.step_size(weight).expand_as(weight)
    if isinstance(layer, QUANT_TRANSPOSED):
        w_int, step = (transposed_to_conv_layout(t, layer.groups) for t in (w_int, step))
    scale = step.flatten(1)[:, 0].clone()
    bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros_like(scale)
    if bn is not None:
        a = (
            bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            if bn.affine
            else 1 / torch.sqrt(bn.running_var + bn.eps)
        )
        beta = bn.bias.detach() if bn.affine else torch.zeros_like(a)
        bias = (bias - bn.running_mean) * a + beta
        sign = torch.sign(a).to(torch.int32)
        w_int = w_int * sign.view((-1,) + (1,) * (w_int.dim() - 1))
        scale = scale * a.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return w_int, scale, bias


def freeze(
    qat_model: fx.GraphModule, weight_bits_max: int | None = None, example_input: torch.Tensor | None = None
) -> tuple[fx.GraphModule, dict]:
    """The frozen inference graph of a prepared QAT model, and a report (requantized layers). With an
    example input (the exporter's), constants built from its static shapes are folded too."""
    if not isinstance(qat_model, fx.GraphModule) or not hasattr(qat_model, "activation_quantizers"):
        raise ExportError(
            f"export needs a model from qat_sadam.prepare_qat (got an unprepared {type(qat_model).__name__})"
        )
    gm = copy.deepcopy(qat_model).eval()
    g = QuantGraph(gm)
    modules = g.modules
    qdq_of: dict[fx.Node, QuantDequant] = {}
    report = {"requantized": []}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if isinstance(m, FakeQuantize) and m.kind == "activation":
            if m.spec.per_channel:
                raise ExportError(
                    f"activation quantizer {node.target!r} is per-channel; integer kernels need per-tensor"
                )
            qdq = QuantDequant.from_quantizer(m)
            set_module(gm, node.target, qdq)
            qdq_of[node] = qdq
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not _follows_conv(node, modules):
            # No conv to fold into: the next conv's input quantizer sits between, so folding forward
            # would move the BatchNorm past a quantizer and change the numbers. A per-channel affine
            # in float between DQ and Q computes exactly what the QAT model computes.
            set_module(gm, node.target, ChannelAffine.from_batchnorm(m))
        elif isinstance(m, tuple(QUANT_MODULES)) and not isinstance(m, QUANT_LAYERS) and node not in g.constant:
            raise ExportError(
                f"module {node.target!r} ({type(m).__name__}) has no weight quantizer; an integer graph "
                "needs every conv and linear quantized (check quant.overrides)"
            )
        elif isinstance(m, nn.Dropout):
            _bypass(gm, node)
    for node in list(gm.graph.nodes):  # dropout and stochastic depth in functional form: identities at inference
        if node.op == "call_function" and node.target in RANDOM_IN_TRAINING:
            _bypass(gm, node)
    _absorb_clips(gm, modules, qdq_of)
    _fold_constants(gm, g, example_input)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], QUANT_LAYERS):
            continue
        layer = modules[node.target]
        src = g.source(node.args[0])
        if src not in qdq_of:
            raise ExportError(f"the input of {node.target!r} is not quantized; cannot export it as an integer kernel")
        bn = folded_batchnorm(node, modules)
        w_int, w_scale, bias = _folded(layer, None if bn is None else modules[bn.target])
        w_int, w_scale, changed = _requantize(w_int, w_scale, weight_bits_max)
        if changed:
            report["requantized"].append(node.target)
        if isinstance(layer, QUANT_TRANSPOSED):
            _transposed_as_conv(gm, node, layer, w_int, w_scale, bias, qdq_of[src])
        elif isinstance(layer, QuantLinear):
            set_module(gm, node.target, QLinear.from_parts(w_int, w_scale, bias, qdq_of[src].scale))
        else:
            if layer.padding_mode != "zeros":
                raise ExportError(
                    f"{node.target!r}: padding_mode {layer.padding_mode!r} is not supported by the exporter"
                )
            geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            set_module(gm, node.target, QConv.from_parts(w_int, w_scale, bias, qdq_of[src].scale, **geometry))
        if bn is not None:
            bn.replace_all_uses_with(node)
            gm.graph.erase_node(bn)
    g.modules = dict(gm.named_modules())
    _requantize_after_pass_ops(gm, g, qdq_of)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm, report


def _follows_conv(node: fx.Node, modules: dict) -> bool:
    """A BatchNorm right after a quantized conv that nothing else reads: folded into it."""
    prev = node.args[0]
    return isinstance(prev, fx.Node) and folded_batchnorm(prev, modules) is node


def folded_batchnorm(node: fx.Node, modules: dict) -> fx.Node | None:
    """The BatchNorm node folded into the quantized conv ``node``: its only user, if a BatchNorm."""
    (user,) = node.users if len(node.users) == 1 else (None,)
    is_bn = (
        user is not None
        and user.op == "call_module"
        and isinstance(modules.get(user.target), nn.modules.batchnorm._BatchNorm)
    )
    return user if is_bn and node.op == "call_module" and isinstance(modules[node.target], QUANT_CONVS) else None


def upsample_name(layer: str) -> str:
    """The ZeroUpsample submodule in front of the conv that a transposed conv ``layer`` becomes."""
    return layer.replace(".", "_") + "_zero_upsample"


def _transposed_as_conv(gm: fx.GraphModule, node: fx.Node, layer, w_int, w_scale, bias, qdq: QuantDequant) -> None:
    """A transposed conv -> ZeroUpsample, its input's Q/DQ (the conv reads a dequantized input, as
    ORT's integer kernel needs) and a stride-1 QConv with the kernel flipped (``qdq.ZeroUpsample``)."""
    if len(node.args) > 1 or node.kwargs:
        raise ExportError(f"{node.target!r}: a transposed conv called with output_size cannot be exported")
    k, d, p = layer.kernel_size, layer.dilation, layer.padding
    before = tuple(di * (ki - 1) - pi for ki, di, pi in zip(k, d, p))
    if min(before) < 0:
        raise ExportError(
            f"{node.target!r}: padding {p} exceeds dilation * (kernel - 1); no zero-upsampling form to export"
        )
    after = tuple(b + o for b, o in zip(before, layer.output_padding))
    w_conv = w_int.flip(tuple(range(2, w_int.dim())))
    geometry = dict(stride=1, padding=0, dilation=d, groups=layer.groups)
    set_module(gm, node.target, QConv.from_parts(w_conv, w_scale, bias, qdq.scale, **geometry))
    name = upsample_name(node.target)
    gm.add_submodule(name, ZeroUpsample(layer.stride, before, after))
    gm.add_submodule(name + "_requant", copy.deepcopy(qdq))
    with gm.graph.inserting_before(node):
        up = gm.graph.call_module(name, (node.args[0],))
        node.args = (gm.graph.call_module(name + "_requant", (up,)),)


def _fold_constants(gm: fx.GraphModule, g: QuantGraph, example_input: torch.Tensor | None) -> None:
    """Replace each tensor that no input's values reach by a buffer holding its value: without an
    example input, those computed from parameters and buffers alone; with one, also those computed
    from static shapes (EdgeNeXt's positional encoding, a conv on a grid built from H and W), when
    their value does not depend on the batch size or is the same for every image and only broadcast
    into element-wise sums and products (checked at batch 1 and 2)."""
    wanted = [
        n
        for n in gm.graph.nodes
        if n in g.constant and n.op != "get_attr" and any(u not in g.constant for u in n.users)
    ]
    with torch.no_grad():
        if example_input is None:
            values = _parameter_only_values(gm, g)
        else:
            x = example_input[:1].to(next(gm.parameters()).device)
            at1, at2 = (_recorded(gm, set(wanted), torch.cat([x] * b)) for b in (1, 2))
            values = {n: at1[n] for n in wanted if _batch_independent(n, at1[n], at2[n])}
    for i, n in enumerate(n for n in wanted if isinstance(values.get(n), torch.Tensor)):
        name = f"folded_constant_{i}"
        gm.register_buffer(name, values[n].detach().clone())
        with gm.graph.inserting_before(n):
            n.replace_all_uses_with(gm.graph.get_attr(name))
    gm.graph.eliminate_dead_code()


def _parameter_only_values(gm: fx.GraphModule, g: QuantGraph) -> dict:
    interp, pure = fx.Interpreter(gm), set()
    for n in gm.graph.nodes:
        if n in g.constant and (
            n.op == "get_attr" or (n.all_input_nodes and all(a in pure for a in n.all_input_nodes))
        ):
            pure.add(n)
            interp.env[n] = interp.run_node(n)
    return interp.env


def _recorded(gm: fx.GraphModule, nodes: set, x: torch.Tensor) -> dict:
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in nodes:
                values[n] = out
            return out

    Recorder(gm).run(x)
    return values


def _batch_independent(n: fx.Node, at1, at2) -> bool:
    """Equal at batch 1 and 2 up to float rounding (a conv's last bits change with the batch's
    blocking), or the same per image and only broadcast into element-wise ops."""
    if not (isinstance(at1, torch.Tensor) and isinstance(at2, torch.Tensor)):
        return False
    if at1.shape != at2.shape:
        broadcast_only = all(u.op in ("call_function", "call_method") and u.target in _BROADCASTING for u in n.users)
        if not (broadcast_only and at1.dim() > 0 and at1.shape[0] == 1 and at2.shape == (2, *at1.shape[1:])):
            return False
        at1 = at1.expand_as(at2)
    if not at1.is_floating_point():
        return torch.equal(at1, at2)
    return torch.allclose(at2, at1, rtol=1e-5, atol=1e-6 * float(at1.abs().amax())) if at1.numel() else True


_BROADCASTING = {operator.add, torch.add, operator.mul, torch.mul, operator.sub, torch.sub, "add", "mul", "sub"}


def _bypass(gm: fx.GraphModule, node: fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


def _absorb_clips(gm, modules: dict, qdq_of: dict) -> None:
    """ReLU6 (Hardtanh(0, m)) before a quantizer with zero point 0 -> ReLU and the quantizer's upper
    bound lowered to round(m / scale): exactly the same values, and ORT fuses Conv-ReLU-Q into an
    integer kernel, which it cannot do with a Clip whose range is narrower than the Q's."""
    for node in list(gm.graph.nodes):
        m = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(m, nn.Hardtanh) or m.min_val != 0 or len(node.users) != 1:
            continue
        (user,) = node.users
        qdq = qdq_of.get(user)
        if qdq is None or int(qdq.zero_point) != 0 or qdq.container != "uint8":  # a uint16 range has no Min form
            continue
        qdq.hi = min(qdq.hi, int(torch.round(torch.tensor(float(m.max_val)) / qdq.scale)))
        with gm.graph.inserting_after(node):
            relu = gm.graph.call_function(torch.relu, (node.args[0],))
        node.replace_all_uses_with(relu)
        gm.graph.erase_node(node)


def _requantize_after_pass_ops(gm, g: QuantGraph, qdq_of: dict) -> None:
    """A Q/DQ pair with its source's parameters after each chain of grid-preserving ops (reshape,
    permute, max-pool, window partition), so that the op after it reads a dequantized input, as ORT's
    integer kernels need (the values are already on the grid: the pair changes nothing)."""
    for node in list(gm.graph.nodes):
        if (
            not g.is_pass(node)
            or node.op == "call_module"
            and isinstance(g.modules[node.target], (nn.Identity, nn.Dropout))
        ):
            continue
        if g.returns_tuple(node) or (node.users and all(g.is_pass(u) for u in node.users)):
            continue  # requantized at the end of the chain, or element by element after a split
        src = g.source(node)
        if src not in qdq_of or any(
            u.op == "call_module" and isinstance(g.modules.get(u.target), QuantDequant) for u in node.users
        ):
            continue
        name = f"requant_{node.name}"
        qdq = copy.deepcopy(qdq_of[src])
        gm.add_submodule(name, qdq)
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda u, q=q: u is not q)
        g.modules[name], qdq_of[q] = qdq, qdq  # a pass-op chain (max-pool, then flatten) requantizes each step


FOLD_TOLERANCE_LSB = 1.0  # int32 bias rounding and float summation order: well under one output LSB
# A 16-bit output LSB is 256 times finer than the 8-bit one the int32 bias (rounded at s_in * s_w) is
# sized for: there the same tolerance is 256 LSB16, one 8-bit LSB of the same range (MobileNetV2
# W8A16: 18.7 LSB16 from the bias rounding alone).
WIDE_FOLD_FACTOR = 256


def _collapsed_channels(q) -> list[int]:
    """Output channels whose learned weight scale is at or below the quantizer's floor (trained through
    zero): their bias, rounded at s_in * floor, leaves int32 and the deployed layer parts from the QAT one."""
    return torch.nonzero(q.scale.detach().flatten() <= q.spec.scale_floor).flatten().tolist()


def _output_quantizer(gm: fx.GraphModule, node: fx.Node) -> QuantDequant | None:
    """The first QuantDequant downstream of ``node`` (its scale: the LSB the output lands in)."""
    seen, frontier = set(), list(node.users)
    while frontier:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(m, QuantDequant):
            return m
        frontier += list(n.users)
    return None


@torch.no_grad()
def fold_check(qat_model: fx.GraphModule, x: torch.Tensor) -> dict:
    """Each frozen conv/linear (BatchNorm folded, int32 bias) against the QAT model's conv + BatchNorm
    in eval mode on the same input, in LSB of the quantizer its output goes to: a wrong fold (a lost
    shift, a sign, a mean) moves a layer by many LSB while the integer reference and ORT still agree
    with each other. Weights are not narrowed here (weight_bits_max), so the difference is the fold's."""
    model = qat_model.eval()
    frozen, _ = freeze(model)
    g = QuantGraph(model)
    captured, hooks = {}, []
    for node in model.graph.nodes:
        if node.op != "call_module" or not isinstance(g.modules[node.target], QUANT_LAYERS):
            continue
        bn = folded_batchnorm(node, g.modules)
        hooks.append(
            g.modules[node.target].register_forward_hook(
                lambda m, i, o, k=node.target: captured.setdefault(k, {}).update(input=i[0])
            )
        )
        hooks.append(
            g.modules[node.target if bn is None else bn.target].register_forward_hook(
                lambda m, i, o, k=node.target: captured.setdefault(k, {}).update(output=o.clone())
            )
        )  # before in-place ReLUs
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    nodes = {n.target: n for n in frozen.graph.nodes if n.op == "call_module"}
    layers, tolerance = {}, {}
    for name, c in captured.items():
        q = _output_quantizer(frozen, nodes[name])
        x_in = c["input"]
        if isinstance(g.modules[name], QUANT_TRANSPOSED):
            x_in = frozen.get_submodule(upsample_name(name))(x_in)
        diff = (frozen.get_submodule(name)(x_in) - c["output"]).abs().max().item()
        layers[name] = diff / float(q.scale) if q is not None else None
        tolerance[name] = FOLD_TOLERANCE_LSB * (WIDE_FOLD_FACTOR if q is not None and q.container == "uint16" else 1)
    worst = max((v for v in layers.values() if v is not None), default=0.0)
    bad = sorted(k for k, v in layers.items() if v is not None and v > tolerance[k])
    wide = any(t > FOLD_TOLERANCE_LSB for t in tolerance.values())
    collapsed = {k: _collapsed_channels(g.modules[k].weight_quant) for k in bad}
    return {
        "ok": not bad,
        "max_lsb": worst,
        "collapsed_scales": {k: v for k, v in collapsed.items() if v},
        "tolerance_lsb": FOLD_TOLERANCE_LSB,
        "tolerance_note": f"x{WIDE_FOLD_FACTOR} for 16-bit outputs" if wide else "",
        "layers": layers,
        "failing": bad,
    }
