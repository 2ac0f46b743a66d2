"""The recipe's model: built by name, loaded from its starting point, prepared for QAT."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from ..errors import CheckpointError, RecipeError
from ..models import build_model, check_values, load_weights, read_state_dict, timm_state_dict, torchvision_state_dict
from ..quant import prepare_qat
from .checkpoint import load_checkpoint
from .recipe import ModelSection, Recipe
from .run import LAST, Run


def build_float_model(recipe: Recipe, info: dict, load_start: bool = True) -> tuple[nn.Module, dict]:
    """The recipe's float model, with the trained weights it starts from when ``load_start`` and the
    recipe names some (``model.checkpoint`` or ``model.weights``). Returns the model and what was
    loaded: {"source": ..., "reset_classifier": [keys left at a fresh init]} or {}.
    ``info``: num_classes, in_channels, image_size."""
    m = recipe.model
    kw = {
        k: getattr(m, k)
        for k in ("cifar_stem", "widths", "width", "dropout", "source", "kwargs")
        if getattr(m, k) is not None
    }
    model = build_model(
        m.name, info["num_classes"], image_size=info["image_size"], in_channels=info["in_channels"], **kw
    )
    if not (load_start and recipe.starts_trained):
        return model, {}
    sd, source = _start_state_dict(m)
    check_values(sd, source)
    reset = load_weights(model, sd, source, info["num_classes"], m.reset_classifier)
    return model, {"source": source, "reset_classifier": reset}


def _start_state_dict(m: ModelSection) -> tuple[dict, str]:
    if m.weights:
        sd = timm_state_dict(m.name) if m.source == "timm" else torchvision_state_dict(m.name, m.weights)
        return sd, f"model.weights {m.weights}"
    path = m.checkpoint
    if not os.path.isdir(path):
        return read_state_dict(path), f"model.checkpoint {path}"
    # A qat-sadam float run: its final weights, not a test-selected best.
    last = Run(path).checkpoint(LAST)
    ck = load_checkpoint(last)
    if saved_recipe(ck, last).quantized:
        raise CheckpointError(
            f"model.checkpoint: {path} is a QAT run; start from a float run (quant.enabled: false) "
            "or a float state_dict"
        )
    return ck["model"], f"model.checkpoint {path}"


def quantize_model(recipe: Recipe, model: nn.Module) -> nn.Module:
    """The model prepared for QAT (a copy; not calibrated), or the model itself for a float recipe."""
    if not recipe.quantized:
        return model
    try:
        return prepare_qat(model, recipe.quant.config())
    except ValueError as e:  # a pattern that matches nothing, a module that cannot be quantized
        raise RecipeError(str(e)) from None


def build_qat_model(recipe: Recipe, info: dict) -> nn.Module:
    """The recipe's model as its run checkpoints store it (prepared for QAT unless a float recipe),
    with random weights: the caller loads a checkpoint into it (``load_run_state``)."""
    return quantize_model(recipe, build_float_model(recipe, info, load_start=False)[0])


def load_run_state(model: nn.Module, state: dict, path: str, info: dict) -> None:
    """A run checkpoint's model state into the model its recipe builds, every key and shape checked
    first (a checkpoint copied from another run names the keys that differ)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: its model state is a {type(state).__name__}, not a state_dict")
    check_values(state, f"checkpoint {path}", trained=False)
    load_weights(model, state, f"checkpoint {path}", info["num_classes"])


INFO_KEYS = {"num_classes": int, "in_channels": int, "image_size": int, "mean": list, "std": list}


def saved_recipe(ck: dict, path: str) -> Recipe:
    """The recipe a run checkpoint holds, and its ``info`` checked: CheckpointError naming the file
    and the field for a checkpoint that unpickles safely but holds something else."""
    try:
        recipe = Recipe.from_saved(ck["recipe"])
    except RecipeError as e:
        raise CheckpointError(f"{path}: its recipe is not valid ({e})") from None
    info = ck.get("info")
    bad = [k for k, t in INFO_KEYS.items() if not isinstance(info, dict) or not isinstance(info.get(k), t)]
    if bad:
        raise CheckpointError(f"{path}: not a qat-sadam run checkpoint (info.{bad[0]} missing or of the wrong type)")
    return recipe


@dataclass
class LoadedRun:
    """A run's model as one of its checkpoints stored it, with what built it."""

    run: Run
    checkpoint: str  # the file loaded
    recipe: Recipe
    info: dict  # num_classes, in_channels, image_size, mean, std
    model: nn.Module  # in eval mode


def load_run(ref: str, checkpoint: str | None = None, data_root: str | None = None) -> LoadedRun:
    """The one way to load a run's model: built from the checkpoint's own recipe, every key and
    shape checked.

    Args:
        ref: a run directory, or one of its checkpoint files (RUN/checkpoints/X.pt).
        checkpoint: with a run directory, the checkpoint file to load; None: the one the run
            deploys (``Run.deployed_checkpoint``: its recipe's ``export.checkpoint``).
        data_root: where the run's data now is, if not where the recipe found it.

    Returns:
        A ``LoadedRun``: ``run`` (the ``Run``), ``checkpoint`` (the file), ``recipe`` (a ``Recipe``),
        ``info`` (classes, channels, image size, normalisation), ``model`` (in eval mode).

    Raises:
        CheckpointError: no such run or checkpoint, or one that holds something else.
    """
    run, given = Run.locate(ref)
    path = given or checkpoint or run.deployed_checkpoint()
    ck = load_checkpoint(path)
    recipe, info = saved_recipe(ck, path), ck["info"]
    if data_root:
        recipe.data.root = data_root
    model = build_qat_model(recipe, info)
    load_run_state(model, ck["model"], path, info)
    return LoadedRun(run, path, recipe, info, model.eval())
