"""Train a recipe into a run directory, resume it, evaluate it."""

from __future__ import annotations

import contextlib
import json
import os
import sys

from ..errors import UserError
from ..export import DEFAULT_TARGET, check_target_fits, load_target
from ..train import distributed
from ..train.curves import plot_curves
from ..train.model import load_run
from ..train.pipeline import deployed_weight_bits, evaluate_deployed, setup
from ..train.recipe import Recipe, load_recipe
from ..train.run import BEST, RUN_FILES, Run
from ..train.trainer import Trainer
from .export_run import export_finished_run


def prepare_out(run: Run, force: bool) -> None:
    """Check (and with ``force`` clear) a new run's directory; the caller holds its lock."""
    if os.path.exists(run.dir) and not os.path.isdir(run.dir):
        raise UserError(f"output directory {run.dir} exists and is a file")
    files = run.files()
    if files:
        if not force:
            raise UserError(
                f"output directory {run.dir} exists and is not empty; use --force to overwrite or --resume to continue"
            )
        if not RUN_FILES & set(files):
            raise UserError(f"--force: refusing to delete {run.dir}: it does not look like a qat-sadam run directory")
        run.clear()


# What --resume may change: how long the run goes on, what it logs, how often it saves, what it exports.
RESUMABLE = ("epochs", "max_steps", "logging.", "checkpoint.", "export.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resumed_recipe(
    run: Run, overrides: list[str], bits: int | None, optimizer: str | None, seed: int | None, fragments: list[str] = ()
) -> dict:
    """The run's own recipe with the overrides a resumed run can take; any other change (model,
    quantizers, optimizer, data, seed) is refused, naming the key and both values. The changes go to
    RUN/recipe_history.jsonl. Keys the saved recipe lacks (added to the schema after the run began)
    take their defaults, with a note."""
    ck, _ = run.resume_checkpoint()
    saved = ck["recipe"]
    old = Recipe.from_saved(saved)  # a run begun by an older version: the keys added since get their defaults
    before = _flat(old.to_dict())
    added = sorted(set(before) - set(_flat(saved)))
    if added:
        print(
            f"note: the run's recipe predates {', '.join(added)}; resuming with the default(s) "
            f"{', '.join(repr(before[k]) for k in added)}",
            file=sys.stderr,
        )
    if not (overrides or fragments or bits is not None or optimizer is not None or seed is not None):
        return old
    new = load_recipe(
        None, overrides, bits=bits, optimizer=optimizer, seed=seed, base=old.to_dict(), fragments=fragments
    )
    check_resume(run, ck, new)
    return new


def check_resume(run: Run, ck: dict, new: Recipe) -> None:
    """Refuse to continue the run under ``new`` when it differs from the run's own recipe (that of
    its checkpoint ``ck``) in anything but RESUMABLE keys, naming the key and both values; the
    changes allowed go to RUN/recipe_history.jsonl."""
    before, after = _flat(Recipe.from_saved(ck["recipe"]).to_dict()), _flat(new.to_dict())
    changes = {
        k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)
    }
    for key, (was, now) in changes.items():
        if not key.startswith(RESUMABLE):
            raise UserError(
                f"--resume cannot change {key} ({was!r} -> {now!r}): it changes the model, quantizers, "
                "optimizer or data of the run; start a new run instead"
            )
    if changes:
        with open(run.history_file, "a") as f:
            f.write(json.dumps({"step": ck["global_step"], "changes": changes}) + "\n")


def fit(recipe: Recipe, run: Run, resume: bool = False, progress: bool = True) -> dict:
    """Train ``recipe`` in ``run`` (the caller holds its lock), or with ``resume`` continue it from
    its last checkpoint; writes curves.png. Returns the summary, or ``{"interrupted": True, ...}``
    when SIGINT or SIGTERM stopped it after a save."""
    trainer = Trainer(recipe, run.dir, resume=resume, progress=progress)
    if trainer.resume_note and trainer.rank == 0:
        print(f"note: {trainer.resume_note}", file=sys.stderr)
    try:
        summary = trainer.train()
    finally:
        distributed.shutdown()
    if trainer.rank == 0:
        q = recipe.quant
        bits = f"W{q.weight_bits or q.bits}A{q.act_bits or q.bits}" if q.enabled else "float"
        title = f"{os.path.basename(os.path.normpath(run.dir))} ({recipe.name}, {bits})"
        print(f"curves: {plot_curves({recipe.name: [run.metrics_file]}, run.curves_file, title)}")
    return summary


def train_recipe(
    recipe_path: str,
    out: str | None = None,
    overrides: list[str] = (),
    bits: int | None = None,
    optimizer: str | None = None,
    seed: int | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    fragments: list[str] = (),
) -> dict:
    """Train (or with ``resume`` continue) a run while holding its lock; export and validate it when
    the recipe says so (``fragments``: recipe files merged over the recipe, see ``load_recipe``).
    Returns the summary; ``{"interrupted": True, "signal": ...}`` when SIGINT or SIGTERM stopped it
    after a save."""
    out = out or os.path.join("runs", os.path.splitext(os.path.basename(recipe_path))[0])
    if not resume:
        recipe = load_recipe(recipe_path, overrides, bits=bits, optimizer=optimizer, seed=seed, fragments=fragments)
    run = Run(out)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 owns the run directory
    with run.lock() if main_rank else contextlib.nullcontext():
        if resume:
            recipe = resumed_recipe(run, overrides, bits, optimizer, seed, fragments)
        elif main_rank:
            prepare_out(run, force)
        if recipe.export.enabled and recipe.quantized:  # a format the target cannot hold fails now, not after training
            check_target_fits(recipe.quant.config(), load_target(recipe.export.target or DEFAULT_TARGET))
        summary = fit(recipe, run, resume, progress)
        if not main_rank or summary.get("interrupted"):
            return summary
        print_summary(summary)
        if recipe.export.enabled:
            export_finished_run(out, recipe.export.target)
    print(f"results: {out}")
    return summary


def print_summary(s: dict) -> None:
    rows = [
        ("epochs", s["epochs"]),
        ("steps", s["steps"]),
        ("final test acc", s["final_acc"]),
        ("best test acc", s["best_acc"]),
        ("s / epoch", s["sec_per_epoch"]),
        ("mean damping", s["mean_damping"]),
        ("mean osc freq", s.get("osc_freq_mean")),
        ("skipped steps", s["skipped_steps"]),
    ]
    rows = [(k, v) for k, v in rows if v is not None]  # a feature that is off (no S-Adam: no damping) says nothing
    width = max(len(k) for k, _ in rows)
    print("\nsummary")
    for k, v in rows:
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def evaluate_run(ref: str, data_root: str | None = None) -> dict:
    """Test accuracy of a run's best checkpoint (or of a checkpoint file), as deployed."""
    run, given = Run.locate(ref)
    loaded = load_run(ref, checkpoint=None if given else run.find_checkpoint(BEST), data_root=data_root)
    s = setup(loaded.recipe)
    model = loaded.model.to(s.device)
    result = {
        "checkpoint": loaded.checkpoint,
        **evaluate_deployed(model, loaded.recipe, s.test_loader, deployed_weight_bits(loaded.recipe)),
    }
    if os.path.isfile(run.curves_file):
        result["curves"] = run.curves_file
    print(json.dumps(result, indent=2))
    return result
