"""The model zoo: every torchvision classifier and timm's edge families, W8A8 and W4A4, prepared,
exported for the cpu-x86 profile and validated on ORT CPU against the integer reference.

    python tools/benchmarks/model_zoo.py --out docs/model-zoo              # the whole sweep (hours)
    python tools/benchmarks/model_zoo.py --out /tmp/zoo --models resnet18,swin_t --bits 8
    python tools/benchmarks/model_zoo.py --out docs/model-zoo --report-only  # rewrite the table

Each model runs in its own process (memory, a timeout); rows go to OUT/rows.jsonl, so an
interrupted sweep resumes, and OUT/README.md is rewritten from them. Random weights and inputs: the
sweep checks export and parity, not accuracy (qat_sadam/workflows/zoo.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torchvision
from tqdm import tqdm

from qat_sadam.models import build_model
from qat_sadam.workflows.zoo import zoo_row

# timm's edge families: the two smallest members of each (and the families found beside them).
TIMM_MODELS = [
    "mobilenetv3_small_050",
    "mobilenetv3_large_100",
    "mobilenetv4_conv_small",
    "mobilenetv4_hybrid_medium",
    "efficientnet_b0",
    "efficientnet_lite0",
    "tf_efficientnet_lite0",
    "ghostnet_100",
    "ghostnetv2_100",
    "repvgg_a0",
    "repvgg_b0",
    "rexnet_100",
    "rexnetr_100",
    "mixnet_s",
    "mixnet_m",
    "fbnetc_100",
    "fbnetv3_b",
    "lcnet_050",
    "lcnet_100",
    "hardcorenas_a",
    "hardcorenas_f",
    "regnetx_002",
    "regnety_002",
    "dla34",
    "dla46_c",
    "mobilevit_xxs",
    "mobilevitv2_050",
    "fastvit_t8",
    "fastvit_mci0",
    "efficientformer_l1",
    "efficientformerv2_s0",
    "levit_128s",
    "levit_128",
    "mobileone_s0",
    "mobileone_s1",
    "tinynet_e",
    "tinynet_d",
    "mnasnet_small",
    "semnasnet_050",
    "spnasnet_100",
    "efficientvit_b0",
    "efficientvit_m0",
    "repvit_m0_9",
    "repvit_m1",
    "edgenext_xx_small",
    "edgenext_x_small",
    "mobilenetv2_035",
    "mobilenetv2_100",
    "convnext_atto",
    "resnet18d",
]


def torchvision_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def smallest_first(names: list[str], source: str) -> list[str]:
    """Names by parameter count, so that an interrupted sweep has covered the most models."""

    def count(name):
        try:
            with torch.device("meta"):  # no memory for the weights
                model = build_model(name, 10, image_size=224, source=source)
        except Exception:  # builders that initialise weights with data-dependent ops need real tensors
            model = build_model(name, 10, image_size=224, source=source)
        return sum(p.numel() for p in model.parameters())

    return sorted(names, key=count)


def _run_one(name: str, source: str, bits: int, images: int, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--source", source, "--bits", str(bits), "--images", str(images)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "source": source, "bits": bits, "error": f"timeout after {timeout} s"}
    rows = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode == 0 and rows:
        return json.loads(rows[-1])
    last = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "source": source, "bits": bits, "error": f"crashed (uncaught): {last[:240]}"}


def _cell(v, fmt="{}"):
    return "-" if v is None else fmt.format(v)


def write_table(rows: list[dict], out: str) -> None:
    def reason(r):
        if "error" in r:
            return f"stopped at {r.get('stage', 'start')}: {r['error']}"
        notes = []
        if r.get("opaque_modules"):
            notes.append(f"traced as opaque calls, their layers float: {r['opaque_modules']}")
        if r["float_compute_left"]:
            notes.append(f"float compute: {r['float_compute_left']}")
        if r["max_lsb"] > 0:
            notes.append("integer reference differs from ORT (float ops between DQ and Q round differently at ties)")
        return "; ".join(notes)

    lines = [
        "| model | source | input | bits | params (M) | integer kernels | float ops left | max LSB | top-1 agreement "
        "| INT8 / float | integer and bit-exact | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["source"], r["model"], -r["bits"])):
        ok = r.get("bit_exact")
        lines.append(
            " | ".join(
                [
                    f"| {r['model']}",
                    r["source"],
                    _cell(r.get("size")),
                    str(r["bits"]),
                    _cell(r.get("params_m"), "{:.1f}"),
                    _cell(r.get("integer_kernels")),
                    ", ".join(f"{k} {v}" for k, v in r.get("float_ops", {}).items()) or "-",
                    _cell(r.get("max_lsb"), "{:.0f}"),
                    _cell(r.get("top1_agreement"), "{:.1%}"),
                    _cell(r.get("int8_over_float"), "{:.3f}"),
                    "yes" if ok else "no",
                    reason(r),
                ]
            )
            + " |"
        )
    summary = []
    for source in ("torchvision", "timm"):
        for bits in (8, 4):
            sel = [r for r in rows if r["source"] == source and r["bits"] == bits]
            if sel:
                summary.append(
                    f"- {source} W{bits}A{bits}: {sum(bool(r.get('bit_exact')) for r in sel)} of {len(sel)} "
                    f"fully integer and bit-exact; {sum('error' in r for r in sel)} stopped (reason in the table)"
                )
    findings_path = os.path.join(out, "notes.md")  # hand-written findings, kept across rewrites of the table
    findings = open(findings_path).read().strip() + "\n\n" if os.path.isfile(findings_path) else ""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(
            "# Model zoo: export and parity of the models users bring\n\n"
            "Command: `python tools/benchmarks/model_zoo.py --out docs/model-zoo` (smallest models first; random "
            "weights, "
            "16 random inputs at the smallest input size of 32/64/96/128/224/256 that each model accepts; target "
            "cpu-x86: 7-bit weights; "
            "integer reference vs ORT CPU 1.32 on this machine). 'integer and bit-exact': every conv, linear and "
            "matmul "
            "is an integer kernel in ORT's optimized graph and the integer reference equals ORT's logits bit for "
            "bit.\n\n" + "\n".join(summary) + "\n\n" + findings + "\n".join(lines) + "\n"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/model-zoo")
    ap.add_argument("--models", help="comma-separated names (default: every torchvision classifier and TIMM_MODELS)")
    ap.add_argument("--source", choices=("torchvision", "timm", "all"), default="all")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # the child process: one row on stdout
        print(json.dumps(zoo_row(a.one, a.source, a.bits[0], a.images)))
        return
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "rows.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    done = {(r["model"], r["source"], r["bits"]) for r in rows}
    if not a.report_only:
        jobs = []
        for source in ("torchvision", "timm") if a.source == "all" else (a.source,):
            names = (
                a.models.split(",") if a.models else (torchvision_models() if source == "torchvision" else TIMM_MODELS)
            )
            names = smallest_first([n for n in names if any((n, source, b) not in done for b in a.bits)], source)
            jobs += [(n, source, b) for n in names for b in a.bits if (n, source, b) not in done]
        for name, source, bits in tqdm(jobs, desc="model zoo"):
            row = _run_one(name, source, bits, a.images, a.timeout)
            rows.append(row)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            write_table(rows, a.out)
    write_table(rows, a.out)
    print(f"table: {os.path.join(a.out, 'README.md')}")


if __name__ == "__main__":
    main()
