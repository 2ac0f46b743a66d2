"""Checkpoints written atomically and read without unpickling code."""

from __future__ import annotations

import os
import tempfile

import torch

from ..errors import CheckpointError


def save_atomic(obj, path: str, previous: str | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``; with
    ``previous``, the file ``path`` held until now is kept under that name.

    A crash or a full disk leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = None, None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
        with os.fdopen(fd, "wb") as f:
            fd = None
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and os.path.isfile(path):
            os.replace(path, previous)  # a crash here leaves previous and no path: resume falls back to it
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint is unchanged"
        ) from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load with weights_only=True: a pickle that would run code is refused."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refusing to load {path}: not a valid qat-sadam checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "recipe" not in ckpt:
        raise CheckpointError(f"{path} is not a qat-sadam checkpoint (no model and recipe in it)")
    return ckpt
