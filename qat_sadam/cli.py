"""The qat-sadam command line: parses arguments and calls the workflows (``qat_sadam.workflows``).

User errors print one line on stderr and exit with code 2; no traceback. The workflows are
imported inside the command functions, on purpose: they import torch (seconds), and
``qat-sadam --help`` or a mistyped flag should answer at once.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from .errors import RecipeError, TrainingStopped, UserError

EXIT_USER_ERROR = 2


def _bits(v: str) -> str:
    from .train.recipe import parse_bits

    try:
        parse_bits(v)
    except RecipeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return v


def _runtimes(v: str) -> list[str]:
    names = [n.strip() for n in v.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--runtimes needs a comma-separated list of runtimes, or 'all'")
    return names


RUNTIMES_HELP = (
    "comma-separated runtimes to run the model on, overriding the target's: ort-cpu, qnn-htp, "
    "executorch-xnnpack, ort-web, openvino, or 'all'"
)


MERGE_HELP = (
    "a recipe fragment merged over the recipe, e.g. the mixed_precision.yaml of `sensitivity` (repeatable; --set wins)"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def cmd_train(a) -> int:
    from .workflows.train_run import train_recipe

    s = train_recipe(
        a.recipe,
        a.out,
        a.set,
        bits=a.bits,
        optimizer=a.optimizer,
        seed=a.seed,
        resume=a.resume,
        force=a.force,
        progress=not a.quiet,
        fragments=a.merge,
    )
    if s.get("interrupted"):
        if s["rank"] == 0:
            print(
                f"interrupted by {s['signal']} at step {s['step']}; checkpoint: {s['checkpoint']} (continue with "
                "--resume)"
            )
        return 143 if s["signal"].startswith("SIGTERM") else 130  # 128 + the signal, as a shell reports it
    return 0


def cmd_ptq(a) -> int:
    from .workflows.ptq import ptq

    s = ptq(a.recipe, a.out, a.set, bits=a.bits, force=a.force, progress=not a.quiet, fragments=a.merge)
    return 0 if s["validation_passed"] else 1


def cmd_eval(a) -> int:
    from .workflows.train_run import evaluate_run

    evaluate_run(a.run, a.data_root)
    return 0


def cmd_sensitivity(a) -> int:
    from .workflows.sensitivity import sensitivity

    out = a.out or os.path.join(
        "runs", os.path.splitext(os.path.basename(os.path.normpath(a.source)))[0] + "-sensitivity"
    )
    if a.act_budget is not None and not a.activations:
        raise RecipeError("--act-budget proposes activation sites: add --activations (the sweep it is built from)")
    sensitivity(
        a.source,
        out,
        a.set,
        a.bits,
        a.samples,
        a.budget,
        progress=not a.quiet,
        activations=a.activations,
        act_budget=a.act_budget,
    )
    return 0


def _budget(flag: str, what: str):
    def parse(v: str) -> float:
        try:
            b = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a size ratio such as 1.1, got {v!r}") from None
        if not b >= 1 or b == float("inf"):  # NaN fails every comparison
            raise argparse.ArgumentTypeError(
                f"{flag} is a ratio to uniform low-bit {what} storage and must be >= 1, got {b}"
            )
        return b

    return parse


def _count(v: str) -> int:
    """A positive whole number (images, seeds)."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {n}")
    return n


def cmd_compare(a) -> int:
    from .workflows.compare import compare_cli

    compare_cli(
        a.recipe,
        a.optimizers,
        a.seeds,
        a.out,
        a.set,
        bits=a.bits,
        progress=not a.quiet,
        first_seed=a.first_seed,
        export_target=a.export,
        report_only=a.report_only,
    )
    return 0


def cmd_export(a) -> int:
    from .workflows.export_run import export_command

    rep = export_command(a.run, a.target, a.output, a.samples, a.data_root, a.runtimes, a.force)
    return 0 if rep["passed"] else 1


def cmd_validate(a) -> int:
    from .workflows.export_run import validate_model

    rep = validate_model(a.model, a.target, a.samples, a.run, a.runtimes)
    return 0 if rep["passed"] else 1


def cmd_list(a) -> int:
    from . import configs

    shipped = configs.names(a.kind)
    width = max(map(len, shipped))
    for name in shipped:
        print(f"{name:<{width}}  {configs.describe(a.kind, name)}")
    return 0


