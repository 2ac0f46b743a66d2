"""Trained weights for a built model: state_dict files (.pt/.pth, .safetensors) and torchvision's
weight enums, checked key by key against the model before anything is loaded."""

from __future__ import annotations

import os
import urllib.error
import urllib.parse

import safetensors.torch
import torch
import torchvision
from torch import nn

from ..errors import CheckpointError
from .builders import timm_module

# Where trainers nest the state_dict inside a saved dict (timm, Lightning, torchtune, qat-sadam).
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")
_SHOWN = 4  # keys named in an error message


def _is_state_dict(d) -> bool:
    return (
        isinstance(d, dict)
        and bool(d)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())
    )


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a torch file (``weights_only=True``: no pickled code).

    A dict that wraps it under state_dict/model/model_state_dict is unwrapped, and a ``module.``
    prefix (DataParallel) is removed, as timm's and torchvision's loaders do."""
    if not os.path.isfile(path):
        raise CheckpointError(f"model.checkpoint: no such file: {path}")
    try:
        if path.endswith(".safetensors"):
            sd = safetensors.torch.load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"model.checkpoint: cannot read {path} as a state_dict ({first[:200]})") from None
    if not _is_state_dict(sd) and isinstance(sd, dict):
        sd = next((sd[k] for k in _WRAPPERS if _is_state_dict(sd.get(k))), sd)
    if not _is_state_dict(sd):
        raise CheckpointError(f"model.checkpoint: {path} holds no state_dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _weights_enum(model_name: str):
    try:
        return torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        return None


def weight_names(model_name: str) -> list[str]:
    """The names of torchvision's weights for a model (``IMAGENET1K_V1``, ...); [] if none."""
    enum = _weights_enum(model_name)
    return [w.name for w in enum] if enum is not None else []


def torchvision_state_dict(model_name: str, weights: str) -> dict[str, torch.Tensor]:
    """The state_dict of a torchvision weight enum (``IMAGENET1K_V1``, ``DEFAULT``), through
    torchvision's weights API and the torch hub cache; offline and not cached, the error names the
    file and the folder to put it in."""
    names = weight_names(model_name)
    if weights not in names + ["DEFAULT"]:
        raise CheckpointError(
            f"model.weights: {model_name} has no weights {weights!r}; choose from {', '.join(names) or 'none'}"
        )
    enum = _weights_enum(model_name)
    w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    file = os.path.basename(urllib.parse.urlparse(w.url).path)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")  # torch hub's own folder, not a run's
    try:
        return w.get_state_dict(progress=False, check_hash=False, weights_only=True)
    except (urllib.error.URLError, OSError) as e:
        raise CheckpointError(
            f"model.weights {model_name}.{w.name}: {file} is not in the torch hub cache {cache} and "
            f"downloading it failed ({getattr(e, 'reason', e)}); put the file there "
            "(or point TORCH_HOME at a cache that has it)"
        ) from None


def timm_state_dict(model_name: str) -> dict[str, torch.Tensor]:
    """The state_dict of timm's pretrained weights for a model, through timm's API (the Hugging Face
    hub cache); offline and not cached, the error names the repository and the cache folder."""
    timm = timm_module()
    import huggingface_hub  # installed with timm, the optional dependency checked above

    try:
        return timm.create_model(model_name, pretrained=True).state_dict()
    except Exception as e:  # huggingface_hub raises several types when offline or the file is missing
        cfg = timm.models.get_pretrained_cfg(model_name)
        repo = getattr(cfg, "hf_hub_id", None) or model_name
        raise CheckpointError(
            f"model.weights pretrained for timm {model_name}: {repo} is not in the Hugging Face cache "
            f"{huggingface_hub.constants.HF_HUB_CACHE} and downloading it failed ({type(e).__name__}); "
            "put it there (or point HF_HOME at a cache that has it)"
        ) from None


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (", ..." if len(keys) > _SHOWN else "")


def check_values(sd: dict, source: str, trained: bool = True) -> None:
    """Weights that are well-formed but wrong are refused, naming the file and the key: a value that
    is not a dense tensor of a real dtype; for ``trained`` float weights also a non-finite float or a
    negative BatchNorm running variance (it would make the fold's sqrt NaN and the float rung
    meaningless). A run's own state is checked for the first only: its quantizer buffers may hold inf."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: {k} is a {type(v).__name__}, not a tensor")
        if v.layout != torch.strided or v.is_meta:
            raise CheckpointError(f"{source}: {k} is a {'meta' if v.is_meta else 'sparse'} tensor; save dense weights")
        if v.is_complex():
            raise CheckpointError(f"{source}: {k} is complex ({v.dtype}); a network's weights are real")
        if not trained:
            continue
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: {k} holds non-finite values (NaN or inf)")
        if k.endswith("running_var") and bool((v < 0).any()):
            raise CheckpointError(f"{source}: {k} has a negative BatchNorm variance ({float(v.min()):.3g})")


def load_weights(
    model: nn.Module, sd: dict[str, torch.Tensor], source: str, num_classes: int, reset_classifier: bool = False
) -> list[str]:
    """Load ``sd`` into ``model`` after checking every key and shape; returns the classifier keys
    left at their fresh initialisation (only with ``reset_classifier``, only where the checkpoint's
    class count differs). Any other mismatch raises CheckpointError naming the first keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = [f"{len(missing)} missing ({_names(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({_names(unexpected)})"] if unexpected else []
        raise CheckpointError(f"{source} does not match the model's keys: {'; '.join(parts)}")
    reshaped = [k for k in own if sd[k].shape != own[k].shape]
    classifier = [k for k in reshaped if own[k].dim() >= 1 and own[k].shape[0] == num_classes]
    other = [k for k in reshaped if k not in classifier]
    if other:
        k = other[0]
        raise CheckpointError(
            f"{source}: {len(other)} tensors have other shapes than the model's "
            f"({k}: {tuple(sd[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model)"
        )
    if classifier and not reset_classifier:
        k = classifier[0]
        raise CheckpointError(
            f"{source} was trained for {sd[k].shape[0]} classes, the model has {num_classes} "
            f"({_names(classifier)}); set model.reset_classifier: true to start the classifier afresh"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k not in classifier}, strict=False)
    return classifier
