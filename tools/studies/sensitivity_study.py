"""The mixed-precision study of docs/studies/sensitivity.md: `qat-sadam sensitivity` proposes 8-bit weights for
some layers within a size budget; this fine-tunes that mixed precision and uniform W4A4 from the same
float model, several seeds each, and tabulates the INT8 accuracy on ORT (test set) side by side.

    QAT_SADAM_DATA=../shared/data .venv/bin/python tools/studies/sensitivity_study.py mobilenet_v2 --seeds 0 1 2
    .venv/bin/python tools/studies/sensitivity_study.py mobilenet_v2 --report-only

Every step is skipped when its output exists, so the study resumes and can be split over processes
(e.g. ``--kinds uniform`` in one, ``--kinds mixed`` in another, once the sensitivity sweep is done).
Uniform fine-tunes are the accuracy ladder's runs (tools/studies/finetune_study.sh ladder):
runs/finetune/MODEL/qat-wB-sS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

QAT = [os.path.join(".venv", "bin", "qat-sadam")]


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def paths(model: str, bits: int, seed: int) -> dict:
    sens = os.path.join("runs", "sensitivity", model)
    return {
        "sensitivity": sens,
        "fragment": os.path.join(sens, "mixed_precision.yaml"),
        "uniform": os.path.join("runs", "finetune", model, f"qat-w{bits}-s{seed}"),
        "mixed": os.path.join(sens, f"mixed-w{bits}-s{seed}"),
    }


def run_study(a) -> None:
    recipe = os.path.join("recipes", f"{a.model}_finetune.yaml")
    p = paths(a.model, a.bits, 0)
    if not os.path.isfile(p["fragment"]):
        _run(
            QAT
            + [
                "sensitivity",
                recipe,
                "--bits",
                str(a.bits),
                "--budget",
                str(a.budget),
                "--samples",
                str(a.samples),
                "--set",
                "calibration_batches=1",
                "--out",
                p["sensitivity"],
                "--quiet",
            ]
        )
    for seed in a.seeds:
        p = paths(a.model, a.bits, seed)
        for kind in a.kinds:
            if os.path.isfile(os.path.join(p[kind], "export", "validation.json")):
                continue
            merge = ["--merge", p["fragment"]] if kind == "mixed" else []
            _run(
                QAT
                + ["train", recipe, "--bits", str(a.bits), "--seed", str(seed), "--out", p[kind], "--force", "--quiet"]
                + merge
            )


def _storage_ratio(sens: dict) -> float:
    """Weight storage of the proposal over uniform low-bit storage, over the layers the sweep covers."""
    low, rows = sens["low_bits"], sens["layers"]
    chosen = {o["pattern"] for o in sens["proposal"]["overrides"]}
    base = sum(r["weights"] * low for r in rows)
    return (base + sum(r["weights"] * (8 - low) for r in rows if r["layer"] in chosen)) / base


def _cell(run: str) -> dict | None:
    """A finished run's INT8 accuracies on ORT: the fine-tuned export's and its PTQ rung's (export-ptq)."""
    paths = [os.path.join(run, d, "validation.json") for d in ("export", "export-ptq")]
    if not all(os.path.isfile(p) for p in paths):
        return None
    qat, ptq = (json.load(open(p)) for p in paths)
    return {
        "ptq": ptq["accuracy"]["ort_int8"],
        "qat": qat["accuracy"]["ort_int8"],
        "float": qat["ladder"]["float_acc"],
        "agreement": min(r["parity"]["torch_integer_vs_ort"]["top1_agreement"] for r in (qat, ptq)),
    }


def _stat(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.2f} ± {100 * sd:.2f}"


