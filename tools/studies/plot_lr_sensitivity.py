"""Final test accuracy against learning rate, per optimizer, from a `qat-sadam compare` study whose
cells are ``name@lr=X`` (the plain cell is the recipe's lr). Writes a PNG and prints a markdown table;
seeds that have not finished are left out and counted.

    .venv/bin/python tools/studies/plot_lr_sensitivity.py runs/study-paper-cifar100 --out
    docs/studies/paper-cifar100/lr_sensitivity.png
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qat_sadam.workflows.compare import cell_run  # noqa: E402

CURVES = {"AdamW": "adamw", "S-Adam residual": "sadam", "S-Adam reference k=2": "sadam-reference@k=2"}
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
NOMINAL = 1e-3


def collect(study: str) -> dict:
    out = {}
    for name, base in CURVES.items():
        for lr in LRS:
            label = base if lr == NOMINAL else f"{base}@lr={lr}"
            cell = os.path.dirname(cell_run(study, label, 0).dir)  # its seeds' runs
            accs = [
                json.load(open(f))["final_acc"] for f in sorted(glob.glob(os.path.join(cell, "seed*", "summary.json")))
            ]
            out[name, lr] = accs
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    res = collect(a.study)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    print("| optimizer | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " |")
    print("|---|" + "---|" * len(LRS))
    for name in CURVES:
        xs, ms, ss, cells = [], [], [], []
        for lr in LRS:
            v = [100 * x for x in res[name, lr]]
            if not v:
                cells.append("not run")
                continue
            m, s = statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0
            xs.append(lr), ms.append(m), ss.append(s)
            cells.append(f"{m:.2f} ± {s:.2f} (n={len(v)})")
        print(f"| {name} | " + " | ".join(cells) + " |")
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=name)
    ax.set(
        xscale="log",
        xlabel="learning rate (constant)",
        ylabel="final test accuracy (%)",
        title="Paper CNN, CIFAR-100, 2 bits, 8 epochs (mean ± std over seeds)",
    )
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"\nplot: {a.out}")


if __name__ == "__main__":
    main()
