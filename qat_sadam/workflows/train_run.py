"""Train a recipe into a run directory, resume it, evaluate it."""
from __future__ import annotations

import json
import os
import shutil

from ..errors import UserError
from ..train import distributed
from ..train.checkpoint import find_checkpoint, load_checkpoint
from ..train.recipe import load_recipe
from ..train.run_dir import RUN_FILES
from ..train.trainer import Trainer
from .export_run import export_finished_run


def prepare_out(out: str, force: bool, resume: bool) -> None:
    """Check (and with ``force`` clear) a run directory before training writes into it."""
    last = os.path.join(out, "checkpoints", "last.pt")
    if resume:
        if not os.path.isfile(last):
            raise UserError(f"--resume: no checkpoint at {last}")
        return
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not force:
            raise UserError(f"output directory {out} exists and is not empty; use --force to overwrite or --resume to continue")
        if not os.path.isdir(out) or not (RUN_FILES & set(os.listdir(out))):
            raise UserError(f"--force: refusing to delete {out}: it does not look like a qat-sadam run directory")
        shutil.rmtree(out)


def train_recipe(recipe_path: str, out: str | None = None, overrides: list[str] = (), bits: int | None = None,
                 optimizer: str | None = None, seed: int | None = None, resume: bool = False, force: bool = False,
                 progress: bool = True) -> dict:
    """Train (or with ``resume`` continue) a run; export and validate it when the recipe says so.

    Returns the summary; ``{"interrupted": True, ...}`` when Ctrl-C stopped it after a save."""
    out = out or os.path.join("runs", os.path.splitext(os.path.basename(recipe_path))[0])
    if resume:
        prepare_out(out, force, True)
        recipe = load_checkpoint(os.path.join(out, "checkpoints", "last.pt"))["recipe"]
    else:
        recipe = load_recipe(recipe_path, overrides, bits=bits, optimizer=optimizer, seed=seed)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 owns the run directory
            prepare_out(out, force, False)
    trainer = Trainer(recipe, out, resume=resume, progress=progress)
    try:
        summary = trainer.train()
    finally:
        distributed.shutdown()
    if trainer.rank != 0 or summary.get("interrupted"):
        return summary
    print_summary(summary)
    if recipe["export"]["enabled"]:
        export_finished_run(out, recipe["export"]["target"])
    print(f"results: {out}")
    return summary


def print_summary(s: dict) -> None:
    rows = [("epochs", s["epochs"]), ("steps", s["steps"]), ("final test acc", s["final_acc"]),
            ("best test acc", s["best_acc"]), ("s / epoch", s["sec_per_epoch"]), ("mean damping", s["mean_damping"]),
            ("mean osc freq", s.get("osc_freq_mean")), ("skipped steps", s["skipped_steps"])]
    width = max(len(k) for k, _ in rows)
    print("\nsummary")
    for k, v in rows:
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def evaluate_run(run: str, data_root: str | None = None) -> dict:
    """Test accuracy of a run's best checkpoint (or of a checkpoint file)."""
    path = find_checkpoint(run)
    ck = load_checkpoint(path)
    recipe = ck["recipe"]
    if data_root:
        recipe["data"]["root"] = data_root
    trainer = Trainer(recipe, os.path.dirname(os.path.dirname(path)), progress=False, initialize=False)
    trainer.model.load_state_dict(ck["model"])
    result = {"checkpoint": path, **trainer.evaluate()}
    print(json.dumps(result, indent=2))
    return result
