"""QATConfig: which quantizers prepare_qat inserts, with what specs, and per-layer overrides."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .spec import QuantSpec

PLACEMENTS = ("integer_graph", "conv_inputs")
_OVERRIDE_KEYS = {"pattern", "bits", "weight_bits", "act_bits", "enabled"}


def default_weight_spec(bits: int = 8) -> QuantSpec:
    # Symmetric narrow range: ONNX Runtime's integer kernels take symmetric int8 weights, and a
    # narrow range keeps BatchNorm folding exact when gamma is negative (-q never overflows).
    return QuantSpec(
        bits=bits,
        signed=True,
        symmetric=True,
        per_channel=True,
        axis=0,
        narrow_range=True,
        init="mse",
        scale_mode="lsq",
    )


def default_activation_spec(bits: int = 8) -> QuantSpec:
    # uint8 per-tensor with a zero point: the activation type NNAPI and ORT's QDQ kernels expect.
    return QuantSpec(
        bits=bits,
        signed=False,
        symmetric=False,
        per_channel=False,
        init="percentile",
        percentile=99.99,
        scale_mode="lsq",
    )


@dataclass
class Override:
    pattern: str
    bits: int | None = None
    weight_bits: int | None = None
    act_bits: int | None = None
    enabled: bool = True

    def bits_for(self, kind: str) -> int | None:
        own = self.weight_bits if kind == "weight" else self.act_bits
        return own if own is not None else self.bits


@dataclass
class QATConfig:
    """How to quantize a model.

    placement "integer_graph" puts activation quantizers where an integer-only graph needs them
    (model input, the output of every conv/linear/BN/activation chain, adds, pooling); placement
    "conv_inputs" quantizes only the inputs of convolutions (the paper's scheme).
    first_last_bits: bit width of the first and last layer (weights, their inputs, the logits);
    None keeps them at the model's bits. ``QATConfig.from_dict({"bits": 4})`` builds one from a
    recipe's ``quant`` section.
    """

    weight: QuantSpec = field(default_factory=default_weight_spec)
    activation: QuantSpec = field(default_factory=default_activation_spec)
    first_last_bits: int | None = 8
    placement: str = "integer_graph"
    overrides: list[Override] = field(default_factory=list)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.first_last_bits is not None:
            QuantSpec(bits=self.first_last_bits)  # validates the range

    @classmethod
    def from_dict(cls, d: dict | None) -> "QATConfig":
        """Build from a recipe's ``quant`` section. ``bits: 4`` means W4A4 (first/last at 8 bits)."""
        d = dict(d or {})
        known = {"bits", "weight_bits", "act_bits", "weight", "activation", "first_last_bits", "placement", "overrides"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"quant: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        bits = d.get("bits")  # weight_bits and act_bits win over it; None is the same as absent
        wbits = d["weight_bits"] if d.get("weight_bits") is not None else bits
        abits = d["act_bits"] if d.get("act_bits") is not None else bits
        weight = default_weight_spec()
        activation = default_activation_spec()
        if d.get("weight"):
            weight = QuantSpec.from_dict({**weight.to_dict(), **d["weight"]}, "quant.weight")
        if d.get("activation"):
            activation = QuantSpec.from_dict({**activation.to_dict(), **d["activation"]}, "quant.activation")
        if wbits is not None:
            weight = weight.with_(bits=wbits)
        if abits is not None:
            activation = activation.with_(bits=abits)
        if not weight.symmetric:
            raise ValueError(
                "quant.weight: asymmetric weights are not supported (integer kernels take symmetric weights)"
            )
        overrides = []
        for i, o in enumerate(d.get("overrides") or []):
            if not isinstance(o, dict) or "pattern" not in o or set(o) - _OVERRIDE_KEYS:
                raise ValueError(
                    f"quant.overrides[{i}]: expected a mapping with 'pattern' and any of "
                    f"{', '.join(sorted(_OVERRIDE_KEYS - {'pattern'}))}"
                )
            ov = Override(**o)
            for b in (ov.bits, ov.weight_bits, ov.act_bits):
                if b is not None:
                    QuantSpec(bits=b)
            overrides.append(ov)
        return cls(
            weight=weight,
            activation=activation,
            first_last_bits=d.get("first_last_bits", 8),
            placement=d.get("placement") or "integer_graph",
            overrides=overrides,
        )

    def matching(self, name: str) -> list[Override]:
        return [o for o in self.overrides if fnmatch.fnmatchcase(name, o.pattern)]
