"""The qat-sadam command line: train, eval, compare, export, validate.

User errors print one line on stderr and exit with code 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    pass


def _bits(v: str) -> int:
    try:
        b = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits must be an integer from 2 to 8, got {v!r}") from None
    if not 2 <= b <= 8:
        raise argparse.ArgumentTypeError(f"--bits must be an integer from 2 to 8, got {b}")
    return b


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def _prepare_out(out: str, force: bool, resume: bool) -> None:
    if resume:
        if not os.path.isfile(os.path.join(out, "checkpoints", "last.pt")):
            raise UserError(f"--resume: no checkpoint at {os.path.join(out, 'checkpoints', 'last.pt')}")
        return
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not force:
            raise UserError(f"output directory {out} exists and is not empty; use --force to overwrite or --resume to continue")
        if not os.path.isdir(out) or not ({"recipe.yaml", "metrics.jsonl", "checkpoints"} & set(os.listdir(out))):
            raise UserError(f"--force: refusing to delete {out}: it does not look like a qat-sadam run directory")
        shutil.rmtree(out)


def cmd_train(a) -> int:
    from .train import distributed
    from .train.recipe import load_recipe
    from .train.trainer import Trainer

    out = a.out or os.path.join("runs", f"{os.path.splitext(os.path.basename(a.recipe))[0]}")
    if a.resume:
        from .train.checkpoint import load_checkpoint

        recipe = load_checkpoint(os.path.join(out, "checkpoints", "last.pt"))["recipe"] if os.path.isfile(
            os.path.join(out, "checkpoints", "last.pt")) else None
        _prepare_out(out, a.force, True)
    else:
        recipe = load_recipe(a.recipe, a.set, bits=a.bits, optimizer=a.optimizer, seed=a.seed)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 owns the run directory
            _prepare_out(out, a.force, False)
    trainer = Trainer(recipe, out, resume=a.resume, progress=not a.quiet)
    try:
        summary = trainer.train()
    finally:
        distributed.shutdown()
    if trainer.rank != 0:
        return 0
    if summary.get("interrupted"):
        print(f"interrupted at step {summary['step']}; checkpoint: {summary['checkpoint']} (continue with --resume)")
        return 130
    _print_summary(summary)
    if recipe["export"]["enabled"]:
        from .export.cli import export_run

        export_run(out, recipe["export"]["target"], os.path.join(out, "export"))
    print(f"results: {out}")
    return 0


def _print_summary(s: dict) -> None:
    rows = [("epochs", s["epochs"]), ("steps", s["steps"]), ("final test acc", s["final_acc"]),
            ("best test acc", s["best_acc"]), ("s / epoch", s["sec_per_epoch"]), ("mean damping", s["mean_damping"]),
            ("mean osc freq", s.get("osc_freq_mean")), ("skipped steps", s["skipped_steps"])]
    width = max(len(k) for k, _ in rows)
    print("\nsummary")
    for k, v in rows:
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


def cmd_eval(a) -> int:
    from .train.checkpoint import find_checkpoint, load_checkpoint
    from .train.trainer import Trainer

    path = find_checkpoint(a.run)
    ck = load_checkpoint(path)
    recipe = ck["recipe"]
    if a.data_root:
        recipe["data"]["root"] = a.data_root
    trainer = Trainer(recipe, os.path.dirname(os.path.dirname(path)), progress=False, calibrate_scales=False)
    trainer.model.load_state_dict(ck["model"])
    print(json.dumps({"checkpoint": path, **trainer.evaluate()}, indent=2))
    return 0


def cmd_compare(a) -> int:
    from .train.compare import compare

    specs = [s for s in a.optimizers.split(",") if s.strip()]
    if not specs:
        raise UserError("--optimizers: give at least one optimizer")
    out = a.out or os.path.join("runs", "compare-" + os.path.splitext(os.path.basename(a.recipe))[0])
    compare(a.recipe, specs, a.seeds, out, a.set, bits=a.bits, progress=not a.quiet, first_seed=a.first_seed,
            export_target=a.export, report_only=a.report_only)
    print(open(os.path.join(out, "results.md")).read())
    print(f"results: {out}/results.md, {out}/results.csv, {out}/curves.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qat-sadam", description="Quantization-aware training with S-Adam, and INT8 ONNX export.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a recipe", description="Train a QAT recipe.")
    t.add_argument("recipe", help="recipe YAML (ignored with --resume: the run's own recipe is used)")
    t.add_argument("--bits", type=_bits, help="W{bits}A{bits} with 8-bit first/last layers")
    t.add_argument("--optimizer", help="adamw, sadam, prox_sgd or sgd")
    t.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    t.add_argument("--out", help="run directory (default runs/<recipe name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    t.add_argument("--seed", type=int)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run or checkpoint", description="Test accuracy of a run's best checkpoint.")
    e.add_argument("run", help="run directory or checkpoint file")
    e.add_argument("--data-root", help="where the dataset lives, if not where the run found it")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="compare optimizers over seeds", description="Run a recipe under several optimizers and seeds.")
    c.add_argument("recipe")
    c.add_argument("--optimizers", required=True, help="comma-separated cells, e.g. adamw,sadam,sadam-reference@k=8,adamw-effective")
    c.add_argument("--seeds", type=int, default=3)
    c.add_argument("--first-seed", type=int, default=0)
    c.add_argument("--bits", type=_bits)
    c.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    c.add_argument("--out")
    c.add_argument("--export", metavar="TARGET", help="also export every run for this target profile and report ORT INT8 accuracy")
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--report-only", action="store_true", help="tabulate and plot the finished runs in --out; train nothing (with --export: export those not yet exported)")
    c.set_defaults(func=cmd_compare)

    from .export.cli import add_export_commands

    add_export_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .train.checkpoint import CheckpointError
    from .train.recipe import RecipeError
    from .export.freeze import ExportError
    from .export.validate import ValidationError
    from .train.trainer import TrainingStopped

    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (UserError, RecipeError, CheckpointError, ExportError, ValidationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
