"""Graph utilities shared by quantizer placement (prepare_qat) and export (freeze).

A model is traced with torch.fx; ``QuantGraph`` classifies its nodes: the layers that carry
weights, the ops whose output an integer-only graph keeps quantized (anchors), the ops fused into
a preceding anchor (BatchNorm, ReLU), and the ops that keep values on the quantization grid
(max-pool, flatten), through which a quantized tensor stays quantized.
"""

from __future__ import annotations

import copy
import inspect
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import stochastic_depth

from .modules import QUANT_MODULES
from .traceable import DATA_MOVEMENT_FUNCS, MASK_FUNCS, make_traceable, visible_ops

# Ops with integer kernels whose output an integer-only graph keeps quantized.
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)
ANCHOR_MODULES = (*CONV_MODULES, nn.Linear, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)
ANCHOR_FUNCS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d, torch.mean}
ANCHOR_METHODS = {"mean"}
# Element-wise products and sums, matrix products and concatenations: integer kernels when every
# tensor input is quantized (QLinearAdd, QLinearMul, QLinearMatMul, QLinearConcat).
MULTI_INPUT_FUNCS = {
    operator.add,
    operator.iadd,
    torch.add,
    operator.mul,
    operator.imul,
    torch.mul,
    operator.matmul,
    torch.matmul,
    torch.bmm,
    torch.einsum,
    torch.cat,
    torch.concat,
}
MULTI_INPUT_METHODS = {"add", "add_", "mul", "mul_", "matmul", "bmm"}
# Ops fused into the preceding anchor (quantize after them, not before).
EXTEND_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Hardtanh)  # ReLU6 is a Hardtanh
EXTEND_FUNCS = {F.relu, torch.relu, F.relu6, F.hardtanh}
EXTEND_METHODS = {"relu", "relu_"}
# Ops that move values without changing them: a quantized input stays quantized. Dropout and
# stochastic depth count among them: identities at inference, where the grid matters (a quantizer
# after them would meet the one before them at export, and ORT merges such pairs).
PASS_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.Dropout,
    nn.Identity,
    nn.Flatten,
    nn.ZeroPad2d,
    nn.ChannelShuffle,
    nn.PixelShuffle,
)
PASS_FUNCS = {
    torch.flatten,
    F.max_pool1d,
    F.max_pool2d,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    stochastic_depth,
    F.pad,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.swapaxes,
    torch.squeeze,
    torch.unsqueeze,
    torch.roll,
    torch.chunk,
    torch.split,
    torch.unbind,
    operator.getitem,
    torch.channel_shuffle,
    F.pixel_shuffle,
} | DATA_MOVEMENT_FUNCS
PASS_METHODS = {
    "flatten",
    "view",
    "reshape",
    "contiguous",
    "permute",
    "transpose",
    "swapaxes",
    "squeeze",
    "unsqueeze",
    "expand",
    "repeat",
    "roll",
    "chunk",
    "split",
    "unbind",
    "unflatten",
}
# Ops whose output lies in [0, 1]: quantized with a fixed scale 1/2^bits (ORT's QLinearSoftmax assumes it).
UNIT_RANGE_MODULES = (nn.Softmax,)
UNIT_RANGE_FUNCS = {F.softmax, torch.softmax}
UNIT_RANGE_METHODS = {"softmax"}
# Functions that build a tensor from a shape (its values depend on no input's values).
TENSOR_FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.linspace, torch.eye}
# Ops whose result is a shape, a size or a count, not a tensor.
SIZE_METHODS = {"size", "dim", "numel"}
SIZE_ATTRS = {"shape", "ndim", "dtype", "device"}
UNSUPPORTED = (nn.Conv3d, nn.ConvTranspose3d, nn.RNNBase)


def node_is(node: fx.Node, modules: dict, mods: tuple, funcs: set, methods: set) -> bool:
    """Whether ``node`` calls one of the modules, functions or tensor methods given."""
    if node.op == "call_module":
        return isinstance(modules[node.target], mods)
    if node.op == "call_function":
        return node.target in funcs
    return node.op == "call_method" and node.target in methods


