"""Deployment target profiles (export/*.yaml): opset, ranges, input shape, formats, checks, runtimes."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import yaml

from ..errors import ValidationError
from .runtimes import check_names

CHECKS = ("fusion", "parity", "accuracy", "latency", "size", "mobile")
FORMATS = ("onnx", "ort")


@dataclass
class Target:
    name: str = "default"
    opset: int = 17
    activation_type: str = "uint8"
    weight_type: str = "int8"
    weight_bits_max: int | None = None
    fixed_batch: int | None = None
    formats: list = field(default_factory=lambda: ["onnx"])
    checks: list = field(default_factory=lambda: list(CHECKS[:5]))
    providers: list = field(default_factory=lambda: ["CPUExecutionProvider"])
    mobile_providers: list = field(default_factory=list)
    runtimes: list = field(default_factory=lambda: ["ort-cpu"])
    description: str = ""

    def __post_init__(self):
        if self.opset < 13:
            raise ValidationError(f"target {self.name}: opset must be at least 13 (per-channel DequantizeLinear), got {self.opset}")
        if self.activation_type != "uint8":
            raise ValidationError(f"target {self.name}: activation_type must be uint8 (ORT's QDQ kernels and NNAPI take uint8 activations)")
        if self.weight_type != "int8":
            raise ValidationError(f"target {self.name}: weight_type must be int8")
        if self.weight_bits_max is not None and not 2 <= self.weight_bits_max <= 8:
            raise ValidationError(f"target {self.name}: weight_bits_max must be from 2 to 8")
        for c in self.checks:
            if c not in CHECKS:
                raise ValidationError(f"target {self.name}: unknown check {c!r}; choose from {', '.join(CHECKS)}")
        check_names(self.runtimes)
        for f in self.formats:
            if f not in FORMATS:
                raise ValidationError(f"target {self.name}: unknown format {f!r}; choose from {', '.join(FORMATS)}")


DEFAULT_TARGET = "export/cpu-x86.yaml"  # what a run exports to when its recipe names no target


def load_target(target: "str | Target | None") -> Target:
    if target is None or isinstance(target, Target):
        return target or Target()
    if not os.path.isfile(target):
        raise ValidationError(f"target profile not found: {target}")
    with open(target) as f:
        d = yaml.safe_load(f) or {}
    known = {f.name for f in fields(Target)}
    if not isinstance(d, dict) or set(d) - known:
        bad = sorted(set(d) - known) if isinstance(d, dict) else ["<not a mapping>"]
        raise ValidationError(f"{target}: unknown key {bad[0]!r} (known: {', '.join(sorted(known))})")
    d.setdefault("name", os.path.splitext(os.path.basename(target))[0])
    return Target(**d)
