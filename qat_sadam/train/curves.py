"""curves.png: loss, test accuracy, S-Adam damping and oscillation frequency over training, one line
per label, each the mean of its runs (seeds); read from the runs' metrics.jsonl."""

from __future__ import annotations

import json
import os

import numpy as np

PANELS = [
    ("loss", "step", "training loss (EMA 0.98)"),
    ("test_acc", "epoch", "test accuracy (torch)"),
    ("damping", "step", "S-Adam damping exp(-lam rho)"),
    ("osc_freq_mean", "step", "mean oscillation frequency"),
]


def _ema(y, m):
    out, acc = [], y[0]
    for v in y:
        acc = m * acc + (1 - m) * v
        out.append(acc)
    return out


def _series(metrics_files: list[str]) -> dict:
    series = {k: [] for k, _, _ in PANELS}
    for f in metrics_files:
        if not os.path.isfile(f):
            continue
        recs = [json.loads(line) for line in open(f)]
        for key, kind, _ in PANELS:
            vals = [r.get(key) for r in recs if r["type"] == kind]
            if vals and all(v is not None for v in vals):
                series[key].append(np.array(vals, dtype=float))
    return series


def plot_curves(runs: dict[str, list[str]], path: str) -> str:
    """``runs``: label -> the metrics.jsonl files averaged under it. Writes ``path`` and returns it."""
    import matplotlib  # a second of import time, paid only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for label, files in runs.items():
        series = _series(files)
        for ax, (key, kind, title) in zip(axes.flat, PANELS):
            if not series[key]:
                continue
            n = max(len(v) for v in series[key])  # seeds still running are left out of the mean
            y = np.mean([v for v in series[key] if len(v) == n], axis=0)
            if key == "loss":
                y = _ema(y, 0.98)
            ax.plot(
                np.arange(1, n + 1),
                y,
                label=label,
                lw=1.2 if kind == "epoch" else 0.8,
                marker="o" if kind == "epoch" else None,
            )
            ax.set(title=title, xlabel=kind)
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