class QuantGraph:
    """Classifies the nodes of a traced model for quantizer placement and export."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.non_tensor = self._non_tensor_nodes()
        self.constant = self._constant_nodes()

    def _non_tensor_nodes(self) -> set[fx.Node]:
        """Nodes whose value is a shape, size or number (x.shape, x.size(1), H // p): never quantized."""
        out: set[fx.Node] = set()
        for n in self.gm.graph.nodes:
            size_of = (
                (n.op == "call_method" and n.target in SIZE_METHODS)
                or (n.op == "call_function" and n.target is getattr and n.args[1] in SIZE_ATTRS)
                or (n.op == "call_function" and n.target is len)
            )
            inputs = [a for a in n.all_input_nodes]
            derived = (
                n.op in ("call_function", "call_method")
                and inputs
                and all(a in out for a in inputs)
                and (n.target not in TENSOR_FACTORIES)
            )
            if size_of or derived:
                out.add(n)
        return out

    def _constant_nodes(self) -> set[fx.Node]:
        """Nodes computed from parameters, buffers and shapes alone (a relative position bias, an
        attention mask, a positional encoding built from the input's size): float constants, never
        quantized (folded by the exporter where no shape is dynamic)."""
        out: set[fx.Node] = set()
        for n in self.gm.graph.nodes:
            inputs = n.all_input_nodes
            from_constants = all(a in out or a in self.non_tensor for a in inputs) and (
                not inputs or any(a in out for a in inputs) or n.target in TENSOR_FACTORIES
            )
            if (
                n.op == "get_attr"
                or (n.op == "call_function" and n.target in MASK_FUNCS)
                or (n.op in ("call_function", "call_method", "call_module") and from_constants)
            ):
                out.add(n)
        return out

    def module(self, n: fx.Node) -> nn.Module | None:
        return self.modules.get(n.target) if n.op == "call_module" else None

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        """The tensor inputs of a node (a concat's list unpacked; shapes and numbers left out)."""
        args = node.args[0] if node.target in (torch.cat, torch.concat) else node.args
        return [a for a in args if isinstance(a, fx.Node) and a not in self.non_tensor]

    def is_multi_input(self, n: fx.Node) -> bool:
        """A sum, product or matrix product of two activations, or a concat: an integer kernel. x + 1,
        or x + a bias or mask computed from parameters, is a float op (and keeps the constant exact)."""
        if (
            n in self.non_tensor
            or n in self.constant
            or not node_is(n, self.modules, (), MULTI_INPUT_FUNCS, MULTI_INPUT_METHODS)
        ):
            return False
        if n.op == "call_function" and n.target in (torch.cat, torch.concat):
            return True
        return len([a for a in self.tensor_args(n) if a not in self.constant]) > 1

    def weight_layers(self) -> list[fx.Node]:
        """Conv and Linear layers on activations (not those computing a constant from parameters)."""
        return [
            n
            for n in self.gm.graph.nodes
            if n.op == "call_module" and type(self.modules[n.target]) in QUANT_MODULES and n not in self.constant
        ]

    def opaque_modules(self) -> dict[str, int]:
        """Modules traced as one call (timm's fx leaf modules, where their forward branches on values
        or shapes) that hold a conv or Linear, which then stays unquantized: count by type."""
        found: dict[str, int] = {}
        for n in self.gm.graph.nodes:
            m = self.module(n)
            if m is not None and type(m) not in QUANT_MODULES and any(type(d) in QUANT_MODULES for d in m.modules()):
                found[type(m).__name__] = found.get(type(m).__name__, 0) + 1
        return found

    def is_anchor(self, n: fx.Node) -> bool:
        if n.op == "placeholder":
            return True
        if n in self.non_tensor or n in self.constant:
            return False
        return node_is(n, self.modules, ANCHOR_MODULES, ANCHOR_FUNCS, ANCHOR_METHODS) or self.is_multi_input(n)

    def is_pass(self, n: fx.Node) -> bool:
        if n.op == "call_function" and n.target is F.pad and _pad_value(n) not in (None, 0):
            return False  # a constant off the grid (EfficientViT pads its values with ones): a float op
        return n not in self.non_tensor and node_is(n, self.modules, PASS_MODULES, PASS_FUNCS, PASS_METHODS)

    def is_unit_range(self, n: fx.Node) -> bool:
        return node_is(n, self.modules, UNIT_RANGE_MODULES, UNIT_RANGE_FUNCS, UNIT_RANGE_METHODS)

    def returns_tuple(self, n: fx.Node) -> bool:
        return (n.op == "call_function" and n.target in (torch.chunk, torch.split, torch.unbind)) or (
            n.op == "call_method" and n.target in ("chunk", "split", "unbind")
        )

    def source(self, n: fx.Node) -> fx.Node:
        """The node whose quantizer covers n: walk back through grid-preserving ops."""
        while self.is_pass(n) and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        return n

    def chain_end(self, n: fx.Node) -> fx.Node:
        """Follow an anchor through BatchNorm (after a conv) and activations with one user."""
        while len(n.users) == 1:
            (u,) = n.users
            if not node_is(u, self.modules, EXTEND_MODULES, EXTEND_FUNCS, EXTEND_METHODS):
                break
            if isinstance(self.module(u), nn.modules.batchnorm._BatchNorm) and not isinstance(
                self.module(n), CONV_MODULES
            ):
                break
            n = u
        return n

    def activation_sites(self, placement: str) -> list[fx.Node]:
        sites: dict[fx.Node, None] = {}
        nodes = list(self.gm.graph.nodes)
        if placement == "conv_inputs":
            for n in self.weight_layers():
                if isinstance(self.modules[n.target], CONV_MODULES):
                    sites[n.args[0]] = None
            return list(sites)
        for n in nodes:
            if self.is_anchor(n):
                sites[self.chain_end(n)] = None
        for n in nodes:
            if n.op == "call_module" and type(self.modules[n.target]) in QUANT_MODULES and n not in self.constant:
                inputs = self.tensor_args(n)[:1]
            elif self.is_multi_input(n):
                inputs = self.tensor_args(n)
            elif self.is_unit_range(n) and n not in self.constant:
                # A softmax of a quantized input runs as QLinearSoftmax (a table of exponentials); of a
                # float input (Swin V2's scaled cosine plus a position bias) as float Softmax, whose
                # exp approximation is ISA-specific MLAS code the integer reference cannot follow.
                inputs = self.tensor_args(n)[:1]
            else:
                continue
            for a in inputs:
                sites.setdefault(self.source(a), None)
        for a in self.output_sources():  # the model's outputs leave quantized (a distillation head's mean)
            sites.setdefault(a, None)
        return [n for n in nodes if n in sites]

    def output_sources(self) -> list[fx.Node]:
        out = next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")
        return [self.source(a) for a in out.all_input_nodes if a not in self.non_tensor and a not in self.constant]


def _pad_value(n: fx.Node):
    """The fill value of an F.pad call (None for the default 0 or a non-constant mode)."""
    mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else "constant")
    return n.kwargs.get("value", n.args[3] if len(n.args) > 3 else None) if mode == "constant" else None


