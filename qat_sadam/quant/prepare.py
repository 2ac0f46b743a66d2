"""prepare_qat: turn an ordinary PyTorch model into a QAT model.

The model is traced with torch.fx (``graph.py`` says where quantizers go); convs (1-D, 2-D,
transposed) and Linear layers become their ``modules.py`` counterparts and activation FakeQuantize
modules are inserted as call_module nodes.
BatchNorm stays as it is during QAT and is folded at export: per-channel symmetric weight
quantization commutes with the per-channel BN scale, so folding keeps the integer weights.
"""

from __future__ import annotations

import warnings

from torch import fx, nn

from .config import QATConfig, activation_spec_at
from .fake_quant import FakeQuantize
from .graph import QuantGraph, set_module, site_name, trace
from .modules import QUANT_MODULES


def prepare_qat(model: nn.Module, config: QATConfig | dict | None = None) -> fx.GraphModule:
    """A fake-quantized copy of ``model``, ready for QAT: weight quantizers on every conv (1-D, 2-D,
    transposed) and linear layer (per output channel), activation quantizers where an integer graph
    needs them (per tensor), straight-through gradients, BatchNorm kept for training (it is folded at export).

    Args:
        model: any module torch.fx can trace (torchvision and timm classifiers, your own); not changed.
        config: a ``QATConfig``, or the mapping ``QATConfig.from_dict`` takes (``{"bits": 4}``: W4A4
            with 8-bit first and last layers); None: W8A8.

    Returns:
        A torch.fx.GraphModule computing the model with fake quantization; calibrate it before training.

    Raises:
        ValueError: the model has no conv or linear layer, a module cannot be quantized, or an
            override pattern matches nothing.
    """
    config = config if isinstance(config, QATConfig) else QATConfig.from_dict(config)
    gm = trace(model)
    g = QuantGraph(gm)
    layers = g.weight_layers()
    if not layers:
        raise ValueError(f"{type(model).__name__} has no conv or linear layer to quantize")
    opaque = g.opaque_modules()
    if opaque:  # said, not silent: these layers run in float, and the export's fusion check fails on them
        warnings.warn(
            f"prepare_qat: torch.fx traced {', '.join(f'{k} x{v}' for k, v in opaque.items())} as opaque calls "
            "(their forward branches on values or shapes): the conv and linear layers inside stay float"
        )
    sites = g.activation_sites(config.placement)
    edge_sites = set()
    if config.first_last_bits is not None:
        first, last = layers[0], layers[-1]
        edge_sites = {g.source(first.args[0]), g.source(last.args[0]), g.chain_end(last), *g.output_sources()}

    def bits(name: str, kind: str, default: int, is_edge: bool) -> int | None:
        b = max(default, config.first_last_bits) if is_edge and config.first_last_bits is not None else default
        for o in config.matching(name):
            if not o.enabled:
                return None
            b = o.bits_for(kind) or b
        return b

    names = [n.target for n in layers] + [site_name(n) for n in sites]
    for o in config.overrides:
        if not any(o in config.matching(nm) for nm in names):
            raise ValueError(
                f"quant.overrides: pattern {o.pattern!r} matches no quantizable module "
                f"(names look like {', '.join(names[:4])})"
            )

    for n in layers:
        layer = g.modules[n.target]
        b = bits(n.target, "weight", config.weight.bits, n in (layers[0], layers[-1]))
        if b is not None:
            set_module(gm, n.target, QUANT_MODULES[type(layer)].from_float(layer, config.weight.with_(bits=b)))

    gm.activation_quantizers = nn.ModuleDict()
    gm.activation_site_names = {}  # quantizer key -> the site name quant.overrides patterns match
    for n in sites:
        name = site_name(n)
        b = bits(name, "activation", config.activation.bits, n in edge_sites)
        if b is None:
            continue
        key = name.replace(".", "_")
        if hasattr(nn.ModuleDict, key):  # a node named after a Module method (x.to(dtype) is node 'to')
            key += "_site"
        spec = activation_spec_at(config.activation, b)
        if g.is_unit_range(n):
            spec = spec.with_(scale_mode="frozen", fixed_scale=2.0**-b)
        gm.activation_quantizers[key] = FakeQuantize(spec, "activation")
        gm.activation_site_names[key] = name
        with gm.graph.inserting_after(n):
            q = gm.graph.call_module(f"activation_quantizers.{key}", (n,))
        n.replace_all_uses_with(q, delete_user_cb=lambda u, q=q: u is not q)
    gm.graph.lint()
    gm.recompile()
    gm.qat_config = config
    gm.opaque_modules = opaque
    return gm


def quantizers(model: nn.Module, kind: str | None = None) -> list[tuple[str, FakeQuantize]]:
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantize) and (kind is None or m.kind == kind)
    ]