def report(a) -> str:
    p0 = paths(a.model, a.bits, 0)
    sens = json.load(open(os.path.join(p0["sensitivity"], "sensitivity.json")))
    cells = {kind: {s: _cell(paths(a.model, a.bits, s)[kind]) for s in a.seeds} for kind in ("uniform", "mixed")}
    done = {kind: {s: c for s, c in v.items() if c} for kind, v in cells.items()}
    ratio = _storage_ratio(sens)
    n8 = len(sens["proposal"]["overrides"])
    L = [
        f"{a.model}, W{a.bits}A{a.bits} fine-tunes (first/last layer 8-bit throughout), seeds "
        f"{', '.join(map(str, a.seeds))}; INT8 accuracy on ORT CPU, test set (1,000 images):",
        "",
        "| precision | weight storage / uniform | seeds done | PTQ INT8 (ORT) | QAT INT8 (ORT) | per seed (QAT) |",
        "|---|---|---|---|---|---|",
    ]
    for kind, label, r in (
        ("uniform", f"uniform W{a.bits}A{a.bits}", 1.0),
        ("mixed", f"mixed: {n8} layers at 8-bit weights", ratio),
    ):
        d = done[kind]
        per_seed = ", ".join(f"s{s}: {100 * c['qat']:.1f}" for s, c in d.items())
        L.append(
            f"| {label} | {r:.3f} | {len(d)} | {_stat([c['ptq'] for c in d.values()])} | "
            f"{_stat([c['qat'] for c in d.values()])} | {per_seed} |"
        )
    paired = [
        done["mixed"][s]["qat"] - done["uniform"][s]["qat"]
        for s in a.seeds
        if s in done["mixed"] and s in done["uniform"]
    ]
    if paired:
        L += ["", f"Mixed minus uniform, paired by seed (QAT INT8): {_stat(paired)} points over {len(paired)} seeds."]
    floats = {c["float"] for v in done.values() for c in v.values()}
    L += [
        f"Float model: {', '.join(f'{100 * f:.2f}%' for f in sorted(floats))}. Sensitivity sweep: "
        f"{sens['validation_samples']} held-out training images, proposal at --budget {sens['proposal']['budget']:g} "
        f"(PTQ on that split: {100 * sens['proposal']['acc']:.2f}% mixed vs "
        f"{100 * sens[f'all_{a.bits}bit_weights_acc']:.2f}% uniform)."
    ]
    agreements = [c["agreement"] for v in done.values() for c in v.values()]
    if agreements:
        L.append(f"Integer reference vs ORT, top-1 agreement over every run: min {100 * min(agreements):.2f}%.")
    _plot(a, done, os.path.join(a.out, "study.png"))
    return "\n".join(L) + "\n"


def _plot(a, done: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for i, kind in enumerate(("uniform", "mixed")):
        for s, c in done[kind].items():
            ax.plot(
                [i - 0.1, i + 0.1],
                [100 * c["ptq"], 100 * c["qat"]],
                "o-",
                color=f"C{s}",
                label=f"seed {s}" if i == 0 else None,
            )
    ax.set_xticks([0, 1], [f"uniform W{a.bits}A{a.bits}", "mixed (sensitivity)"])
    ax.set(
        ylabel="INT8 accuracy on ORT, % (left dot PTQ, right dot QAT)", title=f"{a.model}: mixed vs uniform precision"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a model with recipes/MODEL_finetune.yaml")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kinds", nargs="+", choices=["uniform", "mixed"], default=["uniform", "mixed"])
    ap.add_argument("--budget", type=float, default=1.1)
    ap.add_argument("--samples", type=int, default=500, help="held-out images for the sensitivity sweep")
    ap.add_argument("--out", help="report folder (default docs/studies/sensitivity/MODEL)")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    a.out = a.out or os.path.join("docs", "sensitivity", a.model)
    if not os.path.isfile(os.path.join("recipes", f"{a.model}_finetune.yaml")):
        sys.exit(f"error: no recipes/{a.model}_finetune.yaml")
    if not a.report_only:
        run_study(a)
    os.makedirs(a.out, exist_ok=True)
    for name in ("sensitivity.md", "sensitivity.json", "sensitivity.png", "mixed_precision.yaml"):
        shutil.copy(os.path.join(paths(a.model, a.bits, 0)["sensitivity"], name), a.out)
    text = report(a)
    with open(os.path.join(a.out, "study.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
