"""A run directory and the one owner of its layout: recipe.yaml, recipe_history.jsonl,
metrics.jsonl, checkpoints/, summary.json, curves.png, exports, and the lock that keeps a second
writer out. Every workflow and tool finds a run's files through ``Run`` (and loads its model with
``model.load_run``)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil

import yaml

from ..errors import CheckpointError, UserError
from .checkpoint import load_checkpoint

LOCK = ".lock"
CHECKPOINTS = "checkpoints"
LAST, PREVIOUS, BEST, PTQ = "last.pt", "last.prev.pt", "best.pt", "ptq.pt"
# What marks a folder as a run (a --force refuses to clear a folder holding none of these).
RUN_FILES = {"recipe.yaml", "metrics.jsonl", CHECKPOINTS, "curves.png", "tensorboard"}


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
                raise UserError(
                    f"run directory {self.run_dir} is in use by process {holder} (lock {self.path}); "
                    "wait for it to finish or use another --out"
                ) from None
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


class Run:
    """A run directory and its layout: ``recipe_file``, ``metrics_file``, ``summary_file``,
    ``curves_file``, ``checkpoint(name)`` (``LAST``, ``BEST``, ``PTQ``), ``export_dir()``, ``lock()``.
    ``Run(path)``, or ``Run.locate(path)`` for a run or one of its checkpoint files; its model loads
    with ``load_run``."""

    def __init__(self, path: str):
        self.dir = path

    @classmethod
    def locate(cls, ref: str) -> tuple["Run", str | None]:
        """A run directory, or a checkpoint file inside one (RUN/checkpoints/X.pt) and that file."""
        if os.path.isdir(ref):
            return cls(ref), None
        if not os.path.isfile(ref):
            raise CheckpointError(f"no such run directory or checkpoint: {ref}")
        return cls(os.path.dirname(os.path.dirname(os.path.abspath(ref)))), ref

    def file(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def recipe_file(self) -> str:
        return self.file("recipe.yaml")

    @property
    def metrics_file(self) -> str:
        return self.file("metrics.jsonl")

    @property
    def summary_file(self) -> str:
        return self.file("summary.json")

    @property
    def curves_file(self) -> str:
        return self.file("curves.png")

    @property
    def history_file(self) -> str:
        return self.file("recipe_history.jsonl")

    def checkpoint(self, name: str = LAST) -> str:
        return self.file(CHECKPOINTS, name)

    def create(self) -> None:
        """The run directory and its checkpoint folder."""
        os.makedirs(self.file(CHECKPOINTS), exist_ok=True)

    def has_checkpoint(self, *names: str) -> bool:
        return any(os.path.isfile(self.checkpoint(n)) for n in names)

    def export_dir(self, name: str = "export") -> str:
        return self.file(name)

    def lock(self) -> RunLock:
        return RunLock(self.dir)

    # -- contents -------------------------------------------------------------------------
    def files(self) -> list[str]:
        """What the run directory holds, its lock aside."""
        return [f for f in os.listdir(self.dir) if f != LOCK] if os.path.isdir(self.dir) else []

    def clear(self) -> None:
        """Delete the run directory's contents, keeping the lock the caller holds."""
        for f in self.files():
            p = self.file(f)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)

    def recipe(self) -> dict:
        """The recipe the run was trained with (its recipe.yaml)."""
        try:
            with open(self.recipe_file) as f:
                recipe = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"{self.recipe_file}: not a readable recipe ({type(e).__name__})") from None
        if not isinstance(recipe, dict):
            raise UserError(f"{self.recipe_file}: not a recipe (a YAML mapping)")
        return recipe

    def read_summary(self) -> dict:
        try:
            with open(self.summary_file) as f:
                summary = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(
                f"{self.summary_file}: not a readable summary ({type(e).__name__}); delete it to have "
                "the run summarised again"
            ) from None
        if not isinstance(summary, dict):
            raise UserError(f"{self.summary_file}: not a summary (a JSON object)")
        return summary

    def write_summary(self, summary: dict) -> None:
        """Written to a temporary file, then renamed over summary.json: a reader never sees half of it."""
        tmp = self.summary_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, self.summary_file)

    # -- checkpoints ----------------------------------------------------------------------
    def resume_checkpoint(self) -> tuple[dict, str | None]:
        """The checkpoint a resumed run continues from, and a note when it is not the newest: a
        last.pt that is missing or unreadable (a disk fault, a copy cut short) falls back to the
        previous one, last.prev.pt, which every save keeps."""
        last, previous = self.checkpoint(LAST), self.checkpoint(PREVIOUS)
        try:
            return load_checkpoint(last), None
        except CheckpointError as e:
            if not os.path.isfile(previous):
                raise CheckpointError(f"--resume: {e}; no previous checkpoint {previous} to fall back to") from None
            ck = load_checkpoint(previous)
            return ck, f"{last} is unusable ({e}); resuming from {previous} (step {ck['global_step']})"

    def find_checkpoint(self, name: str = BEST) -> str:
        """The named checkpoint, else last.pt."""
        for n in (name, LAST):
            if os.path.isfile(self.checkpoint(n)):
                return self.checkpoint(n)
        raise CheckpointError(f"no checkpoint in {self.file(CHECKPOINTS)}")

    def deployed_checkpoint(self) -> str:
        """The checkpoint a run exports and evaluates: the one its recipe's ``export.checkpoint`` names
        (best: the best test accuracy; last: the final weights), else what exists."""
        name = BEST
        if os.path.isfile(self.recipe_file):
            name = f"{self.recipe().get('export', {}).get('checkpoint', 'best')}.pt"
        return self.find_checkpoint(name)
