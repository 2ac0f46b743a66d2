"""prepare_qat: turn an ordinary PyTorch model into a QAT model; calibrate: set scales from data.

The model is traced with torch.fx; Conv2d/Linear become QuantConv2d/QuantLinear and
activation FakeQuantize modules are inserted as call_module nodes in the traced graph.
BatchNorm stays as it is during QAT and is folded at export: per-channel symmetric weight
quantization commutes with the per-channel BN scale, so folding keeps the integer weights.
"""
from __future__ import annotations

import copy
import itertools
import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..buffers import batchnorm_buffers, restored
from .config import QATConfig
from .fake_quant import FakeQuantize
from .modules import QUANT_MODULES

# Ops whose output an integer-only graph keeps quantized.
_ANCHOR_MODULES = (nn.Conv2d, nn.Linear, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_ANCHOR_FUNCS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul,
                 torch.cat, F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean}
_ANCHOR_METHODS = {"add", "add_", "mul", "mul_", "mean"}
# Ops fused into the preceding anchor (quantize after them, not before).
_EXTEND_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.Hardtanh)  # ReLU6 is a Hardtanh
_EXTEND_FUNCS = {F.relu, torch.relu, F.relu6, F.hardtanh}
_EXTEND_METHODS = {"relu", "relu_"}
# Ops that keep values on the quantization grid: a quantized input stays quantized.
_PASS_MODULES = (nn.MaxPool2d, nn.Dropout, nn.Identity, nn.Flatten)
_PASS_FUNCS = {torch.flatten, F.max_pool2d, F.dropout, torch.reshape}
_PASS_METHODS = {"flatten", "view", "reshape", "contiguous"}
# Ops that need every tensor input quantized.
_NEEDS_QUANT_INPUT_FUNCS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul, torch.cat}
_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.RNNBase, nn.MultiheadAttention)


def _is(node: fx.Node, modules: dict, mods: tuple, funcs: set, methods: set) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], mods)
    if node.op == "call_function":
        return node.target in funcs
    return node.op == "call_method" and node.target in methods


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    args = node.args[0] if node.target is torch.cat else node.args
    return [a for a in args if isinstance(a, fx.Node)]