def cmd_models(a) -> int:
    from .errors import UserError
    from .models import model_names

    try:
        names = model_names(a.source)
    except ValueError as e:  # timm not installed
        raise UserError(str(e)) from None
    for name, what in names.items():
        print(f"{name:<14}  {what}" if what else name)
    if a.source == "own":
        print(
            "\nmodel.source: torchvision (default) or timm takes their classifiers (qat-sadam models --source ...); "
            "model.source: python takes your own package.module:factory (docs/guide/own-model.md)"
        )
    return 0


def cmd_recipe_show(a) -> int:
    import yaml

    from .train.recipe import load_recipe

    recipe = load_recipe(a.recipe, a.set, bits=a.bits, fragments=a.merge)
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
    return 0


def cmd_recipe_reference(a) -> int:
    from .train.recipe import reference

    print(reference(), end="")
    return 0


def cmd_runtimes(a) -> int:
    from .export.runtimes import RUNTIMES
    from .export.runtimes.ort_web import install

    if a.install_web:
        print(f"onnxruntime-web installed in {install()}")
    width = max(map(len, RUNTIMES))
    for name, rt in RUNTIMES.items():
        reason = rt.missing()
        state = f"not installed: {reason}; install: {rt.install}" if reason else "available"
        print(f"{name:<{width}}  {state}\n{'':<{width}}  {rt.what}")
    return 0


BITS_HELP = (
    "4: W4A4; W4A8: 4-bit weights, 8-bit activations; weights 2 to 8 bits, activations 2 to 8 or 16 (W8A16); "
    "first/last layers at least 8-bit"
)
RECIPE_HELP = "a shipped recipe by name (`qat-sadam recipes` lists them) or a recipe YAML file"
TARGET_HELP = "a shipped target profile by name (`qat-sadam targets` lists them) or a profile YAML file"


