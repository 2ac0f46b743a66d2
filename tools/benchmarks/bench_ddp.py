"""Training throughput with 1 process (2 threads) and 2 processes under torchrun (1 thread each),
interleaved: the paper CNN on CIFAR-100, AdamW and S-Adam residual, images per second.

    QAT_SADAM_DATA=/path/to/data python tools/benchmarks/bench_ddp.py --steps 150 --rounds 2
``--processes`` and ``--optimizers`` pick cells; ``--set KEY=VALUE`` (repeatable) changes the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from qat_sadam.train.run import Run


def run(nproc: int, optimizer: str, steps: int, out: str, extra: list[str]) -> float:
    sets = extra + [
        "epochs=1",
        f"max_steps={steps}",
        "export.enabled=false",
        "logging.oscillations=false",
        "calibration_batches=1",
    ]
    if optimizer == "sadam":  # the recipe's own S-Adam is the reference k=8; measure the default estimator
        sets += ["optimizer.lgi=residual", "optimizer.k=2"]
    cmd = [
        "-m",
        "qat_sadam",
        "train",
        "paper_cnn_cifar100",
        "--optimizer",
        optimizer,
        "--out",
        out,
        "--quiet",
        "--force",
    ] + [a for s in sets for a in ("--set", s)]
    launcher = (
        [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc)}
    done = subprocess.run(launcher + cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"error: {' '.join(launcher + cmd)} failed:\n{done.stderr[-3000:]}")
    secs = [json.loads(line)["sec"] for line in open(Run(out).metrics_file) if '"type": "step"' in line]
    batch = Run(out).recipe()["data"]["batch_size"]  # global: split over the ranks
    return batch / statistics.mean(secs[10:])  # images per second (the mean: probe steps count)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "sadam"], choices=["adamw", "sadam"])
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    a = ap.parse_args()
    if a.steps <= 10:
        ap.error("--steps must exceed 10: the first 10 steps (start-up, kernel builds) are not timed")
    tmp = tempfile.mkdtemp()
    res = {}
    for _ in range(a.rounds):
        for opt in a.optimizers:
            for n in a.processes:
                res.setdefault((opt, n), []).append(run(n, opt, a.steps, os.path.join(tmp, f"{opt}{n}"), a.sets))
    print(
        f"\npaper CNN, CIFAR-100, {' '.join(a.sets) or 'the recipe as shipped'}, mean step time over steps "
        f"10-{a.steps}, {a.rounds} interleaved rounds\n"
    )
    print("| optimizer | processes x threads | images / s | vs 1 process |\n|---|---|---|---|")
    for (opt, n), v in res.items():
        ips = statistics.median(v)
        one = f"{ips / statistics.median(res[(opt, 1)]):.2f}x" if (opt, 1) in res else "-"
        print(f"| {opt} | {n} x {2 // n} | {ips:.0f} | {one} |")


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"\n({time.time() - t:.0f} s)")
