"""Time per training step of AdamW and S-Adam variants on a W4A4 model (ResNet-18, CIFAR stem), interleaved.

Each round runs a block of ``--steps`` steps per optimizer (a block covers whole probe
periods of S-Adam residual), rotating the order; the table gives the median time per step and
its ratio to AdamW measured in the same run.

    python tools/benchmarks/bench_optimizer.py --batch 128 --steps 8 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from qat_sadam import SAdam, calibrate, prepare_qat, sadam_param_groups
from qat_sadam.models import CIFAR_STEM_MODELS, build_model
from qat_sadam.optim import loss_closure


def make(name, model):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name == "sadam (defaults)":
        return SAdam(sadam_param_groups(model), probe_buffers=list(model.buffers()))
    k = int(name.split("k=")[1].rstrip(")"))
    return SAdam(model.parameters(), lgi="reference", k=k)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", help="a model name (CIFAR stem where it has one)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", help="comma-separated subset of: adamw, defaults, ref2, ref8 (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 100, (args.batch,))
    names = ["adamw", "sadam (defaults)", "sadam reference (k=2)", "sadam reference (k=8)"]
    if args.only:
        short = dict(zip(("adamw", "defaults", "ref2", "ref8"), names))
        names = [short[k] for k in args.only.split(",")]
    runs = {}
    for n in names:
        model = prepare_qat(build_model(args.model, 100, cifar_stem=args.model in CIFAR_STEM_MODELS), {"bits": 4})
        calibrate(model, [x])
        model.train()
        runs[n] = (model, make(n, model))
    times = {n: [] for n in names}
    total = args.rounds * len(names)
    with tqdm(total=total, desc="blocks") as bar:
        for r in range(args.rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                model, opt = runs[n]
                closure = loss_closure(opt, lambda: torch.nn.functional.cross_entropy(model(x), y))
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    opt.step(closure)
                times[n].append((time.perf_counter() - t0) / args.steps)
                bar.update()
    base = statistics.median(times["adamw"]) if "adamw" in times else float("nan")
    print(
        f"\nW4A4 {args.model}, batch {args.batch}, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps, CPU\n"
    )
    print("| optimizer | s/step (median) | ratio to AdamW |\n|---|---|---|")
    for n in names:
        med = statistics.median(times[n])
        print(f"| {n} | {med:.3f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
