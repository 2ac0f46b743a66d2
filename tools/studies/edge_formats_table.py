"""The edge-format tables of docs/guide/runtimes.md from the runs `finetune_study.sh edge` made:
the accuracy ladder and file sizes (RUN/export, qnn-htp profile) and each runtime's parity, top-1
agreement and accuracy (RUN/export-runtimes).

    python tools/studies/edge_formats_table.py runs/finetune/quickstart/edge-*-s0
"""

from __future__ import annotations

import argparse
import json
import os


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def ladder_row(run: str) -> str:
    """The ladder and sizes from the training's export; the verdict from export-runtimes where it was
    validated again (with the profile as it is now)."""
    rep = json.load(open(os.path.join(run, "export", "validation.json")))
    again = os.path.join(run, "export-runtimes", "validation.json")
    passed = json.load(open(again))["passed"] if os.path.isfile(again) else rep["passed"]
    lad, size = rep.get("ladder", {}), rep["size"]
    int4 = f"{size['int4_over_float']:.3f}" if "int4_over_float" in size else "-"
    cells = [
        os.path.basename(run),
        _pct(lad.get("float_acc")),
        _pct(lad.get("ptq_acc")),
        _pct(lad.get("qat_acc")),
        "-" if lad.get("recovery") is None else f"{lad['recovery']:.2f}",
        f"{size['int8_over_float']:.3f}",
        int4,
        "PASS" if passed else "FAIL",
    ]
    return "| " + " | ".join(cells) + " |"


def runtime_rows(run: str) -> list[str]:
    path = os.path.join(run, "export-runtimes", "validation.json")
    if not os.path.isfile(path):  # the training's export: the profile's own runtimes
        path = os.path.join(run, "export", "validation.json")
    rep = json.load(open(path))
    rows = []
    for name, r in rep["runtimes"].items():
        if r["status"] != "ran":
            rows.append(f"| {os.path.basename(run)} | {name} | {r['status']}: {r.get('reason', '')[:80]} | | | |")
            continue
        p, t = r["parity"], r["tolerance"]
        verdict = "within" if r["within_tolerance"] else "host" if r.get("host_limited") else "OUT"
        rows.append(
            f"| {os.path.basename(run)} | {name} | {p['max_lsb']:.0f} / {p['p99_lsb']:.0f} | "
            f"{100 * p['top1_agreement']:.1f}% | {_pct(r.get('accuracy'))} | "
            f"{t['max_lsb']:g} LSB, {100 * t['top1_agreement']:.0f}%: {verdict} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    a = ap.parse_args()
    print("| run | float | PTQ INT8 | QAT INT8 | recovery | int8 file / float | INT4 file / float | validation |")
    print("|---|---|---|---|---|---|---|---|")
    for run in a.runs:
        print(ladder_row(run))
    print()
    print("| run | runtime | max / p99 LSB vs integer reference | top-1 agreement | accuracy | tolerance |")
    print("|---|---|---|---|---|---|")
    for run in a.runs:
        print("\n".join(runtime_rows(run)))


if __name__ == "__main__":
    main()
