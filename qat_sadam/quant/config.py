"""QATConfig: which quantizers prepare_qat inserts, with what specs, and per-layer overrides."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .spec import WEIGHT_BITS, QuantSpec

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


WIDE_BITS = 16


def activation_spec_at(spec: QuantSpec, bits: int) -> QuantSpec:
    """``spec`` at ``bits``; a 16-bit quantizer follows the data (scale_mode observer) where ``spec``
    learns its step (LSQ): Adam moves a step size by about its lr at every step, which at 16 bits
    (a step 256 times an 8-bit one's) drives it through zero within a few steps."""
    spec = spec.with_(bits=bits)
    return spec.with_(scale_mode="observer") if bits == WIDE_BITS and spec.scale_mode == "lsq" else spec


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
    first_last_bits: the least bit width of the first and last layer (weights, their inputs, the
    logits): W4A8 keeps them at 8 bits, W8A16 their activations at 16; None keeps the model's bits.
    ``QATConfig.from_dict({"bits": 4})`` builds one from a recipe's ``quant`` section. Activations
    take 2 to 8 bits or 16 (uint16), weights 2 to 8.
    """

    weight: QuantSpec = field(default_factory=default_weight_spec)
    activation: QuantSpec = field(default_factory=default_activation_spec)
    first_last_bits: int | None = 8
    placement: str = "integer_graph"
    overrides: list[Override] = field(default_factory=list)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        for what, b in (("weight bits", self.weight.bits), ("first_last_bits", self.first_last_bits)):
            if b is not None and b not in WEIGHT_BITS:
                raise ValueError(f"quant: {what} must be from 2 to 8 (integer kernels take int8 weights), got {b!r}")

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
            if abits == WIDE_BITS and (d.get("activation") or {}).get("scale_mode") == "lsq":
                raise ValueError(
                    "quant.activation.scale_mode: lsq cannot train 16-bit step sizes (Adam's lr-sized steps "
                    "exceed them); leave it unset (16-bit activations follow the data) or choose observer or frozen"
                )
            activation = activation_spec_at(activation, abits)
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
            for b in (ov.bits, ov.act_bits):
                if b is not None:
                    QuantSpec(bits=b)
            for b in (ov.bits, ov.weight_bits):
                if b is not None and b not in WEIGHT_BITS:
                    raise ValueError(f"quant.overrides[{i}]: weight bits must be from 2 to 8, got {b!r}")
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
