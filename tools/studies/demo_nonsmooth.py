"""The paper's chattering demo: non-smooth Rosenbrock f(x, y) = 10|y - x^2| + |1 - x| from (-1.5, 2).

AdamW, S-Adam reference (k=5, sigma=0.01, lam=5) and S-Adam residual (k=2, lam=5, probing
every step with radius 0.01 x RMS), 2000 steps at lr 0.01, weight decay 0 for all. Writes a
PNG of the trajectories and of rho over steps, and prints a table of the final distance to
the minimum (1, 1) and of the direction reversals of each coordinate (sign changes of its
update between consecutive steps).

    .venv/bin/python tools/studies/demo_nonsmooth.py --out docs/studies/nonsmooth
"""

from __future__ import annotations

import argparse
import os

import matplotlib
import torch

from qat_sadam import SAdam
from qat_sadam.optim import loss_closure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rosenbrock(p):
    x, y = p[0], p[1]
    return 10 * (y - x * x).abs() + (1 - x).abs()


OPTIMIZERS = {
    "AdamW": lambda p, lr: torch.optim.AdamW([p], lr=lr, weight_decay=0.0),
    "S-Adam reference (k=5, lam=5)": lambda p, lr: SAdam(
        [p], lr=lr, weight_decay=0.0, lgi="reference", k=5, sigma=0.01, lam=5.0
    ),
    "S-Adam residual (k=2, lam=5)": lambda p, lr: SAdam(
        [p], lr=lr, weight_decay=0.0, k=2, lam=5.0, probe_every=1, probe_scale=0.01
    ),
}


def run(make, steps, lr, seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.tensor([-1.5, 2.0]))
    opt = make(p, lr)
    path, rhos = [p.detach().clone()], []
    closure = loss_closure(opt, lambda: rosenbrock(p))
    for _ in range(steps):
        opt.step(closure)
        path.append(p.detach().clone())
        rhos.append(getattr(opt, "rho", [float("nan")])[0])
    return torch.stack(path), rhos


def reversals(path):
    d = path[1:] - path[:-1]
    return [int(((d[1:, i] * d[:-1, i]) < 0).sum()) for i in range(2)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", default="docs/studies/nonsmooth")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(12, 5))
    xs, ys = torch.meshgrid(torch.linspace(-2, 2, 200), torch.linspace(-1, 3, 200), indexing="xy")
    ax.contour(xs, ys, rosenbrock(torch.stack([xs, ys])), levels=30, cmap="Greys", linewidths=0.5)
    print("| optimizer | final (x, y) | distance to (1, 1) | reversals x | reversals y |\n|---|---|---|---|---|")
    for name, make in OPTIMIZERS.items():
        path, rhos = run(make, args.steps, args.lr)
        dist = float((path[-1] - torch.tensor([1.0, 1.0])).norm())
        rx, ry = reversals(path)
        print(f"| {name} | ({path[-1][0]:.4f}, {path[-1][1]:.4f}) | {dist:.4f} | {rx} | {ry} |")
        ax.plot(path[:, 0], path[:, 1], label=name, lw=1)
        if name != "AdamW":
            axr.plot(rhos, label=name, lw=0.8)
    ax.plot([1], [1], "k*", ms=12)
    ax.set(title=f"non-smooth Rosenbrock, {args.steps} steps, lr {args.lr}", xlabel="x", ylabel="y")
    ax.legend(fontsize=8)
    axr.set(title="rho (LGI) per step", xlabel="step", ylabel="rho")
    axr.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "nonsmooth_rosenbrock.png"), dpi=110)
    print(f"\nplot: {os.path.join(args.out, 'nonsmooth_rosenbrock.png')}")


if __name__ == "__main__":
    main()
