"""Deployment target profiles (shipped ones in qat_sadam/configs/targets/, by name): opset, ranges,
input shape, formats, checks, runtimes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import onnxruntime as ort
import yaml

from .. import configs
from ..errors import ValidationError
from ..quant.spec import BITS
from .runtimes import Tolerance, check_names

CHECKS = ("fusion", "parity", "accuracy", "latency", "size", "mobile")
FORMATS = ("onnx", "ort")
ACTIVATION_TYPES = ("uint8", "uint16")  # the widest activation container the target runs
WEIGHT_STORAGES = ("int8", "int4")
SUB_BYTE_OPSET = 21  # ONNX's first opset with INT4 and UINT16 QuantizeLinear/DequantizeLinear


@dataclass
class Target:
    name: str = "default"
    opset: int = 17
    activation_type: str = "uint8"
    weight_type: str = "int8"
    weight_storage: str = "int8"
    weight_bits_max: int | None = None
    activation_bits: list | None = None  # the activation widths the device takes (qnn-htp: 8, 16); None: any
    fixed_batch: int | None = None
    formats: list = field(default_factory=lambda: ["onnx"])
    checks: list = field(default_factory=lambda: list(CHECKS[:5]))
    providers: list = field(default_factory=lambda: ["CPUExecutionProvider"])
    mobile_providers: list = field(default_factory=list)
    runtimes: list = field(default_factory=lambda: ["ort-cpu"])
    tolerances: dict = field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        if self.opset < 13:
            raise ValidationError(
                f"target {self.name}: opset must be at least 13 (per-channel DequantizeLinear), got {self.opset}"
            )
        _choose(self.name, "activation_type", self.activation_type, ACTIVATION_TYPES)
        _choose(self.name, "weight_storage", self.weight_storage, WEIGHT_STORAGES)
        if self.weight_type != "int8":
            raise ValidationError(f"target {self.name}: weight_type must be int8")
        if self.sub_byte and self.opset < SUB_BYTE_OPSET:
            raise ValidationError(
                f"target {self.name}: {self.activation_type} activations and {self.weight_storage} weight storage "
                f"need opset {SUB_BYTE_OPSET} or later, got {self.opset}"
            )
        if self.activation_bits is not None and not all(b in BITS for b in self.activation_bits):
            raise ValidationError(f"target {self.name}: activation_bits take 2 to 8 and 16, got {self.activation_bits}")
        if self.weight_bits_max is not None and not 2 <= self.weight_bits_max <= 8:
            raise ValidationError(f"target {self.name}: weight_bits_max must be from 2 to 8")
        for c in self.checks:
            _choose(self.name, "check", c, CHECKS)
        check_names(self.runtimes)
        check_names(self.tolerances)
        for rt, by_type in self.tolerances.items():
            if not isinstance(by_type, dict):
                raise ValidationError(f"target {self.name}: tolerances.{rt} maps uint8/uint16 to a tolerance")
            for container, t in by_type.items():
                where = f"target {self.name}: tolerances.{rt}.{container}"
                _choose(self.name, f"activation type in tolerances.{rt}", container, ACTIVATION_TYPES)
                if not isinstance(t, dict) or set(t) != {"max_lsb", "top1_agreement"}:
                    raise ValidationError(f"{where} must set max_lsb and top1_agreement")
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in t.values()):
                    raise ValidationError(f"{where}: values must be non-negative numbers")
        unknown = [p for p in self.providers if p not in ort.get_all_providers()]
        if unknown:  # a misspelt provider would otherwise never run and never be reported
            raise ValidationError(f"target {self.name}: unknown ONNX Runtime provider {unknown[0]!r}")
        for f in self.formats:
            _choose(self.name, "format", f, FORMATS)

    def tolerance(self, runtime: str, activation_type: str) -> "Tolerance | None":
        """This profile's measured tolerance for a runtime at an activation container, if it sets one."""
        t = self.tolerances.get(runtime, {}).get(activation_type)
        return Tolerance(**t, cause=f"measured for target {self.name} ({activation_type})") if t else None

    @property
    def sub_byte(self) -> bool:
        """Whether files for this target may hold INT4 weights or UINT16 activations (opset 21)."""
        return self.activation_type != "uint8" or self.weight_storage != "int8"


def _choose(target: str, what: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValidationError(f"target {target}: unknown {what} {value!r}; choose from {', '.join(choices)}")


DEFAULT_TARGET = "cpu-x86"  # the shipped profile a run exports to when its recipe names no target


def load_target(target: "str | Target | None") -> Target:
    """A target profile by shipped name (``mobile-arm``) or by path to a YAML file; None gives the
    built-in defaults. Raises ValidationError naming the file and the key."""
    if target is None or isinstance(target, Target):
        return target or Target()
    target = configs.resolve("target", target)
    if not os.path.isfile(target):
        raise ValidationError(f"target profile not found: {target}")
    try:
        with open(target, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValidationError(
            f"{target}: not a readable YAML target profile ({str(e).splitlines()[0][:120]})"
        ) from None
    known = {f.name: f.type for f in fields(Target)}
    if not isinstance(d, dict) or set(d) - set(known):
        bad = sorted(set(d) - set(known)) if isinstance(d, dict) else ["<not a mapping>"]
        raise ValidationError(f"{target}: unknown key {bad[0]!r} (known: {', '.join(sorted(known))})")
    for key, value in d.items():
        _check_type(target, key, known[key], value)
    d.setdefault("name", os.path.splitext(os.path.basename(target))[0])
    return Target(**d)


def _check_type(path: str, key: str, annotation: str, value) -> None:
    """A profile value against its field's annotation (``int | None``, ``list`` of strings, ``str``)."""
    optional = "None" in annotation
    if value is None and optional:
        return
    if "int" in annotation:
        ok = isinstance(value, int) and not isinstance(value, bool) and (key != "fixed_batch" or value >= 1)
        want = "a positive integer" if key == "fixed_batch" else "an integer"
    elif "dict" in annotation:
        ok, want = isinstance(value, dict), "a mapping"
    elif key == "activation_bits":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        want = "a list of bit widths"
    elif "list" in annotation:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        want = "a list of names"
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise ValidationError(f"{path}: key {key!r} must be {want}{' or null' if optional else ''}, got {value!r}")
