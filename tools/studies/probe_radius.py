"""How S-Adam's residual rho depends on the probe radius (a multiple c of each weight's quantization
step) on a trained QAT model: mean and spread over mini-batches, one table and one PNG.

    .venv/bin/python tools/studies/probe_radius.py --run runs/quickstart --out docs/studies/probe_radius
"""

from __future__ import annotations

import argparse
import os
import statistics

import matplotlib
import torch
import torch.nn.functional as F

from qat_sadam.optim import SAdam, loss_closure, sadam_param_groups
from qat_sadam.train.data import Loader, load_data
from qat_sadam.train.model import load_run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MULTIPLES = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default="docs/studies/probe_radius")
    a = ap.parse_args()
    run = load_run(a.run)
    model = run.model.train()
    data = load_data(run.recipe.data)
    batches = list(
        Loader(
            data.train, run.recipe.data.batch_size, run.info["mean"], run.info["std"], shuffle=True, seed=1
        ).batches()
    )[: a.batches]
    rows = {}
    for c in MULTIPLES:
        rhos = []
        for i, (x, y) in enumerate(batches):
            opt = SAdam(
                sadam_param_groups(model, radius_multiple=c),
                lr=0.0,
                weight_decay=0.0,
                k=a.k,
                probe_every=1,
                rho_ema=0.0,
                seed=i,
                probe_buffers=list(model.buffers()),
            )
            opt.step(loss_closure(opt, lambda: F.cross_entropy(model(x), y)))  # lr 0: measures rho, changes nothing
            rhos.append(opt.rho[0])
        rows[c] = (statistics.mean(rhos), statistics.stdev(rhos))
    print(f"\nrun {a.run}: residual rho of the weight group, k={a.k} antithetic pairs, {a.batches} mini-batches\n")
    print("| radius (x quantization step) | mean rho | std over batches | damping at lam=2 |\n|---|---|---|---|")
    for c, (m, s) in rows.items():
        print(f"| {c} | {m:.3f} | {s:.3f} | {torch.exp(torch.tensor(-2 * m)).item():.3f} |")
    os.makedirs(a.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(list(rows), [m for m, _ in rows.values()], yerr=[s for _, s in rows.values()], marker="o", capsize=3)
    ax.set(
        xscale="log",
        xlabel="probe radius / quantization step",
        ylabel="rho (residual LGI)",
        title=f"rho vs probe radius: {os.path.basename(a.run.rstrip('/'))}",
    )
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "rho_vs_radius.png"), dpi=110)
    print(f"\nplot: {os.path.join(a.out, 'rho_vs_radius.png')}")


if __name__ == "__main__":
    main()