def _recipe_options(parser: argparse.ArgumentParser) -> None:
    """What changes a recipe on the command line, in the order load_recipe applies it (--set wins)."""
    parser.add_argument("--bits", type=_bits, help=BITS_HELP)
    parser.add_argument("--merge", action="append", default=[], metavar="FRAGMENT.yaml", help=MERGE_HELP)
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qat-sadam", description="Quantization-aware training with S-Adam, and INT8 ONNX export.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train a recipe",
        description="Train a QAT recipe. Every recipe key, with its default and range: `qat-sadam recipe reference` "
        "(docs/guide/recipes.md); a recipe with every default filled in: `qat-sadam recipe show NAME`.",
    )
    t.add_argument("recipe", help=RECIPE_HELP + " (ignored with --resume: the run's own recipe is used)")
    _recipe_options(t)
    t.add_argument("--optimizer", help="adamw, sadam, prox_sgd or sgd")
    t.add_argument("--out", help="run directory (default runs/<recipe name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    t.add_argument("--seed", type=int)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    q = sub.add_parser(
        "ptq",
        help="post-training quantization of a trained float model",
        description="Calibrate a recipe's trained float model (model.checkpoint or model.weights), "
        "export it to INT8 and validate it: the baseline a QAT fine-tune must beat.",
    )
    q.add_argument("recipe", help=RECIPE_HELP + ", with model.checkpoint or model.weights")
    _recipe_options(q)
    q.add_argument("--out", help="run directory (default runs/<recipe name>-ptq)")
    q.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_ptq)

    e = sub.add_parser(
        "eval", help="evaluate a run or checkpoint", description="Test accuracy of a run's best checkpoint."
    )
    e.add_argument("run", help="run directory or checkpoint file")
    e.add_argument("--data-root", help="where the dataset lives, if not where the run found it")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser(
        "compare", help="compare optimizers over seeds", description="Run a recipe under several optimizers and seeds."
    )
    c.add_argument("recipe", help=RECIPE_HELP)
    c.add_argument(
        "--optimizers",
        required=True,
        help="comma-separated cells, e.g. adamw,sadam,sadam-reference@k=8,adamw-effective",
    )
    c.add_argument("--seeds", type=_count, default=3)
    c.add_argument("--first-seed", type=int, default=0)
    c.add_argument("--bits", type=_bits, help=BITS_HELP)
    c.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    c.add_argument("--out")
    c.add_argument(
        "--export", metavar="TARGET", help="also export every run for this target profile and report ORT INT8 accuracy"
    )
    c.add_argument("--quiet", action="store_true")
    c.add_argument(
        "--report-only",
        action="store_true",
        help="tabulate and plot the finished runs in --out; train nothing "
        "(with --export: export those not yet exported)",
    )
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser(
        "sensitivity",
        help="per-layer bit-width sensitivity and a mixed-precision proposal",
        description="For each quantized layer of a recipe's trained float model: the PTQ accuracy drop "
        "when only that layer's weights go to the low bit width, and the gain when only it "
        "stays at 8 bits (integer reference = ORT, held-out training images).",
    )
    s.add_argument(
        "source",
        metavar="RUN|RECIPE",
        help="a recipe (name or YAML) with model.checkpoint or model.weights, or a run "
        "directory (a float run is quantized at --bits)",
    )
    s.add_argument("--bits", type=_bits, help="the low bit width (default: the recipe's quant.bits)")
    s.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    s.add_argument(
        "--samples", type=_count, default=1000, help="validation images held out from the end of the training set"
    )
    s.add_argument(
        "--budget",
        type=_budget("--budget", "weight"),
        help="propose quant.overrides within this ratio of uniform low-bit weight storage",
    )
    s.add_argument("--activations", action="store_true", help="sweep the activation quantizers too (weights low)")
    s.add_argument(
        "--act-budget",
        type=_budget("--act-budget", "activation"),
        help="propose sites kept at 8-bit activations within this ratio of "
        "uniform low-bit activation storage (with --activations)",
    )
    s.add_argument("--out", help="output directory (default runs/<recipe>-sensitivity)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sensitivity)

    x = sub.add_parser(
        "export",
        help="export a run to INT8 ONNX and validate it",
        description="Export a run's best checkpoint to an INT8 QDQ ONNX model and validate it on ORT.",
    )
    x.add_argument("run", help="run directory or checkpoint")
    x.add_argument("--target", help=TARGET_HELP + " (default: the recipe's, else cpu-x86)")
    x.add_argument("-o", "--output", help="output directory (default RUN/export/TARGET, one per target)")
    x.add_argument("--force", action="store_true", help="replace the export the output directory holds")
    x.add_argument("--samples", type=_count, help="test samples for parity and accuracy (default: the whole test set)")
    x.add_argument("--data-root", help="where the dataset lives, if not where the run found it")
    x.add_argument("--runtimes", type=_runtimes, help=RUNTIMES_HELP)
    x.set_defaults(func=cmd_export)

    v = sub.add_parser(
        "validate",
        help="validate an INT8 ONNX model on ONNX Runtime and the target's runtimes",
        description="Fusion, parity, latency, size and mobile checks of an INT8 ONNX model.",
    )
    v.add_argument("model", help="model.onnx")
    v.add_argument("--run", help="the run it came from: adds torch parity and test accuracy")
    v.add_argument("--target", help=TARGET_HELP + " (default cpu-x86)")
    v.add_argument("--samples", type=_count, help="test samples (default: all)")
    v.add_argument("--runtimes", type=_runtimes, help=RUNTIMES_HELP)
    v.set_defaults(func=cmd_validate)

    for kind in ("recipe", "target"):
        ls = sub.add_parser(
            f"{kind}s", help=f"list the shipped {kind}s", description=f"The {kind}s that ship with qat-sadam, by name."
        )
        ls.set_defaults(func=cmd_list, kind=kind)
    mo = sub.add_parser(
        "models",
        help="list the model names a recipe can use",
        description="What model.name can be: qat-sadam's own small nets (default), torchvision's classifiers "
        "or timm's models (--source); segmentation and detection models go through the Python API.",
    )
    mo.add_argument("--source", choices=("own", "torchvision", "timm"), default="own")
    mo.set_defaults(func=cmd_models)
    rt = sub.add_parser(
        "runtimes",
        help="list the runtimes a model is validated on, and which are installed",
        description="The runtimes `export --runtimes` can run a model on, each with its state here.",
    )
    rt.add_argument(
        "--install-web",
        action="store_true",
        help="install onnxruntime-web with npm into the cache folder "
        "($QAT_SADAM_CACHE or ~/.cache/qat-sadam), as make venv does",
    )
    rt.set_defaults(func=cmd_runtimes)
    r = sub.add_parser(
        "recipe", help="show a recipe resolved", description="Print a recipe with every default filled in."
    )
    rsub = r.add_subparsers(dest="action", required=True, parser_class=_Parser)
    show = rsub.add_parser("show", help="print the recipe with its defaults and overrides applied")
    show.add_argument("recipe", help=RECIPE_HELP)
    _recipe_options(show)
    show.set_defaults(func=cmd_recipe_show)
    ref = rsub.add_parser(
        "reference", help="print every recipe key with its type, default, values and meaning (markdown)"
    )
    ref.set_defaults(func=cmd_recipe_reference)
    return p


# Where the disk or its permissions refuse a write: the user's to fix, said in one line (what the
# command was replacing is left in place: checkpoints and exports are swapped in only when written).
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        print(f"error: cannot write {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qat-sadam models --source timm | head`: the reader has gone, nothing is lost
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
