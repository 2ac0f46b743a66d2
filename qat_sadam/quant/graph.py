"""Graph utilities shared by quantizer placement (prepare_qat) and export (freeze).

A model is traced with torch.fx; ``QuantGraph`` classifies its nodes: the layers that carry
weights, the ops whose output an integer-only graph keeps quantized (anchors), the ops fused into
a preceding anchor (BatchNorm, ReLU), and the ops that keep values on the quantization grid
(max-pool, flatten), through which a quantized tensor stays quantized.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules import QUANT_MODULES

# Ops whose output an integer-only graph keeps quantized.
ANCHOR_MODULES = (nn.Conv2d, nn.Linear, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
ANCHOR_FUNCS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul,
                torch.cat, F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean}
ANCHOR_METHODS = {"add", "add_", "mul", "mul_", "mean"}
# Ops fused into the preceding anchor (quantize after them, not before).
EXTEND_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.Hardtanh)  # ReLU6 is a Hardtanh
EXTEND_FUNCS = {F.relu, torch.relu, F.relu6, F.hardtanh}
EXTEND_METHODS = {"relu", "relu_"}
# Ops that keep values on the quantization grid: a quantized input stays quantized.
PASS_MODULES = (nn.MaxPool2d, nn.Dropout, nn.Identity, nn.Flatten)
PASS_FUNCS = {torch.flatten, F.max_pool2d, F.dropout, torch.reshape}
PASS_METHODS = {"flatten", "view", "reshape", "contiguous"}
# Ops that need every tensor input quantized.
NEEDS_QUANT_INPUT_FUNCS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul, torch.cat}
UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
               nn.RNNBase, nn.MultiheadAttention)


def node_is(node: fx.Node, modules: dict, mods: tuple, funcs: set, methods: set) -> bool:
    """Whether ``node`` calls one of the modules, functions or tensor methods given."""
    if node.op == "call_module":
        return isinstance(modules[node.target], mods)
    if node.op == "call_function":
        return node.target in funcs
    return node.op == "call_method" and node.target in methods


def tensor_args(node: fx.Node) -> list[fx.Node]:
    args = node.args[0] if node.target is torch.cat else node.args
    return [a for a in args if isinstance(a, fx.Node)]


class QuantGraph:
    """Classifies the nodes of a traced model for quantizer placement and export."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())

    def module(self, n: fx.Node) -> nn.Module | None:
        return self.modules.get(n.target) if n.op == "call_module" else None

    def weight_layers(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes
                if n.op == "call_module" and type(self.modules[n.target]) in QUANT_MODULES]

    def is_anchor(self, n: fx.Node) -> bool:
        if n.op == "placeholder":
            return True
        if not node_is(n, self.modules, ANCHOR_MODULES, ANCHOR_FUNCS, ANCHOR_METHODS):
            return False
        # x + 1 or x * 0.5 is not an integer op; a tensor-tensor add/mul or a concat is.
        return n.target not in NEEDS_QUANT_INPUT_FUNCS or n.target is torch.cat or len(tensor_args(n)) > 1

    def is_pass(self, n: fx.Node) -> bool:
        return node_is(n, self.modules, PASS_MODULES, PASS_FUNCS, PASS_METHODS)

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
            if isinstance(self.module(u), nn.BatchNorm2d) and not isinstance(self.module(n), nn.Conv2d):
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
                n.op == "call_function" and n.target in NEEDS_QUANT_INPUT_FUNCS)
            for a in (tensor_args(n)[:1] if n.op == "call_module" else tensor_args(n)) if needs else []:
                sites.setdefault(self.source(a), None)
        return [n for n in nodes if n in sites]


def site_name(node: fx.Node) -> str:
    """A readable name for an activation site: the module's path, or the node's name.

    A module called twice (torchvision's BasicBlock reuses its ReLU) gets fx's suffix: relu_1."""
    if node.op != "call_module":
        return node.name
    return node.target + node.name[len(node.target.replace(".", "_")):]


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted ``path``."""
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def trace(model: nn.Module) -> fx.GraphModule:
    """A torch.fx trace of a copy of ``model``; ValueError naming the module or op that fails."""
    for name, m in model.named_modules():
        if isinstance(m, UNSUPPORTED):
            raise ValueError(f"module {name!r} ({type(m).__name__}) is not supported by prepare_qat")
    try:
        return fx.symbolic_trace(copy.deepcopy(model))
    except Exception as e:  # fx raises many types; the user needs the op that failed
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx: {e}".splitlines()[0]) from e
