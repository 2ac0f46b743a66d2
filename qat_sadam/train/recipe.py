"""Recipes: YAML training configs, validated up front against a schema, with CLI overrides."""
from __future__ import annotations

import copy
import os
from typing import Any

import yaml

from .. import configs
from ..errors import RecipeError
from ..models import CIFAR_STEM_MODELS, check_model, weight_names
from ..quant import QATConfig
from .data import DATASETS
from .host_memory import MODES as HOST_MEMORY_MODES
from .optimizers import check_optimizer
from .oscillation_fixes import AGGREGATIONS

_NUM = (int, float)
# key -> type (a tuple of types, or a nested schema). "quant" and "optimizer" are checked by their builders too.
SCHEMA: dict[str, Any] = {
    "name": str,
    "model": {"name": str, "cifar_stem": bool, "widths": list, "width": int, "dropout": _NUM, "sync_bn": bool,
              "checkpoint": (str, type(None)), "weights": (str, type(None)), "reset_classifier": bool, "source": str},
    "data": {"name": str, "root": (str, type(None)), "batch_size": int, "eval_batch_size": int,
             "classes": (int, type(None)), "subset": (int, type(None)), "test_subset": (int, type(None)), "val_split": _NUM,
             "eval_on": str, "download": bool, "image_size": (int, type(None)),
             "augment": {"crop_padding": int, "flip": bool}},
    "quant": dict,
    "optimizer": dict,
    "schedule": {"name": str, "warmup_epochs": _NUM, "min_lr": _NUM},
    "epochs": int,
    "max_steps": (int, type(None)),
    "seed": int,
    "device": str,
    "compile": bool,
    "fake_quant_kernels": str,
    "host_memory": str,
    "calibration_batches": int,
    "bn_reestimate_batches": (int, type(None)),
    "grad_clip": (_NUM, type(None)),
    "distill": {"enabled": bool, "alpha": _NUM, "temperature": _NUM},
    "dampening": {"enabled": bool, "weight": _NUM, "weight_final": _NUM, "anneal_start": _NUM, "aggregation": str},
    "freezing": {"enabled": bool, "threshold": _NUM, "threshold_final": _NUM, "anneal_start": _NUM},
    "nan_policy": str,
    "logging": {"every": int, "oscillations": bool, "tensorboard": (bool, type(None))},
    "checkpoint": {"every_steps": int},
    "export": {"target": (str, type(None)), "enabled": bool, "checkpoint": str},
}
FINETUNE_BN_BATCHES = 32  # BatchNorm re-estimation before export, on by default when starting from trained weights

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "model": {"name": "small_cnn", "source": "torchvision", "checkpoint": None, "weights": None, "reset_classifier": False},
    "data": {"name": "synthetic", "root": None, "batch_size": 64, "eval_batch_size": 512, "classes": None, "subset": None,
             "test_subset": None, "val_split": 0.0, "eval_on": "test", "download": False, "image_size": None,
             "augment": {"crop_padding": 0, "flip": False}},
    "quant": {},
    "optimizer": {"name": "adamw", "lr": 1e-3},
    "schedule": {"name": "constant", "warmup_epochs": 0, "min_lr": 0.0},
    "epochs": 1,
    "max_steps": None,
    "seed": 0,
    "device": "auto",
    # torch.compile the training forward (the GPU path; on this project's CPUs it gave no speed-up,
    # docs/benchmarks.md). Compiled kernels may round some values differently from eager ones.
    "compile": False,
    # Per-tensor LSQ fake quantization: fused (two torch.compile'd loops, quant/fake_quant.py) or eager
    # torch ops, the same numbers either way; auto: fused on CUDA and where a C++ compiler is found.
    "fake_quant_kernels": "auto",
    # CPU memory of a step's large buffers (train/host_memory.py): heap keeps what a step frees for the
    # next one (glibc's mmap path off), system leaves glibc as it is; auto: heap on glibc unless
    # MALLOC_* variables or LD_PRELOAD chose already. The numbers are the same either way.
    "host_memory": "auto",
    "calibration_batches": 2,
    "bn_reestimate_batches": None,
    "grad_clip": None,
    # Knowledge distillation from the float model the fine-tune starts from (LSQ, Esser et al. 2020,
    # trains its low-bit models so): loss = (1 - alpha) CE + alpha T^2 KL(teacher || student) at temperature T.
    "distill": {"enabled": False, "alpha": 1.0, "temperature": 1.0},
    # Nagel et al. 2022's fixes for weight oscillations (train/oscillation_fixes.py), with the
    # reference code's MobileNetV2 W4 settings: dampening weight cosine-annealed 0 -> 0.1, the freezing
    # threshold 0.1 -> 0.01, both annealed from a quarter of the run. Freezing reads the oscillation
    # tracker, whose EMA momentum is 0.01 (the reference freezes with 0.001 over ~100k steps; an
    # 80-step fine-tune could never fill such an EMA).
    "dampening": {"enabled": False, "weight": 0.0, "weight_final": 0.1, "anneal_start": 0.25, "aggregation": "kernel_mean"},
    "freezing": {"enabled": False, "threshold": 0.1, "threshold_final": 0.01, "anneal_start": 0.25},
    "nan_policy": "stop",
    "logging": {"every": 10, "oscillations": True, "tensorboard": None},
    "checkpoint": {"every_steps": 0},
    "export": {"target": None, "enabled": False, "checkpoint": "best"},
}

