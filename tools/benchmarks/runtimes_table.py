"""docs/guide/runtimes.md's table: trained runs exported for a target and run on every runtime.

    QAT_SADAM_DATA=/path/to/data python tools/benchmarks/runtimes_table.py \
        runs/finetune/resnet18/qat-w8-s0 runs/finetune/resnet18/qat-w4-s0 \
        runs/finetune/mobilenet_v2/qat-w8-s0 runs/finetune/mobilenet_v2/qat-w4-s0 \
        --target mobile-arm --samples 256 --out docs/runtimes

Each run is exported into runs/runtimes/<run name> and validated with --runtimes (all) on its first SAMPLES
test images; OUT/rows.json keeps the reports' runtime rows and OUT/table.md the table.
"""

from __future__ import annotations

import argparse
import json
import os

from tqdm import tqdm

from qat_sadam.export.validate import runtime_table
from qat_sadam.workflows.export_run import export_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--target", default="mobile-arm")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--runtimes", default="all", help="comma-separated runtimes (default: all)")
    a = p.parse_args()
    rows = {}
    for run in tqdm(a.runs, desc="runs"):
        inside = os.path.relpath(run, "runs")  # runs/a/b -> a/b; a run elsewhere: its folder's name
        name = (os.path.basename(os.path.normpath(run)) if inside.startswith("..") else inside).replace(os.sep, "/")
        rep = export_run(
            run, a.target, os.path.join("runs", "runtimes", name), a.samples, runtimes=a.runtimes.split(",")
        )
        rows[name] = {
            "runtimes": rep["runtimes"],
            "accuracy": rep.get("accuracy"),
            "passed": rep["passed"],
            "failures": rep["failures"],
        }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = []
    for name, r in rows.items():
        lines += [f"### {name}", ""] + runtime_table(r["runtimes"]) + [""]
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
