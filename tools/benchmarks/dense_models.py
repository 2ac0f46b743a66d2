"""Beyond classifiers: torchvision's segmentation models, SSDlite's backbone and head, a U-Net with
transposed convs and a 1-D keyword-spotting net, W8A8 and W4A4, prepared, exported for the cpu-x86
profile and validated on ORT CPU against the integer reference, every output of each.

    python tools/benchmarks/dense_models.py --out docs/model-zoo/beyond-classifiers
    python tools/benchmarks/dense_models.py --out /tmp/dense --models unet kws --bits 8
    python tools/benchmarks/dense_models.py --out docs/model-zoo/beyond-classifiers/mobile-arm \
        --models unet kws --bits 8 --target mobile-arm --runtimes all

Random weights and inputs (qat_sadam/workflows/zoo.py): export and parity, not accuracy. SSDlite's
anchor decoding and NMS are post-processing in float outside the exported graph (torchvision's
``postprocess_detections``): the file holds the backbone and head, its outputs the per-anchor box
regressions and class logits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torchvision
from torch import nn
from tqdm import tqdm

from qat_sadam.export import load_target
from qat_sadam.models import build_model
from qat_sadam.workflows.zoo import TARGET, model_row


class KeywordSpotter(nn.Module):
    """A 1-D conv net on (mel bands, frames): Conv1d + BatchNorm1d, depthwise-separable blocks."""

    def __init__(self, bands: int = 40, classes: int = 12, width: int = 64):
        super().__init__()
        layers = [nn.Conv1d(bands, width, 5, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        for _ in range(3):
            layers += [
                nn.Conv1d(width, width, 3, padding=1, groups=width, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(),
                nn.Conv1d(width, width, 1, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(),
            ]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x):
        return self.body(x)


class SSDLiteHead(nn.Module):
    """SSDlite's backbone and head: {"bbox_regression", "cls_logits"}, anchors and NMS left out."""

    def __init__(self):
        super().__init__()
        ssd = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=5
        )
        self.backbone, self.head = ssd.backbone, ssd.head

    def forward(self, x):
        return self.head(list(self.backbone(x).values()))


def _segmentation(name: str, aux: bool):
    def build():
        kw = {"aux_loss": True} if aux else {}
        return getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=5, **kw)

    return build


# name -> (task, builder, input shape)
MODELS = {
    "lraspp_mobilenet_v3_large": ("segmentation", _segmentation("lraspp_mobilenet_v3_large", False), (3, 64, 64)),
    "deeplabv3_mobilenet_v3_large": (
        "segmentation (out + aux)",
        _segmentation("deeplabv3_mobilenet_v3_large", True),
        (3, 64, 64),
    ),
    "fcn_resnet50": ("segmentation (out + aux)", _segmentation("fcn_resnet50", True), (3, 64, 64)),
    "ssdlite320_mobilenet_v3_large": ("detection: backbone + head", SSDLiteHead, (3, 128, 128)),
    "unet": ("segmentation, ConvTranspose2d", lambda: build_model("small_unet", 5, in_channels=3), (3, 64, 64)),
    "kws": ("keyword spotting, Conv1d", KeywordSpotter, (40, 98)),
}


HEADER = """# Beyond classifiers: export and parity

Command: `python tools/benchmarks/dense_models.py {args}` (random weights, {images} random inputs;
target {target}; integer reference vs ORT CPU on this machine, every output; max LSB and agreement
are the worst output's, top-1 agreement per pixel for dense outputs). Transposed convs export as
zero-upsampling and a stride-1 conv (QLinearConv; docs/guide/export.md). SSDlite: the backbone and
head; anchor decoding and NMS stay in float outside the file. A segmentation model trained,
fine-tuned and deployed by recipe, with its mIoU ladder: shapes.md.

"""


def _runtimes(cells: dict) -> str:
    def one(name, c):
        if c["status"] != "ran":
            return f"{name} {c['status']}: {c['reason']}"
        flag = "" if c["within_tolerance"] else (" HOST-LIMITED" if c["host_limited"] else " FAILED")
        return f"{name} {c['max_lsb']:.0f} / {c['top1_agreement']:.1%}{flag}"

    return "; ".join(one(k, c) for k, c in cells.items())


def write_table(rows: list[dict], out: str, args: str, images: int, target: str) -> None:
    lines = [
        "| model | task | input | bits | outputs | integer kernels | float ops left | max LSB | top-1 agreement "
        "| fully integer, bit-exact | runtimes: max LSB, agreement (first output) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ops = ", ".join(f"{k} {v}" for k, v in r.get("float_ops", {}).items()) or "-"
        cells = [r["model"], MODELS[r["model"]][0], "x".join(map(str, r["shape"])), f"W{r['bits']}A{r['bits']}"]
        if "error" in r:
            cells += ["-"] * 7 + [f"stopped at {r['stage']}: {r['error']}"]
        else:
            exact = "yes" if r["bit_exact"] else "no"
            cells += [str(r["outputs"]), str(r["integer_kernels"]), ops, f"{r['max_lsb']:.0f}"]
            cells += [f"{r['top1_agreement']:.1%}", exact, _runtimes(r["runtimes"])]
            cells += [str(r.get("float_compute_left") or "")]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(HEADER.format(args=args, images=images, target=target) + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/model-zoo/beyond-classifiers")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--target", default=None, help="a profile name or YAML (default: cpu-x86, 7-bit weights)")
    ap.add_argument("--runtimes", nargs="+", help="runtimes to run the first output on (default: the target's)")
    a = ap.parse_args()
    target = load_target(a.target) if a.target else TARGET
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for name in tqdm(a.models, desc="models"):
        task, build, shape = MODELS[name]
        for bits in a.bits:
            torch.manual_seed(0)
            source = "torchvision" if "_" in name else "here"
            row = model_row(build().eval(), name, source, shape, bits, a.images, target=target, runtimes=a.runtimes)
            rows.append({**row, "shape": list(shape)})
            tqdm.write(json.dumps({k: row.get(k) for k in ("model", "bits", "max_lsb", "bit_exact", "error")}))
    with open(os.path.join(a.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    write_table(rows, a.out, " ".join(sys.argv[1:]), a.images, target.name)


if __name__ == "__main__":
    main()