class _Graph:
    """Classifies the nodes of a traced model for quantizer placement."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())

    def weight_layers(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes
                if n.op == "call_module" and type(self.modules[n.target]) in QUANT_MODULES]

    def is_anchor(self, n: fx.Node) -> bool:
        if n.op == "placeholder":
            return True
        if not _is(n, self.modules, _ANCHOR_MODULES, _ANCHOR_FUNCS, _ANCHOR_METHODS):
            return False
        # x + 1 or x * 0.5 is not an integer op; a tensor-tensor add/mul or a concat is.
        return n.target not in _NEEDS_QUANT_INPUT_FUNCS or n.target is torch.cat or len(_tensor_args(n)) > 1

    def is_pass(self, n):
        return _is(n, self.modules, _PASS_MODULES, _PASS_FUNCS, _PASS_METHODS)

    def source(self, n: fx.Node) -> fx.Node:
        """The node whose quantizer covers n: walk back through grid-preserving ops."""
        while self.is_pass(n) and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        return n

    def chain_end(self, n: fx.Node) -> fx.Node:
        """Follow an anchor through BatchNorm (after a conv) and activations with one user."""
        while len(n.users) == 1:
            (u,) = n.users
            if not _is(u, self.modules, _EXTEND_MODULES, _EXTEND_FUNCS, _EXTEND_METHODS):
                break
            if u.op == "call_module" and isinstance(self.modules[u.target], nn.BatchNorm2d) and not (
                    n.op == "call_module" and isinstance(self.modules[n.target], nn.Conv2d)):
                break
            n = u
        return n

    def activation_sites(self, placement: str) -> list[fx.Node]:
        sites: dict[fx.Node, None] = {}
        nodes = list(self.gm.graph.nodes)
        if placement == "conv_inputs":
            for n in self.weight_layers():
                if isinstance(self.modules[n.target], nn.Conv2d):
                    sites[n.args[0]] = None
            return list(sites)
        for n in nodes:
            if self.is_anchor(n):
                sites[self.chain_end(n)] = None
        for n in nodes:
            needs = (n.op == "call_module" and type(self.modules[n.target]) in QUANT_MODULES) or (
                n.op == "call_function" and n.target in _NEEDS_QUANT_INPUT_FUNCS)
            for a in (_tensor_args(n)[:1] if n.op == "call_module" else _tensor_args(n)) if needs else []:
                sites.setdefault(self.source(a), None)
        return [n for n in nodes if n in sites]


def site_name(node: fx.Node) -> str:
    """A readable name for an activation site: the module's path, or the node's name.

    A module called twice (torchvision's BasicBlock reuses its ReLU) gets fx's suffix: relu_1."""
    if node.op != "call_module":
        return node.name
    return node.target + node.name[len(node.target.replace(".", "_")):]


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _trace(model: nn.Module) -> fx.GraphModule:
    for name, m in model.named_modules():
        if isinstance(m, _UNSUPPORTED):
            raise ValueError(f"module {name!r} ({type(m).__name__}) is not supported by prepare_qat")
    try:
        return fx.symbolic_trace(copy.deepcopy(model))
    except Exception as e:  # fx raises many types; the user needs the op that failed
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx: {e}".splitlines()[0]) from e


def prepare_qat(model: nn.Module, config: QATConfig | dict | None = None) -> fx.GraphModule:
    """Return a fake-quantized copy of ``model`` (a torch.fx.GraphModule), ready for QAT."""
    config = config if isinstance(config, QATConfig) else QATConfig.from_dict(config)
    gm = _trace(model)
    g = _Graph(gm)
    layers = g.weight_layers()
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    sites = g.activation_sites(config.placement)
    edge_sites = set()
    if config.first_last_bits is not None:
        first, last = layers[0], layers[-1]
        edge_sites = {g.source(first.args[0]), g.source(last.args[0]), g.chain_end(last)}

    def bits(name: str, kind: str, default: int, is_edge: bool) -> int | None:
        b = config.first_last_bits if is_edge and config.first_last_bits is not None else default
        for o in config.matching(name):
            if not o.enabled:
                return None
            b = o.bits_for(kind) or b
        return b

    names = [n.target for n in layers] + [site_name(n) for n in sites]
    for o in config.overrides:
        if not any(o in config.matching(nm) for nm in names):
            raise ValueError(f"quant.overrides: pattern {o.pattern!r} matches no quantizable module "
                             f"(names look like {', '.join(names[:4])})")

    for n in layers:
        layer = g.modules[n.target]
        b = bits(n.target, "weight", config.weight.bits, n in (layers[0], layers[-1]))
        if b is not None:
            _set_module(gm, n.target, QUANT_MODULES[type(layer)].from_float(layer, config.weight.with_(bits=b)))

    gm.activation_quantizers = nn.ModuleDict()
    for n in sites:
        name = site_name(n)
        b = bits(name, "activation", config.activation.bits, n in edge_sites)
        if b is None:
            continue
        key = name.replace(".", "_")
        gm.activation_quantizers[key] = FakeQuantize(config.activation.with_(bits=b), "activation")
        with gm.graph.inserting_after(n):
            q = gm.graph.call_module(f"activation_quantizers.{key}", (n,))
        n.replace_all_uses_with(q, delete_user_cb=lambda u, q=q: u is not q)
    gm.graph.lint()
    gm.recompile()
    gm.qat_config = config
    return gm


def quantizers(model: nn.Module, kind: str | None = None) -> list[tuple[str, FakeQuantize]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, FakeQuantize) and (kind is None or m.kind == kind)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> int:
    """Initialise activation scales from data, seen as training will see it.

    The model runs in train mode (BatchNorm normalises with batch statistics, as in QAT; in eval
    mode an untrained network's activations can vanish with depth), and the BatchNorm running
    statistics are restored afterwards. ``batches`` yields inputs or (input, target) pairs.
    Returns the number of batches used.
    """
    acts = [q for _, q in quantizers(model, "activation")]
    was_training = model.training
    model.train()
    for q in acts:
        q.start_calibration()
    used = 0
    device = next(model.parameters()).device
    try:
        with restored(batchnorm_buffers(model)):
            for batch in itertools.islice(batches, max_batches):
                model((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
                used += 1
    finally:
        for q in acts:
            q.finish_calibration()
        model.train(was_training)
    if used == 0:
        raise ValueError("calibrate: no batches were given")
    return used
