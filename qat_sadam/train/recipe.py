"""Recipes: a tree of dataclasses, one per section, that holds every key with its type, default,
choices, range and meaning, and the checks across keys. YAML in (a shipped recipe by name or a
file), CLI overrides over it, one-line ``RecipeError``s out; ``Recipe.to_dict`` is what run
directories and checkpoints store, ``Recipe.from_saved`` reads it back. ``reference()`` writes
the recipe reference of the user guide from this schema."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .. import configs
from ..errors import RecipeError
from ..models import CIFAR_STEM_MODELS, SOURCES, check_model, weight_names
from ..quant import QATConfig
from ..quant.config import PLACEMENTS
from ..quant.spec import BITS, WEIGHT_BITS
from .data import DATASETS
from .host_memory import MODES as HOST_MEMORY_MODES
from .optimizers import check_optimizer
from .oscillation_fixes import AGGREGATIONS

FINETUNE_BN_BATCHES = 32  # BatchNorm re-estimation before export, on by default when starting from trained weights


def key(
    default: Any,
    doc: str,
    *,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A recipe key: its default, what it means, and the values it takes (``choices``, or a range
    from ``low`` to ``high``, each end closed unless ``*_open``). Mutable defaults are copied."""
    meta = {"doc": doc, "choices": choices, "low": low, "high": high, "low_open": low_open, "high_open": high_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass
class ModelSection:
    name: str = key(
        "small_cnn",
        "a torchvision or timm model name, one of the built-in small nets (small_cnn, paper_cnn, small_unet), or with "
        "source python your own `package.module:factory`",
    )
    source: str = key("torchvision", "where `name` comes from", choices=SOURCES)
    cifar_stem: bool | None = key(
        None,
        f"a 3x3 stride-1 first conv and no max-pool for 32x32 images ({', '.join(CIFAR_STEM_MODELS)}); null: the "
        "model's own stem",
    )
    widths: list | None = key(
        None, "channel widths of the built-in paper nets (a list of positive integers); null: their default"
    )
    width: int | None = key(None, "channel width of small_cnn and small_unet; null: its default", low=1)
    dropout: float | None = key(
        None, "dropout of the built-in paper nets; null: their default", low=0, high=1, high_open=True
    )
    kwargs: dict | None = key(
        None,
        "keyword arguments of a source-python factory (it also gets num_classes when it takes that parameter)",
    )
    sync_bn: bool = key(False, "synchronise BatchNorm statistics across data-parallel ranks")
    checkpoint: str | None = key(
        None, "start from trained float weights: a state_dict (.pt/.pth/.safetensors) or a float run directory"
    )
    weights: str | None = key(
        None, "start from torchvision's weights by enum name (IMAGENET1K_V1, DEFAULT), or 'pretrained' for timm"
    )
    reset_classifier: bool = key(
        False, "re-initialise a classifier trained for another class count instead of refusing it"
    )


@dataclass
class AugmentSection:
    crop_padding: int = key(0, "random crop after zero padding by this many pixels (0: off)", low=0)
    flip: bool = key(False, "random horizontal flip")


@dataclass
class DataSection:
    name: str = key("synthetic", "dataset", choices=DATASETS)
    root: str | None = key(None, "where the dataset files are; null: $QAT_SADAM_DATA")
    batch_size: int = key(64, "training batch (the global batch under torchrun)", low=1)
    eval_batch_size: int = key(512, "evaluation batch", low=1)
    classes: int | None = key(None, "keep the first N classes whole (a smaller problem for a CPU budget)", low=2)
    subset: int | None = key(None, "keep the first N training images", low=1)
    test_subset: int | None = key(None, "keep the first N test images", low=1)
    val_split: float = key(
        0.0, "carve this fraction of the training images out as a validation split", low=0, high=1, high_open=True
    )
    eval_on: str = key("test", "what accuracy is measured on", choices=("test", "val"))
    download: bool = key(False, "let torchvision download CIFAR (nothing downloads otherwise)")
    image_size: int | None = key(None, "image side of the synthetic dataset; null: 16", low=1)
    augment: AugmentSection = section(AugmentSection, "training augmentation")


# The quantizer keys that mean something only with quant.enabled (a float recipe refuses them).
@dataclass
class QuantSection:
    enabled: bool = key(True, "false: train the float model itself (no quantizers)")
    bits: int | None = key(
        None, "weights and activations at this many bits (W{bits}A{bits}); null: 8", choices=WEIGHT_BITS
    )
    weight_bits: int | None = key(None, "weight bits, over `bits`", choices=WEIGHT_BITS)
    act_bits: int | None = key(None, "activation bits, over `bits` (16: uint16 activations, W8A16)", choices=BITS)
    weight: dict | None = key(None, "weight QuantSpec fields over the default (symmetric per-channel, MSE init, LSQ)")
    activation: dict | None = key(
        None, "activation QuantSpec fields over the default (uint8 per-tensor, percentile init, LSQ)"
    )
    first_last_bits: int | None = key(
        8, "the least bits of the first and last layer; null: the model's bits", choices=WEIGHT_BITS
    )
    placement: str = key("integer_graph", "where activation quantizers go", choices=PLACEMENTS)
    overrides: list = key(
        [], "per-layer bits: a list of {pattern, bits|weight_bits|act_bits|enabled} (fnmatch patterns)"
    )

    def config(self) -> QATConfig:
        """The quantizer configuration these keys describe (``enabled`` aside)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "enabled"}
        try:
            return QATConfig.from_dict(d)
        except ValueError as e:
            raise RecipeError(str(e) if str(e).startswith("quant") else f"quant: {e}") from None


@dataclass
class ScheduleSection:
    name: str = key("constant", "learning-rate schedule", choices=("constant", "cosine"))
    warmup_epochs: float = key(0, "linear warm-up over this many epochs", low=0)
    min_lr: float = key(0.0, "the cosine schedule's final lr", low=0)


@dataclass
class DistillSection:
    enabled: bool = key(False, "train against the float model the fine-tune starts from (knowledge distillation)")
    alpha: float = key(1.0, "loss = (1 - alpha) CE + alpha T^2 KL(teacher || student)", low=0, high=1, low_open=True)
    temperature: float = key(1.0, "distillation temperature T", low=0, low_open=True)


# Nagel et al. 2022's fixes for weight oscillations (train/oscillation_fixes.py), with the reference
# code's MobileNetV2 W4 settings: both annealed from a quarter of the run. Freezing reads the
# oscillation tracker, whose EMA momentum is 0.01 (the reference freezes with 0.001 over ~100k
# steps; an 80-step fine-tune could never fill such an EMA).
@dataclass
class DampeningSection:
    enabled: bool = key(False, "add the regulariser that pulls latent weights to their bin centres")
    weight: float = key(0.0, "the regulariser's weight where annealing starts", low=0)
    weight_final: float = key(0.1, "its weight at the end (cosine-annealed)", low=0)
    anneal_start: float = key(0.25, "fraction of the run where annealing starts", low=0, high=1, high_open=True)
    aggregation: str = key("kernel_mean", "how the per-weight terms are summed", choices=AGGREGATIONS)


@dataclass
class FreezingSection:
    enabled: bool = key(
        False, "freeze a weight whose oscillation frequency passes the threshold, at its most frequent integer"
    )
    threshold: float = key(0.1, "the frequency threshold where annealing starts", low=0)
    threshold_final: float = key(0.01, "the threshold at the end (cosine-annealed)", low=0)
    anneal_start: float = key(0.25, "fraction of the run before which nothing freezes", low=0, high=1, high_open=True)


@dataclass
class LoggingSection:
    every: int = key(10, "console log interval in steps", low=1)
    oscillations: bool = key(True, "track weight flips and oscillations (the freezer reads them)")
    tensorboard: bool | None = key(None, "RUN/tensorboard; null: when the tensorboard package is installed")


@dataclass
class CheckpointSection:
    every_steps: int = key(0, "also save every N steps (0: at epoch ends only)", low=0)


@dataclass
class ExportSection:
    enabled: bool = key(False, "export INT8 ONNX and validate it when training ends")
    target: str | None = key(None, "target profile: a shipped name (qat-sadam targets) or a YAML path; null: cpu-x86")
    checkpoint: str = key("best", "which checkpoint is exported and deployed", choices=("best", "last"))


@dataclass
class Recipe:
    """A validated recipe: one field per section (``recipe.data.batch_size``; ``recipe.quant.config()``
    is its ``QATConfig``). Build one with ``load_recipe``; ``to_dict``/``from_saved`` are what run
    directories store and read back; every key is in docs/guide/recipes.md."""

    name: str = key("run", "the run's name (default: the recipe file's)")
    model: ModelSection = section(ModelSection, "the network and what it starts from")
    data: DataSection = section(DataSection, "the dataset and its loaders")
    quant: QuantSection = section(QuantSection, "the quantizers prepare_qat inserts")
    optimizer: dict = key(
        {"name": "adamw", "lr": 1e-3}, "name (adamw, sadam, prox_sgd, sgd) and the optimizer's own settings"
    )
    schedule: ScheduleSection = section(ScheduleSection, "the learning-rate schedule")
    epochs: int = key(1, "training epochs", low=1)
    max_steps: int | None = key(None, "stop after this many steps (a partial epoch that --resume continues)", low=1)
    seed: int = key(0, "seeds the weights, the data order and S-Adam's probes")
    device: str = key("auto", "auto: CUDA when available", choices=("auto", "cpu", "cuda"))
    compile: bool = key(
        False, "torch.compile the training forward (the GPU path; compiled kernels may round some values differently)"
    )
    fake_quant_kernels: str = key(
        "auto",
        "per-tensor LSQ as fused torch.compile'd loops or eager ops, the same numbers; auto: fused where a compiler is "
        "found",
        choices=("auto", "fused", "eager"),
    )
    host_memory: str = key(
        "auto",
        "heap keeps a step's large buffers in glibc's heap between steps; auto: heap on glibc",
        choices=HOST_MEMORY_MODES,
    )
    calibration_batches: int = key(2, "batches that initialise the activation ranges", low=0)
    bn_reestimate_batches: int | None = key(
        None,
        f"BatchNorm re-estimation with the quantized weights; null: {FINETUNE_BN_BATCHES} for a quantized fine-tune, "
        "else 0",
        low=0,
    )
    grad_clip: float | None = key(None, "clip the gradient norm to this value; null: no clipping", low=0, low_open=True)
    distill: DistillSection = section(DistillSection, "knowledge distillation from the float model")
    dampening: DampeningSection = section(DampeningSection, "Nagel et al.'s oscillation dampening")
    freezing: FreezingSection = section(FreezingSection, "Nagel et al.'s iterative weight freezing")
    nan_policy: str = key("stop", "on a non-finite loss or gradient: stop, or skip the step", choices=("stop", "skip"))
    logging: LoggingSection = section(LoggingSection, "what a run logs")
    checkpoint: CheckpointSection = section(CheckpointSection, "when a run saves")
    export: ExportSection = section(ExportSection, "the export at the end of training")

    # -- what the recipe means ------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """False for a float recipe (``quant: {enabled: false}``)."""
        return self.quant.enabled

    @property
    def starts_trained(self) -> bool:
        """Whether the recipe starts from trained weights (a fine-tune) rather than random ones."""
        return bool(self.model.checkpoint or self.model.weights)

    def to_dict(self) -> dict:
        """Plain data: what recipe.yaml and checkpoints hold (checkpoints load without unpickling code)."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, raw: dict) -> "Recipe":
        """Build and validate a recipe from a mapping (defaults for what it leaves out)."""
        recipe = _build(cls, raw, "")
        recipe.check()
        return recipe

    @classmethod
    def from_saved(cls, saved: Any) -> "Recipe":
        """A recipe that a run stored, with the defaults of keys added since it was written; types and
        the model name are checked, but not what only the run's start needed (model.checkpoint may be
        gone). Its model and data sections must be there: a default would silently stand in for them."""
        if not isinstance(saved, dict):
            raise RecipeError(f"a saved recipe must be a mapping, got {type(saved).__name__}")
        missing = [name for name in ("model", "data") if name not in saved]
        if missing:
            raise RecipeError(f"the saved recipe has no '{missing[0]}' section")
        recipe = _build(cls, saved, "")
        recipe._check_model_name()
        return recipe

    # -- checks across keys ---------------------------------------------------------------
    def check(self) -> None:
        if not self.quantized:
            changed = [
                f.name
                for f in fields(QuantSection)
                if f.name != "enabled" and getattr(self.quant, f.name) != getattr(QuantSection(), f.name)
            ]
            if changed:  # a float recipe: quantizer settings would be silently ignored
                raise RecipeError(
                    f"recipe key 'quant.{changed[0]}' has no effect with quant.enabled: false (a float run)"
                )
            if self.export.enabled:
                raise RecipeError(
                    "recipe key 'export.enabled' needs quantization: a float run (quant.enabled: false) has no INT8 "
                    "model"
                )
        self.quant.config()
        check_optimizer(self.optimizer)
        self._check_model()
        if self.data.eval_on == "val" and self.data.val_split <= 0:
            raise RecipeError("recipe key 'data.eval_on' is 'val' but data.val_split is 0")
        if self.distill.enabled and not (self.starts_trained and self.quantized):
            raise RecipeError(
                "recipe key 'distill.enabled' needs a float teacher: a quantized fine-tune that starts from "
                "model.checkpoint or model.weights"
            )
        for name in ("dampening", "freezing"):
            if getattr(self, name).enabled and not self.quantized:
                raise RecipeError(
                    f"recipe key '{name}.enabled' needs quantized weights: a float run has no oscillations"
                )
        if self.freezing.enabled and not self.logging.oscillations:
            raise RecipeError(
                "recipe key 'freezing.enabled' reads the oscillation tracker: set logging.oscillations: true"
            )
        if self.bn_reestimate_batches is None:
            self.bn_reestimate_batches = FINETUNE_BN_BATCHES if self.starts_trained and self.quantized else 0

    def _check_model_name(self) -> None:
        try:
            check_model(self.model.name, self.model.source)
        except ValueError as e:
            raise RecipeError(str(e)) from None

    def _check_model(self) -> None:
        """The model exists, and its starting point exists and fits it, checked before any data is read."""
        self._check_model_name()
        m = self.model
        if m.cifar_stem and m.name not in CIFAR_STEM_MODELS:
            raise RecipeError(f"recipe key 'model.cifar_stem' applies to {', '.join(CIFAR_STEM_MODELS)}, not {m.name}")
        if m.widths is not None and not (m.widths and all(_is_int(w) and w >= 1 for w in m.widths)):
            raise RecipeError(f"recipe key 'model.widths' must be a list of positive integers, got {m.widths!r}")
        if m.kwargs is not None and m.source != "python":
            raise RecipeError("recipe key 'model.kwargs' applies to model.source: python (your own factory)")
        if m.checkpoint and m.weights:
            raise RecipeError("recipe keys 'model.checkpoint' and 'model.weights' both name a starting point; give one")
        if m.checkpoint and not os.path.exists(m.checkpoint):
            raise RecipeError(f"recipe key 'model.checkpoint': no such file or run directory: {m.checkpoint}")
        if m.weights and m.source == "timm":
            if m.weights != "pretrained":
                raise RecipeError(
                    f"recipe key 'model.weights' for a timm model is 'pretrained' (timm's weights), got {m.weights!r}"
                )
        elif m.weights:
            names = weight_names(m.name)
            if not names:
                raise RecipeError(f"recipe key 'model.weights' applies to torchvision models; {m.name!r} is not one")
            if m.weights not in names + ["DEFAULT"]:
                raise RecipeError(
                    f"recipe key 'model.weights': {m.name} has no weights {m.weights!r}; choose from {', '.join(names)}"
                )


# -- reading a mapping into the dataclasses -------------------------------------------------
_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a list",
    dict: "a mapping",
    type(None): "null",
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _allowed(annotation) -> tuple:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _type_ok(v, allowed: tuple) -> bool:
    if isinstance(v, bool):
        return bool in allowed
    if _is_int(v):
        return int in allowed or float in allowed
    return isinstance(v, tuple(t for t in allowed if t is not int))


def _build(cls: type, raw: Any, path: str):
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe key '{path.rstrip('.') or '<top>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kw = {}
    for name, value in raw.items():
        if name not in known:
            raise RecipeError(f"unknown recipe key '{path}{name}' (known: {', '.join(sorted(known))})")
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kw[name] = _build(annotation, value, f"{path}{name}.")
        elif name == "optimizer" and cls is Recipe:  # over the default, as --optimizer and --set change it
            if not isinstance(value, dict):
                raise RecipeError("recipe key 'optimizer' must be a mapping")
            kw[name] = {**known[name].default_factory(), **value}
        else:
            kw[name] = _checked(f"{path}{name}", value, _allowed(annotation), known[name].metadata)
    return cls(**kw)


def _checked(key_: str, v, allowed: tuple, meta: dict):
    """``v`` when it has the key's type, is finite and lies in its choices or range; RecipeError naming
    the key otherwise."""
    if not _type_ok(v, allowed):
        want = " or ".join(dict.fromkeys(_TYPE_NAMES[t] for t in allowed if not (t is int and float in allowed)))
        raise RecipeError(f"recipe key '{key_}' must be {want}, got {type(v).__name__} {v!r}")
    if v is None:
        return v
    if isinstance(v, float) and not math.isfinite(v):
        raise RecipeError(f"recipe key '{key_}' must be a finite number, got {v}")
    if meta["choices"] and v not in meta["choices"]:
        raise RecipeError(f"recipe key '{key_}' must be one of {', '.join(map(str, meta['choices']))}, got {v!r}")
    low, high = meta["low"], meta["high"]
    if isinstance(v, (int, float)) and not isinstance(v, bool) and (low is not None or high is not None):
        below = low is not None and (v <= low if meta["low_open"] else v < low)
        above = high is not None and (v >= high if meta["high_open"] else v > high)
        if below or above:
            raise RecipeError(f"recipe key '{key_}' must be {_range_text(meta)}, got {v}")
    return v


def _range_text(meta: dict) -> str:
    low, high = meta["low"], meta["high"]
    if high is None:
        return f"greater than {low}" if meta["low_open"] else f"at least {low}"
    if low is None:
        return f"at most {high}"
    if _is_int(low) and _is_int(high) and not (meta["low_open"] or meta["high_open"]):
        return f"from {low} to {high}"
    return f"in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"


# -- files and overrides --------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            name = self.construct_object(k, deep=deep)
            if name in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {name!r} given twice", k.start_mark)
            seen.add(name)
        return super().construct_mapping(node, deep)


def read_mapping(path: str, what: str) -> dict:
    """A YAML file that must hold a mapping (a recipe, a fragment, a run's recipe); RecipeError otherwise."""
    if not os.path.isfile(path):
        raise RecipeError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a {what} must be a YAML mapping")
    return raw


def parse_override(expr: str) -> tuple[list[str], Any]:
    """'optimizer.lr=3e-4' -> (['optimizer', 'lr'], 0.0003); the value is read as YAML."""
    if "=" not in expr:
        raise RecipeError(f"--set expects key.path=value, got {expr!r}")
    key_, raw = expr.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        raise RecipeError(f"--set {key_}: cannot read value {raw!r}") from None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)
    if not key_ or any(not p for p in key_.split(".")):
        raise RecipeError(f"--set expects key.path=value, got {expr!r}")
    return key_.split("."), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_bits(text: "str | int") -> dict:
    """The quant keys a --bits value sets: ``4`` is W4A4 (``quant.bits``), ``W4A8`` sets
    ``quant.weight_bits`` and ``quant.act_bits``. RecipeError, one line, otherwise."""
    m = re.fullmatch(r"(?:[Ww](\d+)[Aa](\d+)|(\d+))", str(text).strip())
    if not m:
        raise RecipeError(f"--bits takes a bit width (4: W4A4) or weight and activation bits (W4A8), got {text!r}")
    w, a = (int(m[3]), int(m[3])) if m[3] else (int(m[1]), int(m[2]))
    if w not in WEIGHT_BITS:
        raise RecipeError(f"--bits {text}: weights take 2 to 8 bits, got {w}")
    if a not in BITS:
        raise RecipeError(f"--bits {text}: activations take 2 to 8 bits or 16, got {a}")
    return {"bits": w} if m[3] else {"weight_bits": w, "act_bits": a}


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``, mapping by mapping."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_recipe(
    path: str | None = None,
    overrides: list[str] = (),
    bits: str | int | None = None,
    optimizer: str | None = None,
    seed: int | None = None,
    base: dict | None = None,
    fragments: list[str] = (),
) -> Recipe:
    """Read, override and validate a recipe, in this order: the file, the ``fragments`` merged over
    it, ``bits``/``optimizer``/``seed``, then the ``overrides`` (which win); defaults fill the rest.

    Args:
        path: a shipped recipe's name (``quickstart``: ``qat-sadam recipes``) or a YAML file's path;
            None: start from ``base``.
        overrides: ``key.path=value`` strings, the value read as YAML (``optimizer.lr=3e-4``).
        bits: ``4`` (W4A4, ``quant.bits``) or ``"W4A8"`` (``quant.weight_bits`` and ``quant.act_bits``).
        optimizer: the optimizer's name; settings only another optimizer takes are dropped.
        seed: the run's seed.
        base: a recipe mapping to start from (a run's own recipe, when resuming).
        fragments: recipe files merged over the recipe (e.g. the ``mixed_precision.yaml`` that
            ``qat-sadam sensitivity`` proposes).

    Returns:
        The validated ``Recipe``.

    Raises:
        RecipeError: one line naming the key, the file or the value.
    """
    raw: dict = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        path = configs.resolve("recipe", path)
        raw = read_mapping(path, "recipe")
        raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    for frag in fragments:
        raw = merge(raw, read_mapping(frag, "recipe fragment"))
    if bits is not None:
        raw.setdefault("quant", {})
        if not isinstance(raw["quant"], dict):
            raise RecipeError("recipe key 'quant' must be a mapping")
        raw["quant"].update(parse_bits(bits))
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
    return Recipe.from_dict(raw)


