"""`qat-sadam export` and `qat-sadam validate`."""
from __future__ import annotations

import os

import numpy as np
import torch

DEFAULT_TARGET = "export/cpu-x86.yaml"


def _test_batches(recipe: dict, info: dict, samples: int | None, batch: int):
    from ..train.data import Loader, load_data

    data = load_data(recipe["data"])
    test = data.test
    if samples:
        test = type(test)(test.x[:samples], test.y[:samples])
    return Loader(test, batch, info["mean"], info["std"], shuffle=False).batches()


def export_run(run: str, target: str | None, out_dir: str, samples: int | None = None, data_root: str | None = None) -> dict:
    """Export a run's best checkpoint for ``target`` and validate it; returns the validation report."""
    from ..train.checkpoint import find_checkpoint, load_checkpoint
    from ..train.trainer import build_qat_model
    from .onnx_export import export_float_onnx, export_onnx
    from .target import load_target
    from .validate import validate

    ck = load_checkpoint(find_checkpoint(run))
    recipe, info = ck["recipe"], ck["info"]
    if data_root:
        recipe["data"]["root"] = data_root
    model = build_qat_model(recipe, info)
    model.load_state_dict(ck["model"])
    model.eval()
    tgt = load_target(target or recipe["export"].get("target") or DEFAULT_TARGET)
    batch = tgt.fixed_batch or 64
    batches = [(x, y) for x, y in _test_batches(recipe, info, samples, batch) if not tgt.fixed_batch or len(x) == batch]
    path = os.path.join(out_dir, "model.onnx")
    done = export_onnx(model, batches[0][0][:1], path, tgt)
    float_path = export_float_onnx(model, batches[0][0][:1], os.path.join(out_dir, "float.onnx"), tgt)
    with torch.no_grad():
        qat_out = np.concatenate([model(x).numpy() for x, _ in batches])
        frozen_out = np.concatenate([done["frozen"](x).numpy() for x, _ in batches])
        integer_out = np.concatenate([done["integer"](x).numpy() for x, _ in batches])
    rep = validate(path, target=tgt, inputs=[x.numpy() for x, _ in batches], labels=np.concatenate([y.numpy() for _, y in batches]),
                   torch_outputs=qat_out, frozen_outputs=frozen_out, integer_outputs=integer_out, float_path=float_path,
                   out_dir=out_dir)
    rep["requantized_to_max_bits"] = done["requantized_to_max_bits"]
    _print_report(rep, out_dir)
    return rep


def _print_report(rep: dict, out_dir: str) -> None:
    from .validate import ACCURACY_KEYS

    print(f"validation {'PASSED' if rep['passed'] else 'FAILED'} (target {rep['target']}); providers run: "
          f"{', '.join(rep['providers_run'])}")
    if "fusion" in rep:
        print(f"  integer kernels: {rep['fusion']['integer_kernels']} for {rep['fusion']['float_ops_in_export']} conv/linear; "
              f"float compute left: {rep['fusion']['float_compute_left'] or 'none'}")
    for key, name in (("torch_integer_vs_ort", "torch integer reference"), ("torch_frozen_vs_ort", "torch frozen graph"),
                      ("torch_qat_graph_vs_ort", "torch QAT graph")):
        p = rep.get("parity", {}).get(key)
        if p:
            print(f"  {name} vs ORT: max {p['max_lsb']:.1f} LSB, p99 {p['p99_lsb']:.1f} LSB, top-1 agreement {100 * p['top1_agreement']:.2f}%")
    if "accuracy" in rep:
        a = rep["accuracy"]
        print(f"  accuracy on {a['samples']}: ORT INT8 {100 * a['ort_int8']:.2f}%"
              + "".join(f", {k.replace('_', ' ')} {100 * a[k]:.2f}%" for k in ACCURACY_KEYS if k in a))
    if "size" in rep and "int8_over_float" in rep["size"]:
        print(f"  size INT8/float: {rep['size']['int8_over_float']:.3f}")
    for k, v in rep.get("latency", {}).items():
        print(f"  latency {k}: float {v['float_ms']:.2f} ms, INT8 {v['int8_ms']:.2f} ms, ratio {v['int8_over_float']:.2f}")
    for f in rep["failures"]:
        print(f"  FAIL: {f}")
    print(f"  report: {os.path.join(out_dir, 'validation.md')}")


def cmd_export(a) -> int:
    out = a.output or os.path.join(a.run if os.path.isdir(a.run) else os.path.dirname(a.run), "export")
    rep = export_run(a.run, a.target, out, a.samples, a.data_root)
    return 0 if rep["passed"] else 1


def cmd_validate(a) -> int:
    from .validate import validate

    if a.run:
        return cmd_export(type("A", (), {"run": a.run, "target": a.target, "output": os.path.dirname(os.path.abspath(a.model)),
                                         "samples": a.samples, "data_root": None})())
    float_path = os.path.join(os.path.dirname(os.path.abspath(a.model)), "float.onnx")
    rng = np.random.default_rng(0)
    from .validate import check_model_file

    m = check_model_file(a.model)
    shape = [d.dim_value or 8 for d in m.graph.input[0].type.tensor_type.shape.dim]
    inputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    rep = validate(a.model, target=a.target or DEFAULT_TARGET, inputs=inputs,
                   float_path=float_path if os.path.isfile(float_path) else None)
    print("no --run given: parity compares ORT with and without graph optimizations on random inputs; "
          "pass --run RUN_DIR for torch parity and accuracy on real data")
    _print_report(rep, os.path.dirname(os.path.abspath(a.model)))
    return 0 if rep["passed"] else 1


def add_export_commands(sub) -> None:
    e = sub.add_parser("export", help="export a run to INT8 ONNX and validate it",
                       description="Export a run's best checkpoint to an INT8 QDQ ONNX model and validate it on ORT.")
    e.add_argument("run", help="run directory or checkpoint")
    e.add_argument("--target", help=f"target profile YAML (default: the recipe's, else {DEFAULT_TARGET})")
    e.add_argument("-o", "--output", help="output directory (default RUN/export)")
    e.add_argument("--samples", type=int, help="test samples for parity and accuracy (default: the whole test set)")
    e.add_argument("--data-root", help="where the dataset lives, if not where the run found it")
    e.set_defaults(func=cmd_export)
    v = sub.add_parser("validate", help="validate an INT8 ONNX model on ONNX Runtime",
                       description="Fusion, parity, latency, size and mobile checks of an INT8 ONNX model.")
    v.add_argument("model", help="model.onnx")
    v.add_argument("--run", help="the run it came from: adds torch parity and test accuracy")
    v.add_argument("--target", help=f"target profile YAML (default {DEFAULT_TARGET})")
    v.add_argument("--samples", type=int)
    v.set_defaults(func=cmd_validate)
