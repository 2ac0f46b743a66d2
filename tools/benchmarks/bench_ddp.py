"""Training throughput with 1 process (2 threads) and 2 processes under torchrun (1 thread each),
interleaved: the paper CNN on CIFAR-100, AdamW and S-Adam residual, images per second.

    QAT_SADAM_DATA=/path/to/data python tools/benchmarks/bench_ddp.py --steps 150 --rounds 2
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


def run(nproc: int, optimizer: str, steps: int, out: str) -> float:
    sets = [
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
    subprocess.run(launcher + cmd, check=True, capture_output=True, env=env)
    secs = [json.loads(line)["sec"] for line in open(os.path.join(out, "metrics.jsonl")) if '"type": "step"' in line]
    return 128 / statistics.mean(secs[10:])  # global batch 128: images per second (mean: probe steps count)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    res = {}
    for _ in range(a.rounds):
        for opt in ("adamw", "sadam"):
            for n in (1, 2):
                res.setdefault((opt, n), []).append(run(n, opt, a.steps, os.path.join(tmp, f"{opt}{n}")))
    print(
        f"\npaper CNN, CIFAR-100, global batch 128, mean step time over steps 10-{a.steps}, {a.rounds} interleaved "
        "rounds\n"
    )
    print("| optimizer | processes x threads | images / s | vs 1 process |\n|---|---|---|---|")
    for (opt, n), v in res.items():
        ips = statistics.median(v)
        print(f"| {opt} | {n} x {2 // n} | {ips:.0f} | {ips / statistics.median(res[(opt, 1)]):.2f}x |")


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"\n({time.time() - t:.0f} s)")
