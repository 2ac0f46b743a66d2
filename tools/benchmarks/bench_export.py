"""Our QAT export vs ONNX Runtime's own post-training quantization (quantize_static, QDQ,
per-channel int8 weights, uint8 activations): accuracy and latency side by side.

ORT's PTQ is applied to the QAT run's own weights with the quantizers removed, and, with
``--float-run``, to a model trained in float by the same recipe (all quantizers disabled:
``--set 'quant.overrides=[{pattern: "*", enabled: false}]'``), which is PTQ's fair input.

    python tools/benchmarks/bench_export.py --run runs/quickstart --float-run runs/quickstart-float

Latency: median ms per run on ORT CPU, float / ours / ORT PTQ interleaved round by round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from qat_sadam.export import export_float_onnx, export_onnx, ort_session
from qat_sadam.train.data import Loader, load_data
from qat_sadam.train.model import load_run


class _Reader(CalibrationDataReader):
    def __init__(self, batches):
        self.it = iter({"input": b} for b in batches)

    def get_next(self):
        return next(self.it, None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--target", default="cpu-x86-vnni")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--float-run", help="a run of the same recipe trained without quantizers")
    ap.add_argument("--data-root")
    a = ap.parse_args()
    run = load_run(a.run, data_root=a.data_root)
    recipe, info, model = run.recipe, run.info, run.model
    data = load_data(recipe.data)
    test = [
        (x.numpy(), y.numpy()) for x, y in Loader(data.test, 256, info["mean"], info["std"], shuffle=False).batches()
    ]
    calib = [x.numpy() for x, _ in Loader(data.train, 32, info["mean"], info["std"], shuffle=True).batches()][
        : a.calib_batches
    ]
    tmp = tempfile.mkdtemp()
    ours, flt = os.path.join(tmp, "ours.onnx"), os.path.join(tmp, "float.onnx")
    example = torch.from_numpy(test[0][0][:1])
    export_onnx(model, example, ours, a.target)
    export_float_onnx(model, example, flt, a.target)
    pre, ptq = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "ptq.onnx")
    quant_pre_process(flt, pre)
    quantize_static(
        pre,
        ptq,
        _Reader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    models = {"float (QAT weights, no quantizers)": flt, "ours: QAT INT8": ours, "ORT quantize_static INT8 of it": ptq}
    if a.float_run:
        f2, pre2, ptq2 = (os.path.join(tmp, n) for n in ("float2.onnx", "pre2.onnx", "ptq2.onnx"))
        export_float_onnx(load_run(a.float_run).model, example, f2, a.target)
        quant_pre_process(f2, pre2)
        quantize_static(
            pre2,
            ptq2,
            _Reader(calib),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        models.update({"float-trained model": f2, "ORT quantize_static INT8 of the float-trained model": ptq2})
    sessions = {k: ort_session(p) for k, p in models.items()}
    with torch.no_grad():
        torch_acc = np.mean(np.concatenate([model(torch.from_numpy(x)).argmax(1).numpy() == y for x, y in test]))
    acc = {
        k: np.mean(np.concatenate([s.run(None, {"input": x})[0].argmax(1) == y for x, y in test]))
        for k, s in sessions.items()
    }
    lat = {}
    for b in (1, 32):
        x = np.random.default_rng(0).standard_normal((b, *test[0][0].shape[1:])).astype(np.float32)
        t = {k: [] for k in sessions}
        for _ in range(a.rounds):
            for k, s in sessions.items():
                s.run(None, {"input": x})
                t0 = time.perf_counter()
                for _ in range(20):
                    s.run(None, {"input": x})
                t[k].append(1000 * (time.perf_counter() - t0) / 20)
        lat[b] = {k: statistics.median(v) for k, v in t.items()}
    base = "float (QAT weights, no quantizers)"
    print(
        f"\nrun {a.run} ({recipe.model.name}, quant {recipe.quant.config()}), {sum(len(y) for _, y in test)} test "
        "images, "
        f"target {a.target}; torch fake-quant accuracy {100 * torch_acc:.2f}%\n"
    )
    print(
        "| model | test acc | size MB | ms batch 1 | ms batch 32 | latency / float (b32) |\n|---|---|---|---|---|---|"
    )
    for k, p in models.items():
        print(
            f"| {k} | {100 * acc[k]:.2f}% | {os.path.getsize(p) / 1e6:.2f} | {lat[1][k]:.3f} | {lat[32][k]:.3f} | "
            f"{lat[32][k] / lat[32][base]:.2f} |"
        )


if __name__ == "__main__":
    main()
