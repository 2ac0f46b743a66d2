"""`qat-sadam compare`: the same recipe under several optimizers and seeds, as tables and plots.

Cells are named by presets with optional settings: ``adamw``, ``sadam``, ``sadam-reference@k=8``,
``prox_sgd``, ``adamw@lr=3e-4``. A setting whose key starts with a recipe section other than the
optimizer is a recipe override for that cell alone: ``adamw@freezing.enabled=true``,
``adamw@bn_reestimate_batches=0``. ``adamw-effective`` is the control of docs/evidence.md: AdamW at
the nominal lr times the mean damping logged by the first S-Adam reference cell (else the
first S-Adam cell) of the same seed; ``adamw-effective@of=sadam`` names the source cell (``of=``
comes last and takes the rest of the spec: ``adamw-effective@freezing.enabled=true@of=sadam@freezing.enabled=true``).
Finished cells are reused, so an interrupted study resumes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import statistics

from ..errors import ExportError, RecipeError
from ..train.curves import plot_curves
from ..train.optimizers import KEYS
from ..train.recipe import Recipe, load_recipe, parse_override
from ..train.run import LAST, PREVIOUS, Run
from .export_run import export_finished_run
from .train_run import check_resume, fit

PRESETS = {
    "adamw": {"name": "adamw"},
    "adamw-effective": {"name": "adamw"},
    "sadam": {"name": "sadam", "lgi": "residual"},
    "sadam-reference": {"name": "sadam", "lgi": "reference"},
    "prox_sgd": {"name": "prox_sgd", "lr": 0.01},
    "sgd": {"name": "sgd"},
}


# Setting keys that name a recipe section (the recipe's own "name" and "optimizer" excepted).
RECIPE_SECTIONS = {f.name for f in dataclasses.fields(Recipe)} - {"name", "optimizer"}


def parse_cell(spec: str) -> tuple[str, str, dict, str | None, list[str]]:
    """'sadam-reference@k=8' -> (label, preset, optimizer settings, effective-lr source cell or None,
    the cell's recipe overrides as --set expressions)."""
    spec = spec.strip()
    head, sep, of = spec.partition("@of=")
    preset, *settings = head.split("@")
    if preset not in PRESETS:
        raise RecipeError(
            f"unknown optimizer {preset!r} in --optimizers; choose from {', '.join(PRESETS)} "
            "(settings as name@key=value)"
        )
    if sep and preset != "adamw-effective":
        raise RecipeError(f"--optimizers: '@of=' applies to adamw-effective only, got {spec!r}")
    opt, sets = dict(PRESETS[preset]), []
    for s in settings:
        if "=" not in s:
            raise RecipeError(f"--optimizers: expected key=value after '@' in {spec!r}")
        path, value = parse_override(s)  # read as --set reads it: 5e-3 is a number
        if path[0] in RECIPE_SECTIONS:
            sets.append(s)
        else:
            opt[".".join(path)] = value
    return spec, preset, opt, of or None, sets


def _source_cell(cells, i):
    of = cells[i][3]
    if of is not None:
        named = [c for c in cells[:i] if c[0] == of]
        if not named or named[0][2]["name"] != "sadam":
            raise RecipeError(f"{cells[i][0]}: 'of' must name an S-Adam cell listed before it, got {of!r}")
        return named[0]
    sadams = [c for c in cells[:i] if c[2]["name"] == "sadam"]
    ref = [c for c in sadams if c[2].get("lgi") == "reference"]
    if not sadams:
        raise RecipeError("adamw-effective needs an S-Adam cell listed before it in --optimizers")
    return (ref or sadams)[0]


def compare_cli(
    recipe_path: str, optimizers: str, seeds: int, out: str | None, overrides: list[str] = (), **kw
) -> list[dict]:
    """``qat-sadam compare``: cells from a comma-separated list, tables printed when done."""
    specs = [s for s in optimizers.split(",") if s.strip()]
    if not specs:
        raise RecipeError("--optimizers: give at least one optimizer")
    out = out or os.path.join("runs", "compare-" + os.path.splitext(os.path.basename(recipe_path))[0])
    rows = compare(recipe_path, specs, seeds, out, overrides, **kw)
    print(open(os.path.join(out, "results.md")).read())
    print(f"results: {out}/results.md, {out}/results.csv, {out}/curves.png")
    return rows


def compare(
    recipe_path: str,
    specs: list[str],
    seeds: int,
    out: str,
    overrides: list[str] = (),
    bits: int | None = None,
    progress: bool = True,
    first_seed: int = 0,
    export_target: str | None = None,
    report_only: bool = False,
) -> list[dict]:
    """Train every cell for every seed; with ``export_target`` also export each run to INT8 ONNX
    and record its ONNX Runtime test accuracy. ``report_only``: tabulate the finished runs, train
    nothing (a cell's seed count says how many finished); with ``export_target`` it exports the
    finished runs that have no ORT accuracy yet."""
    cells = [parse_cell(s) for s in specs]
    if len({c[0] for c in cells}) != len(cells):
        raise RecipeError("--optimizers lists the same cell twice")
    # Validate every cell's recipe before any training starts.
    for i, (label, preset, opt, _, sets) in enumerate(cells):
        _recipe(recipe_path, [*overrides, *sets], bits, opt, first_seed)
        if preset == "adamw-effective":
            _source_cell(cells, i)
    rows = []
    for i, (label, preset, opt, _, sets) in enumerate(cells):
        runs = []
        for seed in range(first_seed, first_seed + seeds):
            run = cell_run(out, label, seed)
            if report_only:
                if os.path.isfile(run.summary_file):
                    with run.lock():
                        runs.append(_exported(run, run.read_summary(), export_target))
                continue
            opt_s = dict(opt)
            if preset == "adamw-effective":
                src = _source_cell(cells, i)
                s = cell_run(out, src[0], seed).read_summary()
                nominal = _recipe(recipe_path, [*overrides, *src[4]], bits, src[2], seed).optimizer.get("lr", 1e-3)
                opt_s["lr"] = nominal * s["mean_damping"]
            runs.append(_run(recipe_path, [*overrides, *sets], bits, opt_s, seed, run, progress, export_target))
        if runs:
            rows.append(_row(label, opt, runs, sets))
    if not rows:
        raise RecipeError(f"no finished runs under {out}")
    split = _recipe(recipe_path, overrides, bits, cells[0][2], first_seed).data.eval_on
    write_tables(rows, out, split)
    plot_cells(out, [c[0] for c in cells], seeds, first_seed)
    return rows


def _dirname(label: str) -> str:
    return label.replace("@", "_").replace("=", "").replace("/", "_")


def cell_run(out: str, label: str, seed: int) -> Run:
    """The run directory of one cell's seed in a comparison folder."""
    return Run(os.path.join(out, _dirname(label), f"seed{seed}"))


def _recipe(path, overrides, bits, opt, seed) -> Recipe:
    """The cell's recipe: the recipe with its overrides, and the cell's optimizer settings over its own."""
    recipe = load_recipe(path, overrides, bits=bits, seed=seed)
    base = recipe.optimizer
    # The recipe's optimizer settings carry over to a cell of the same optimizer and mode; other
    # cells keep only lr and weight decay (k=8 of the reference is not the residual's k).
    same = base["name"] == opt["name"] and base.get("lgi", "residual") == opt.get("lgi", "residual")
    shared = {k: v for k, v in base.items() if k in ("lr", "weight_decay") and k in KEYS[opt["name"]]}
    merged = {**base, **opt} if same else {**shared, **opt}
    return Recipe.from_dict({**recipe.to_dict(), "optimizer": merged})


def _run(path, overrides, bits, opt, seed, run: Run, progress, export_target=None) -> dict:
    """One cell: trained (or resumed, under the same recipe only) and exported while holding its
    run directory's lock."""
    recipe = _recipe(path, overrides, bits, opt, seed)
    with run.lock():
        if os.path.isfile(run.summary_file):
            return _exported(run, run.read_summary(), export_target)
        resume = run.has_checkpoint(LAST, PREVIOUS)
        if resume:
            check_resume(run, run.resume_checkpoint()[0], recipe)
        else:
            run.clear()  # a cell that died before its first checkpoint
        result = fit(recipe, run, resume=resume, progress=progress)
        if result.get("interrupted"):
            raise KeyboardInterrupt
        result["lr"] = recipe.optimizer.get("lr")
        run.write_summary(result)
        return _exported(run, result, export_target)


def _exported(run: Run, summary: dict, target: str | None) -> dict:
    """The summary with the run's ORT INT8 accuracy, exporting the run first if none is recorded."""
    if target and "ort_acc" not in summary:
        summary = {**summary, **_export(run.dir, target)}
        run.write_summary(summary)
    return summary


def _export(run_dir: str, target: str) -> dict:
    try:
        rep = export_finished_run(run_dir, target)
    except ExportError as e:  # e.g. the paper's placement quantizes conv inputs only: no integer graph
        return {"ort_acc": None, "export_error": str(e)}
    return {
        "ort_acc": rep["accuracy"]["deployed"],
        "integer_acc": rep["accuracy"].get("torch_integer"),
        "ort_agreement": rep["parity"]["torch_integer_vs_ort"]["top1_agreement"],
        **rep.get("ladder", {}),
    }


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# "torch": the integer reference of the frozen graph where the model has one, else the QAT graph.
COLUMNS = [
    ("float_acc", "float acc"),
    ("ptq_acc", "PTQ INT8 (ORT)"),
    ("qat_acc", "QAT INT8 (ORT)"),
    ("recovery", "recovery"),
    ("final_acc", "test acc (torch)"),
    ("ort_acc", "test acc (ORT INT8)"),
    ("best_acc", "best acc"),
    ("osc_freq_mean", "osc freq"),
    ("osc_frac_0.005", "osc > 0.005"),
    ("osc_frac_0.01", "osc > 0.01"),
    ("frozen_frac", "frozen"),
    ("test_acc_before_bn_reestimate", "test acc before BN re-estimation (torch)"),
    ("bn_reestimate.bn_mean_error", "BN mean error"),
    ("bn_reestimate.bn_var_error", "BN var error"),
    ("loss_var50", "loss var (50 steps)"),
    ("mean_damping", "mean damping"),
    ("sec_per_epoch", "s / epoch"),
]


def _dotted(summary: dict, key: str):
    """summary[key], or a nested entry for a dotted key that is not itself a key ('osc_frac_0.005' is)."""
    if key in summary:
        return summary[key]
    for part in key.split("."):
        summary = summary.get(part) if isinstance(summary, dict) else None
    return summary


def _row(label, opt, runs, sets=()) -> dict:
    row = {
        "optimizer": label,
        "settings": json.dumps(opt, sort_keys=True),
        "recipe_overrides": " ".join(sets),
        "seeds": len(runs),
        "lr": runs[0].get("lr"),
    }
    for key, _ in COLUMNS:
        values = [_dotted(r, key) for r in runs]
        row[key + "_mean"], row[key + "_std"] = _mean_std(values)
        row[key + "_n"] = sum(v is not None for v in values)  # e.g. runs exported: fewer than seeds
    return row


def _fmt(row, key):
    m, s, n = row[key + "_mean"], row[key + "_std"], row[key + "_n"]
    if m is None:
        return "n/a"
    text = f"{100 * m:.2f} ± {100 * s:.2f}" if "_acc" in key else f"{m:.4g} ± {s:.2g}"
    return text if n == row["seeds"] else f"{text} ({n} of {row['seeds']} seeds)"


def write_tables(rows: list[dict], out: str, split: str = "test") -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = [(k, n.replace("test", split)) for k, n in COLUMNS if any(r[k + "_mean"] is not None for r in rows)]
    lines = [
        "| optimizer | lr | seeds | " + " | ".join(n for _, n in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        lr = f"{r['lr']:.3g}" if isinstance(r["lr"], (int, float)) else "-"
        lines.append(f"| {r['optimizer']} | {lr} | {r['seeds']} | " + " | ".join(_fmt(r, k) for k, _ in cols) + " |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n\nmean ± std over seeds; accuracies in %.\n")


def plot_cells(out: str, labels: list[str], seeds: int, first_seed: int = 0) -> list[str]:
    """loss, test accuracy, damping/rho and oscillation frequency over steps, seed-averaged per cell."""
    runs = {
        label: [cell_run(out, label, seed).metrics_file for seed in range(first_seed, first_seed + seeds)]
        for label in labels
    }
    title = f"{os.path.basename(os.path.normpath(out))}: mean of {seeds} seed(s) per cell"
    return [plot_curves(runs, os.path.join(out, "curves.png"), title)]