CHOICES = {"schedule.name": ("constant", "cosine"), "nan_policy": ("stop", "skip"),
           "data.eval_on": ("test", "val"), "device": ("auto", "cpu", "cuda"), "export.checkpoint": ("best", "last"),
           "fake_quant_kernels": ("auto", "fused", "eager"), "host_memory": HOST_MEMORY_MODES,
           "dampening.aggregation": AGGREGATIONS}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a mapping", type(None): "null"}


def _types(t) -> tuple:
    return tuple(x for y in t for x in _types(y)) if isinstance(t, tuple) else (t,)


def _type_ok(v, t) -> bool:
    types = _types(t)
    if isinstance(v, bool):
        return bool in types
    return isinstance(v, types)


def _check(d: dict, schema: dict, path: str = "") -> None:
    if not isinstance(d, dict):
        raise RecipeError(f"recipe key '{path.rstrip('.') or '<top>'}' must be a mapping")
    for k, v in d.items():
        key = f"{path}{k}"
        if k not in schema:
            raise RecipeError(f"unknown recipe key '{key}' (known: {', '.join(sorted(schema))})")
        t = schema[k]
        if isinstance(t, dict):
            _check(v, t, key + ".")
        elif not _type_ok(v, t):
            want = " or ".join(dict.fromkeys(_TYPE_NAMES[x] for x in _types(t) if not (x is int and float in _types(t))))
            raise RecipeError(f"recipe key '{key}' must be {want}, got {type(v).__name__} {v!r}")
    for k, allowed in CHOICES.items():
        if not path and _get(d, k) not in allowed + (None,):
            raise RecipeError(f"recipe key '{k}' must be one of {', '.join(allowed)}, got {_get(d, k)!r}")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def parse_override(expr: str) -> tuple[list[str], Any]:
    """'optimizer.lr=3e-4' -> (['optimizer', 'lr'], 0.0003); the value is read as YAML."""
    if "=" not in expr:
        raise RecipeError(f"--set expects key.path=value, got {expr!r}")
    key, raw = expr.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        raise RecipeError(f"--set {key}: cannot read value {raw!r}") from None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)
    if not key or any(not p for p in key.split(".")):
        raise RecipeError(f"--set expects key.path=value, got {expr!r}")
    return key.split("."), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_mapping(path: str, what: str) -> dict:
    """A YAML file that must hold a mapping (a recipe, a fragment, a run's recipe); RecipeError otherwise."""
    if not os.path.isfile(path):
        raise RecipeError(f"{what} file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a {what} must be a YAML mapping")
    return raw


