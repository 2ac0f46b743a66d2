"""Export acceptance on ResNet-18 (CIFAR stem) W8A8 and W4A4 and MobileNetV2 W8A8: integer kernels,
parity and agreement, file size, latency; one markdown table.

Models are initialised at random, calibrated on CIFAR-100 training images and given ``--steps``
AdamW steps (BatchNorm statistics of real data); trained checkpoints go through
`qat-sadam export` instead. Inputs for parity are CIFAR-100 test images.

    QAT_SADAM_DATA=/path/to/data python tools/benchmarks/export_acceptance.py --images 1000
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from tqdm import tqdm

from qat_sadam import calibrate, prepare_qat
from qat_sadam.export import export_float_onnx, export_onnx
from qat_sadam.export.validate import validate
from qat_sadam.models import build_model
from qat_sadam.train.data import Loader, load_data
from qat_sadam.train.recipe import DataSection

CASES = [("resnet18", 8, {"cifar_stem": True}), ("resnet18", 4, {"cifar_stem": True}), ("mobilenet_v2", 8, {})]


def cifar100(images: int):
    """(training loader, test batches of 100, test labels) from CIFAR-100."""
    data = load_data(DataSection(name="cifar100", root=os.environ.get("QAT_SADAM_DATA")))
    train = Loader(data.train, 64, data.mean, data.std, shuffle=True, seed=0)
    test = [
        x
        for x, _ in Loader(
            type(data.test)(data.test.x[:images], data.test.y[:images]), 100, data.mean, data.std, shuffle=False
        ).batches()
    ]
    return train, test, data.test.y[:images].numpy()


def briefly_trained(name: str, bits: int, kw: dict, train: Loader, steps: int):
    """A prepared model, calibrated on 4 batches and given ``steps`` AdamW steps, in eval mode."""
    torch.manual_seed(0)
    model = prepare_qat(build_model(name, 100, **kw), {"bits": bits})
    batches = train.batches(epoch=0)
    calibrate(model, batches, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _, (x, y) in zip(range(steps), batches):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _case(text: str) -> tuple[str, int, dict]:
    """``MODEL:BITS`` -> a case: the model with the keyword arguments CASES gives it, if any."""
    name, _, bits = text.partition(":")
    return name, int(bits or 8), next((kw for n, _, kw in CASES if n == name), {})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--target", default="cpu-x86-vnni")
    ap.add_argument("--case", action="append", help="MODEL:BITS instead of the cases above (repeatable)")
    a = ap.parse_args()
    cases = CASES if not a.case else [_case(c) for c in a.case]
    train, test, labels = cifar100(a.images)
    rows = []
    for name, bits, kw in tqdm(cases, desc="models"):
        model = briefly_trained(name, bits, kw, train, a.steps)
        tmp = tempfile.mkdtemp()
        done = export_onnx(model, test[0][:1], os.path.join(tmp, "m.onnx"), a.target)
        fpath = export_float_onnx(model, test[0][:1], os.path.join(tmp, "f.onnx"), a.target)
        with torch.no_grad():
            qat = np.concatenate([model(x).numpy() for x in test])
            frozen = np.concatenate([done["frozen"](x).numpy() for x in test])
            integer = np.concatenate([done["integer"](x).numpy() for x in test])
        rep = validate(
            done["path"],
            target=a.target,
            inputs=[x.numpy() for x in test],
            labels=labels,
            torch_outputs=qat,
            frozen_outputs=frozen,
            integer_outputs=integer,
            float_path=fpath,
            out_dir=tmp,
        )
        p = rep["parity"]
        cells = [p[k] for k in ("torch_integer_vs_ort", "torch_frozen_vs_ort", "torch_qat_graph_vs_ort")]
        parity = " | ".join(
            f"{c['max_lsb']:.0f} / {c['p99_lsb']:.0f} | {100 * c['top1_agreement']:.1f}%" for c in cells
        )
        rows.append(
            f"| {name}{' (CIFAR stem)' if kw else ''} | W{bits}A{bits} | {rep['fusion']['integer_kernels']}/"
            f"{rep['fusion']['float_ops_in_export']} | {parity} | {rep['size']['int8_over_float']:.3f} | "
            f"{rep['latency']['batch1']['int8_over_float']:.2f} | {rep['latency']['batch32']['int8_over_float']:.2f} | "
            f"{'PASS' if rep['passed'] else 'FAIL'} |"
        )
    print(f"\n{a.images} CIFAR-100 test images, target {a.target}, {a.steps} AdamW steps after calibration\n")
    pairs = ("integer reference", "frozen graph (float QDQ)", "QAT graph")
    print(
        "| model | bits | integer kernels | "
        + " | ".join(f"{p} vs ORT max / p99 LSB | {p} vs ORT top-1" for p in pairs)
        + " | INT8 / float size | latency ratio b1 | latency ratio b32 | validation |"
    )
    print("|---" * 13 + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
