"""The files of a run directory: recipe.yaml, metrics.jsonl, checkpoints/, summary.json, and the
lock that keeps a second writer out."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil

import yaml

from ..errors import CheckpointError, UserError
from .checkpoint import load_checkpoint

RUN_FILES = {"recipe.yaml", "metrics.jsonl", "checkpoints", "curves.png", "tensorboard"}
LOCK = ".lock"
LAST, PREVIOUS = "last.pt", "last.prev.pt"


class RunLock:
    """An exclusive OS lock (flock) on RUN/.lock for as long as a run, an export or a compare cell
    writes into RUN. The kernel releases it when the process dies, even by kill -9: no stale locks.
    A second writer gets a UserError naming the holder's pid. A directory this lock created and
    nothing else filled is removed again on release."""

    def __init__(self, run_dir: str):
        self.run_dir, self.path, self.fd, self.created = run_dir, os.path.join(run_dir, LOCK), None, False

    def __enter__(self) -> "RunLock":
        self.created = not os.path.exists(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"run directory {self.run_dir} is in use by process {holder} (lock {self.path}); "
                                "wait for it to finish or use another --out") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.created and os.listdir(self.run_dir) == [LOCK]:
            shutil.rmtree(self.run_dir)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def run_files(run_dir: str) -> list[str]:
    """What a run directory holds, its lock aside."""
    return [f for f in os.listdir(run_dir) if f != LOCK] if os.path.isdir(run_dir) else []


def clear_run_dir(run_dir: str) -> None:
    """Delete a run directory's contents, keeping the lock the caller holds."""
    for f in run_files(run_dir):
        p = os.path.join(run_dir, f)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)


def resume_checkpoint(run_dir: str) -> tuple[dict, str | None]:
    """The checkpoint a resumed run continues from, and a note when it is not the newest: a
    last.pt that is missing or unreadable (a disk fault, a copy cut short) falls back to the
    previous one, last.prev.pt, which every save keeps."""
    last, previous = (os.path.join(run_dir, "checkpoints", n) for n in (LAST, PREVIOUS))
    try:
        return load_checkpoint(last), None
    except CheckpointError as e:
        if not os.path.isfile(previous):
            raise CheckpointError(f"--resume: {e}; no previous checkpoint {previous} to fall back to") from None
        ck = load_checkpoint(previous)
        return ck, f"{last} is unusable ({e}); resuming from {previous} (step {ck['global_step']})"


def summary_path(run_dir: str) -> str:
    return os.path.join(run_dir, "summary.json")


def read_summary(run_dir: str) -> dict:
    try:
        with open(summary_path(run_dir)) as f:
            summary = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{summary_path(run_dir)}: not a readable summary ({type(e).__name__}); delete it to have "
                        "the run summarised again") from None
    if not isinstance(summary, dict):
        raise UserError(f"{summary_path(run_dir)}: not a summary (a JSON object)")
    return summary


def write_summary(run_dir: str, summary: dict) -> None:
    """Written to a temporary file, then renamed over summary.json: a reader never sees half of it."""
    tmp = summary_path(run_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, summary_path(run_dir))


def run_recipe(run_dir: str) -> dict:
    """The recipe a run was trained with (its recipe.yaml)."""
    path = os.path.join(run_dir, "recipe.yaml")
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable recipe ({type(e).__name__})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: not a recipe (a YAML mapping)")
    return recipe