def load_recipe(path: str | None = None, overrides: list[str] = (), bits: int | None = None,
                optimizer: str | None = None, seed: int | None = None, base: dict | None = None,
                fragments: list[str] = ()) -> dict:
    """Read a recipe (a shipped one by name, ``quickstart``, or a YAML file by path; or start from the recipe ``base``), merge the recipe ``fragments`` over it
    in order (e.g. the quant.overrides that ``qat-sadam sensitivity`` proposes), apply
    --bits/--optimizer/--seed, then the --set overrides (which win), fill defaults and validate.
    Raises RecipeError."""
    raw: dict = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        path = configs.resolve("recipe", path)
        raw = read_mapping(path, "recipe")
        raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    for frag in fragments:
        raw = _merge(raw, read_mapping(frag, "recipe fragment"))
    if bits is not None:
        raw.setdefault("quant", {})
        if not isinstance(raw["quant"], dict):
            raise RecipeError("recipe key 'quant' must be a mapping")
        raw["quant"]["bits"] = bits
    if optimizer is not None:
        current = raw.get("optimizer") if isinstance(raw.get("optimizer"), dict) else {}
        if current.get("name") != optimizer:  # keep only what every optimizer understands
            current = {k: v for k, v in current.items() if k in ("lr", "weight_decay")}
        raw["optimizer"] = {**current, "name": optimizer}
    if seed is not None:
        raw["seed"] = seed
    for expr in overrides:
        keys, value = parse_override(expr)
        d = raw
        for k in keys[:-1]:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise RecipeError(f"--set {'.'.join(keys)}: '{k}' is not a mapping")
        d[keys[-1]] = value
    _check(raw, SCHEMA)
    recipe = _merge(DEFAULTS, raw)
    _check(recipe, SCHEMA)
    _validate_sections(recipe)
    if recipe["bn_reestimate_batches"] is None:
        recipe["bn_reestimate_batches"] = FINETUNE_BN_BATCHES if starts_trained(recipe) and quantized(recipe) else 0
    return recipe


def with_defaults(saved: dict) -> dict:
    """A saved (already validated) recipe with the defaults of keys added to the schema since it was
    written; not validated again, so a resumed run does not need what only its start needed
    (e.g. model.checkpoint)."""
    return _merge(DEFAULTS, saved)


def quantized(recipe: dict) -> bool:
    """False for a float recipe (``quant: {enabled: false}``)."""
    return recipe["quant"].get("enabled", True)


def starts_trained(recipe: dict) -> bool:
    """Whether the recipe starts from trained weights (a fine-tune) rather than random ones."""
    return bool(recipe["model"]["checkpoint"] or recipe["model"]["weights"])


def qat_config(recipe: dict) -> QATConfig:
    """The recipe's quantizer configuration (its ``quant`` section without ``enabled``)."""
    return QATConfig.from_dict({k: v for k, v in recipe["quant"].items() if k != "enabled"})


