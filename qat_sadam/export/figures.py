"""ladder.png: the accuracy ladder of a validation report as bars, float down to each runtime."""

from __future__ import annotations


def ladder_bars(rep: dict) -> list[tuple[str, float]]:
    """(label, accuracy) from float down to INT8 on each runtime that ran: the report's own numbers."""
    ladder, acc = rep["ladder"], rep.get("accuracy", {})
    bars = [("float\n(torch)", ladder.get("float_acc")), ("PTQ INT8\n(deployed)", ladder.get("ptq_acc"))]
    bars += [("QAT graph\n(torch)", acc.get("torch_qat_graph")), ("QAT INT8\n(deployed)", ladder.get("qat_acc"))]
    bars += [(f"QAT INT8\non {n}", r["accuracy"]) for n, r in rep.get("runtimes", {}).items() if "accuracy" in r]
    return [(label, v) for label, v in bars if v is not None]


def ladder_figure(rep: dict, path: str) -> str:
    """Draw ``rep``'s accuracy ladder into ``path`` (PNG) and return the path."""
    import matplotlib  # paid only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = ladder_bars(rep)
    metric = rep.get("accuracy", {}).get("metric", "top-1")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(bars)), 4.5))
    colors = ["0.55" if label.endswith("(torch)") else "C0" if label.startswith("PTQ") else "C2" for label, _ in bars]
    rects = ax.bar(range(len(bars)), [100 * v for _, v in bars], color=colors)
    ax.bar_label(rects, [f"{100 * v:.2f}" for _, v in bars], fontsize=8)
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    low = min(v for _, v in bars)
    ax.set_ylim(max(0.0, 100 * low - 10), min(100.0, 100 * max(v for _, v in bars) + 3))
    ax.set(ylabel=f"{metric} (%)", title=f"accuracy ladder, target {rep['target']}, {rep['ladder']['samples']} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