def site_name(node: fx.Node) -> str:
    """A readable name for an activation site: the module's path, or the node's name.

    A module called twice (torchvision's BasicBlock reuses its ReLU) gets fx's suffix: relu_1."""
    if node.op != "call_module":
        return node.name
    return node.target + node.name[len(node.target.replace(".", "_")) :]


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted ``path``."""
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class _Tracer(fx.Tracer):
    """fx's tracer with extra leaf modules (traced as one call each)."""

    def __init__(self, leaves: tuple = (), autowrap_functions: tuple = ()):
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _tracers(model: nn.Module):
    """Plain fx first; for a timm model then timm's own registries of the functions, and then of the
    modules, that fx cannot trace (timm is imported only for its models: an optional dependency)."""
    yield _Tracer()
    if type(model).__module__.startswith("timm."):
        from timm.layers import _fx as timm_fx

        functions = tuple(timm_fx._autowrap_functions)
        yield _Tracer(autowrap_functions=functions)
        yield _Tracer(tuple(timm_fx._leaf_modules), functions)


def failing_module(model: nn.Module, error: Exception) -> str:
    """'module NAME (Type)' for the innermost module of ``model`` whose code raised ``error``."""
    names = {id(m): n for n, m in model.named_modules()}
    tb, found = error.__traceback__, ""
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = f"module {names[id(owner)] or '(root)'!r} ({type(owner).__name__})"
        tb = tb.tb_next
    return found or f"{type(model).__name__}"