def _validate_sections(r: dict) -> None:
    if not isinstance(r["quant"].get("enabled", True), bool):
        raise RecipeError(f"recipe key 'quant.enabled' must be true or false, got {r['quant']['enabled']!r}")
    if not quantized(r):
        extra = sorted(set(r["quant"]) - {"enabled"})
        if extra:  # a float recipe: quantizer settings would be silently ignored
            raise RecipeError(f"recipe key 'quant.{extra[0]}' has no effect with quant.enabled: false (a float run)")
        if r["export"]["enabled"]:
            raise RecipeError("recipe key 'export.enabled' needs quantization: a float run (quant.enabled: false) has no INT8 model")
    try:
        qat_config(r)
    except ValueError as e:
        raise RecipeError(str(e) if str(e).startswith("quant") else f"quant: {e}") from None
    check_optimizer(r["optimizer"])
    _check_start(r["model"])
    try:
        check_model(r["model"]["name"], r["model"]["source"])
    except ValueError as e:
        raise RecipeError(str(e)) from None
    if r["model"].get("cifar_stem") and r["model"]["name"] not in CIFAR_STEM_MODELS:
        raise RecipeError(f"recipe key 'model.cifar_stem' applies to {', '.join(CIFAR_STEM_MODELS)}, not {r['model']['name']}")
    if r["data"]["name"] not in DATASETS:
        raise RecipeError(f"unknown dataset {r['data']['name']!r}; choose one of {', '.join(DATASETS)}")
    for key, lo in (("epochs", 1), ("data.batch_size", 1), ("data.eval_batch_size", 1), ("calibration_batches", 0),
                    ("logging.every", 1), ("checkpoint.every_steps", 0)):
        if _get(r, key) < lo:
            raise RecipeError(f"recipe key '{key}' must be at least {lo}, got {_get(r, key)}")
    if r["data"]["classes"] is not None and r["data"]["classes"] < 2:
        raise RecipeError(f"recipe key 'data.classes' must be at least 2, got {r['data']['classes']}")
    if not 0.0 <= r["data"]["val_split"] < 1.0:
        raise RecipeError(f"recipe key 'data.val_split' must be in [0, 1), got {r['data']['val_split']}")
    if r["data"]["eval_on"] == "val" and r["data"]["val_split"] <= 0:
        raise RecipeError("recipe key 'data.eval_on' is 'val' but data.val_split is 0")
    d = r["distill"]
    if d["enabled"] and not (starts_trained(r) and quantized(r)):
        raise RecipeError("recipe key 'distill.enabled' needs a float teacher: a quantized fine-tune that starts from "
                          "model.checkpoint or model.weights")
    if not 0.0 < d["alpha"] <= 1.0 or d["temperature"] <= 0:
        raise RecipeError(f"recipe keys 'distill.alpha' must be in (0, 1] and 'distill.temperature' positive, got "
                          f"{d['alpha']} and {d['temperature']}")
    _check_oscillation_fixes(r)
    if r["bn_reestimate_batches"] is not None and r["bn_reestimate_batches"] < 0:
        raise RecipeError(f"recipe key 'bn_reestimate_batches' must be at least 0, got {r['bn_reestimate_batches']}")


def _check_oscillation_fixes(r: dict) -> None:
    damp, freeze = r["dampening"], r["freezing"]
    for name, section in (("dampening", damp), ("freezing", freeze)):
        if section["enabled"] and not quantized(r):
            raise RecipeError(f"recipe key '{name}.enabled' needs quantized weights: a float run has no oscillations")
        if not 0.0 <= section["anneal_start"] < 1.0:
            raise RecipeError(f"recipe key '{name}.anneal_start' must be in [0, 1), got {section['anneal_start']}")
    for key in ("dampening.weight", "dampening.weight_final", "freezing.threshold", "freezing.threshold_final"):
        if _get(r, key) < 0:
            raise RecipeError(f"recipe key '{key}' must be at least 0, got {_get(r, key)}")
    if freeze["enabled"] and not r["logging"]["oscillations"]:
        raise RecipeError("recipe key 'freezing.enabled' reads the oscillation tracker: set logging.oscillations: true")


def _check_start(m: dict) -> None:
    """The starting point exists and fits the model, checked before any data is read."""
    if m["checkpoint"] and m["weights"]:
        raise RecipeError("recipe keys 'model.checkpoint' and 'model.weights' both name a starting point; give one")
    if m["checkpoint"] and not os.path.exists(m["checkpoint"]):
        raise RecipeError(f"recipe key 'model.checkpoint': no such file or run directory: {m['checkpoint']}")
    if m["weights"] and m["source"] == "timm":
        if m["weights"] != "pretrained":
            raise RecipeError(f"recipe key 'model.weights' for a timm model is 'pretrained' (timm's weights), got {m['weights']!r}")
    elif m["weights"]:
        names = weight_names(m["name"])
        if not names:
            raise RecipeError(f"recipe key 'model.weights' applies to torchvision models; {m['name']!r} is not one")
        if m["weights"] not in names + ["DEFAULT"]:
            raise RecipeError(f"recipe key 'model.weights': {m['name']} has no weights {m['weights']!r}; choose from {', '.join(names)}")


def dump_recipe(recipe: dict, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
