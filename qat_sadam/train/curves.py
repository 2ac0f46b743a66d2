"""curves.png: loss, test accuracy, S-Adam damping and oscillation frequency over training, one line
per label, each the mean of its runs (seeds); read from the runs' metrics.jsonl."""

from __future__ import annotations

import json
import os

import numpy as np

# metric key, x axis, title, y label
PANELS = [
    ("loss", "step", "training loss", "cross-entropy (raw, and EMA 0.98 bias-corrected)"),
    ("test_acc", "epoch", "test score (torch, QAT graph)", "% (top-1; mIoU for segmentation)"),
    ("damping", "step", "S-Adam damping exp(-lambda rho)", "step multiplier (1: undamped)"),
    ("osc_freq_mean", "step", "weight oscillation", "flips per weight per step (EMA)"),
]
PERCENT = {"test_acc"}
EMA = 0.98


def _ema(y, m):
    """Exponential moving average with Adam's bias correction: the first values are not pulled
    towards zero (or towards the first value), so a short run's curve is not an artefact."""
    out, acc = [], 0.0
    for t, v in enumerate(y, 1):
        acc = m * acc + (1 - m) * v
        out.append(acc / (1 - m**t))
    return out


def _series(metrics_files: list[str]) -> dict:
    series = {k: [] for k, *_ in PANELS}
    for f in metrics_files:
        if not os.path.isfile(f):
            continue
        recs = [json.loads(line) for line in open(f)]
        for key, kind, *_ in PANELS:
            vals = [r.get(key) for r in recs if r["type"] == kind]
            if vals and all(v is not None for v in vals):
                series[key].append(np.array(vals, dtype=float))
    return series


def _mean(runs: list) -> np.ndarray:
    n = max(len(v) for v in runs)  # seeds still running are left out of the mean
    return np.mean([v for v in runs if len(v) == n], axis=0)


def plot_curves(runs: dict[str, list[str]], path: str, title: str | None = None) -> str:
    """``runs``: label -> the metrics.jsonl files averaged under it. Draws the panels some run logged
    (a feature that is off, S-Adam's damping under AdamW, has no panel), titled ``title`` (default:
    the labels). Writes ``path`` and returns it."""
    import matplotlib  # a second of import time, paid only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = {label: _series(files) for label, files in runs.items()}
    panels = [p for p in PANELS if any(s[p[0]] for s in series.values())]
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, (len(panels) + 1) // 2)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (key, kind, name, ylabel) in zip(axes.flat, panels):
        for i, (label, s) in enumerate(series.items()):
            if not s[key]:
                continue
            y = _mean(s[key]) * (100 if key in PERCENT else 1)
            x, color = np.arange(1, len(y) + 1), f"C{i}"
            if key == "loss":
                ax.plot(x, y, color=color, lw=0.6, alpha=0.3)
                y = _ema(y, EMA)
            ax.plot(x, y, color=color, label=label, lw=1.4, marker="o" if kind == "epoch" else None)
        ax.set(title=name, xlabel=kind, ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.remove()
    if not panels:
        fig.text(0.5, 0.5, "no step or epoch logged yet", ha="center", va="center")
    fig.suptitle(title or ", ".join(runs))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