def trace(model: nn.Module) -> fx.GraphModule:
    """A torch.fx trace of a copy of ``model``, its attention made visible (traceable.py);
    ValueError naming the module and the op that fails."""
    for name, m in model.named_modules():
        if isinstance(m, UNSUPPORTED):
            raise ValueError(f"module {name!r} ({type(m).__name__}) is not supported by prepare_qat")
    for m in model.modules():  # timm's position-bias caches hold non-leaf tensors after an eval forward,
        if isinstance(getattr(m, "attention_bias_cache", None), dict):  # which deepcopy refuses; timm
            m.attention_bias_cache = {}  # itself clears them on train()
    copied = make_traceable(copy.deepcopy(model))
    error = None
    for tracer in _tracers(model):
        try:
            with visible_ops():
                gm = fx.GraphModule(copied, tracer.trace(copied), type(model).__name__)
            break
        except Exception as e:  # fx raises many types; the user needs the module and op that failed
            error = e
    else:
        raise ValueError(
            f"cannot trace {failing_module(copied, error)} with torch.fx: {error}".splitlines()[0]
        ) from error
    _training_at_run_time(gm)
    _layers_as_modules(gm, copied)
    return gm


def _layer_call(root: nn.Module, n: fx.Node) -> tuple[str, nn.Module] | None:
    """(path, module) when n is F.linear / F.conv2d on the weight and bias of one Linear / Conv2d
    module (a subclass whose forward calls the functional op, such as timm's Linear), else None."""
    if n.op != "call_function" or n.target not in (F.linear, F.conv2d):
        return None
    args = list(n.args) + [n.kwargs.get(k) for k in ("weight", "bias") if k in n.kwargs]
    w, b = (args + [None, None, None])[1:3]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target.endswith(".weight")):
        return None
    path = w.target[: -len(".weight")]
    m = root.get_submodule(path)  # the traced module holds only the parameters; the type is the root's
    wants_bias = isinstance(b, fx.Node) and b.op == "get_attr" and b.target == f"{path}.bias"
    if not (wants_bias == (m.bias is not None) and (b is None or wants_bias)):
        return None
    if n.target is F.linear and isinstance(m, nn.Linear):
        return path, nn.Linear(m.in_features, m.out_features, m.bias is not None)
    if (
        n.target is F.conv2d
        and isinstance(m, nn.Conv2d)
        and tuple(n.args[3:]) == (m.stride, m.padding, m.dilation, m.groups)
    ):
        return path, nn.Conv2d(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.bias is not None
        )
    return None


def _layers_as_modules(gm: fx.GraphModule, root: nn.Module) -> None:
    """A Linear or Conv2d subclass that calls F.linear / F.conv2d on its own weights appears in the
    trace as a functional op on parameters, which prepare_qat would leave unquantized. Call it as a
    plain nn.Linear / nn.Conv2d holding the same parameters (the state_dict keys stay)."""
    for n in list(gm.graph.nodes):
        found = _layer_call(root, n)
        if found is None:
            continue
        path, plain = found
        old = root.get_submodule(path)
        plain.weight, plain.bias = old.weight, old.bias
        set_module(gm, path, plain)
        with gm.graph.inserting_before(n):
            call = gm.graph.call_module(path, (n.args[0],))
        n.replace_all_uses_with(call)
        gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()


# Functions that take a ``training`` flag, and the position of that argument.
RANDOM_IN_TRAINING = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, stochastic_depth: 3}


def _training_at_run_time(gm: fx.GraphModule) -> None:
    """fx records ``F.dropout(x, p, self.training)`` with the mode the model had when traced; make the
    flag read the module's mode when it runs, so that .train() and .eval() switch it as before."""
    training = None
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in RANDOM_IN_TRAINING:
            continue
        if training is None:
            with gm.graph.inserting_before(next(iter(gm.graph.nodes))), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no underlying reference": it is the module's own flag
                training = gm.graph.get_attr("training")
        bound = inspect.signature(n.target).bind(*n.args, **n.kwargs)
        bound.arguments["training"] = training
        n.args, n.kwargs = bound.args, bound.kwargs
    gm.recompile()