def dump_recipe(recipe: Recipe, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(recipe.to_dict(), f, sort_keys=False)


def reference() -> str:
    """The recipe reference (markdown), generated from the schema: every key, its type, default,
    allowed values and meaning."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from `qat_sadam/train/recipe.py` by `qat-sadam recipe reference`; a test fails when the two",
        "disagree. Every key is optional; `qat-sadam recipe show NAME` prints a recipe with all of them.",
        "",
        "| key | type | default | values | meaning |",
        "|---|---|---|---|---|",
    ]
    lines += _reference_rows(Recipe, "")
    return "\n".join(lines) + "\n"


def _reference_rows(cls: type, path: str) -> list[str]:
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            rows.append(f"| **{path}{f.name}** | section | | | {f.metadata['doc']} |")
            rows += _reference_rows(annotation, f"{path}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kinds = " or ".join(_TYPE_NAMES[t].replace("an ", "").replace("a ", "") for t in _allowed(annotation))
        meta = f.metadata
        values = (
            ", ".join(map(str, meta["choices"]))
            if meta["choices"]
            else _range_text(meta)
            if meta["low"] is not None or meta["high"] is not None
            else ""
        )
        shown = yaml.safe_dump(default, default_flow_style=True, width=float("inf")).strip().removesuffix("...").strip()
        rows.append(f"| `{path}{f.name}` | {kinds} | `{shown}` | {values} | {meta['doc']} |")
    return rows
