"""Validation of an exported INT8 model on ONNX Runtime: fusion, parity, accuracy, latency, size, mobile.

Only the CPU execution provider exists in the desktop wheel; the report names the providers
that actually ran, and mobile providers are checked statically by ORT's own tools.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ValidationError
from ..metrics import score
from .figures import ladder_figure
from .host import host_limits
from .ort_format import convert, logged
from .retype import activation_container
from .runtimes import (
    RUNTIMES,
    ModelFiles,
    check_formats,
    check_names,
    lsb_stats,
    measure,
    ort_session,
    session_runner,
)
from .target import Target, load_target

FLOAT_COMPUTE = {"Conv", "Gemm", "MatMul", "ConvTranspose", "Einsum"}
INTEGER_KERNELS = {
    "QLinearConv",
    "NhwcQLinearConv",
    "QGemm",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "MatMulIntegerToFloat",
}
# Ops that compute nothing (Q/DQ, integer element-wise kernels, data movement, shape arithmetic).
_NOT_FLOAT_MATH = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearSoftmax",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearReduceMean",
    "QLinearWhere",
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Constant",
    "Shape",
    "Gather",
    "Concat",
    "Slice",
    "Split",
    "Expand",
    "Tile",
    "Pad",
    "Cast",
    "ConstantOfShape",
    "Range",
    "Equal",
    "Where",
    "MaxPool",
    "NhwcMaxPool",
    "Clip",
    "Min",
    "Relu",
} | INTEGER_KERNELS
# Why an op runs in float in an INT8 graph, by op type.
_NO_INTEGER_KERNEL = "no integer kernel in ORT CPU: runs in float between DequantizeLinear and QuantizeLinear"
FLOAT_OP_REASONS = {
    "LayerNormalization": f"LayerNorm: {_NO_INTEGER_KERNEL}",
    "Erf": f"GELU (erf form): {_NO_INTEGER_KERNEL}",
    "Gelu": f"GELU: {_NO_INTEGER_KERNEL}",
    "Tanh": f"tanh: {_NO_INTEGER_KERNEL}",
    "Sigmoid": f"sigmoid (SiLU, squeeze-excite gates): {_NO_INTEGER_KERNEL}",
    "HardSigmoid": f"hard sigmoid: {_NO_INTEGER_KERNEL}",
    "HardSwish": f"hard swish: {_NO_INTEGER_KERNEL}",
    "Softmax": "softmax whose input or output is not quantized: float",
    "Mul": "element-wise product with a constant (BatchNorm without a conv, layer scale, attention scale, "
    "activation formulas): float",
    "Add": "element-wise sum with a constant (BatchNorm without a conv, "
    "position bias, attention mask, activation formulas): float",
    "Div": f"division (GELU, normalisation): {_NO_INTEGER_KERNEL}",
    "Sub": f"subtraction: {_NO_INTEGER_KERNEL}",
    "Sqrt": f"square root (normalisation): {_NO_INTEGER_KERNEL}",
    "Pow": f"power (normalisation): {_NO_INTEGER_KERNEL}",
    "ReduceMean": "mean not fused: float",
    "ReduceL2": f"L2 norm (cosine attention): {_NO_INTEGER_KERNEL}",
    "Exp": f"exp: {_NO_INTEGER_KERNEL}",
    "Max": "maximum (a clamp): float",
    "Resize": "adaptive pooling to a larger size, a replication: exact in float",
    "GlobalAveragePool": "pooling not fused: float",
    "AveragePool": "pooling not fused: float",
    "BatchNormalization": f"BatchNorm kept as an op: {_NO_INTEGER_KERNEL}",
}


def check_model_file(path: str) -> onnx.ModelProto:
    if not os.path.isfile(path):
        raise ValidationError(f"model not found: {path}")
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except Exception as e:  # DecodeError, ValidationError, ...
        raise ValidationError(
            f"{path} is not a valid ONNX model ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        ) from None
    return model


def fusion(path: str, workdir: str) -> dict:
    """Op histogram of ORT's optimized graph: every float conv/linear must have become an integer kernel."""
    before = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    opt = os.path.join(workdir, "optimized.onnx")
    ort_session(path, optimized_path=opt)
    after = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    expected = sum(before[o] for o in FLOAT_COMPUTE)
    integer = sum(after[o] for o in INTEGER_KERNELS)
    left = {o: after[o] for o in FLOAT_COMPUTE if after[o]}
    float_ops = {
        o: {"count": c, "reason": FLOAT_OP_REASONS.get(o, _NO_INTEGER_KERNEL)}
        for o, c in sorted(after.items(), key=lambda kv: -kv[1])
        if o not in _NOT_FLOAT_MATH | FLOAT_COMPUTE
    }
    # ORT folds layers that compute constants (Swin V2's position-bias MLP): they need no kernel.
    return {
        "ok": not left,
        "float_ops_in_export": expected,
        "integer_kernels": integer,
        "float_compute_left": left,
        "float_ops": float_ops,
        "optimized_ops": dict(sorted(after.items(), key=lambda kv: -kv[1])),
    }


SHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"}


def output_scale(model: onnx.ModelProto, index: int = 0) -> float | None:
    """The scale of the DequantizeLinear that produces output ``index`` (one output LSB), found through
    the reshapes after it; None if the output is not dequantized."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}

    def constant(name: str):
        while name in producer and producer[name].op_type == "Identity":  # the exporter aliases shared constants
            name = producer[name].input[0]
        if name in inits:
            return onnx.numpy_helper.to_array(inits[name])
        node = producer.get(name)
        return (
            onnx.numpy_helper.to_array(node.attribute[0].t) if node is not None and node.op_type == "Constant" else None
        )

    node = producer.get(model.graph.output[index].name)
    while node is not None and node.op_type in SHAPE_OPS:
        node = producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return None
    scale = constant(node.input[1])
    return None if scale is None else float(scale.reshape(-1)[0])


def _deployed(acc: dict, ort_trusted: bool) -> dict:
    """The accuracy the ladder and the accuracy gate take: ORT CPU's where its parity is gated and the
    host computes the file exactly, else the integer reference's, which each of the target's runtimes
    is gated against (ORT CPU on x86 without VNNI saturates 8-bit weights an NPU computes exactly)."""
    if ort_trusted or "torch_integer" not in acc:
        return {"deployed": acc["ort_int8"], "deployed_by": "ORT CPU"}
    return {"deployed": acc["torch_integer"], "deployed_by": "integer reference"}


def _run(sess, batches, all_outputs: bool = False):
    run = session_runner(sess, all_outputs)
    outs = [run(x) for x in batches]
    return [np.concatenate(o) for o in zip(*outs)] if all_outputs else np.concatenate(outs)


def _output_arrays(value) -> list[np.ndarray]:
    """One array per graph output: an array is the first (or only) output, a list holds them all."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def latency(int8_path: str, float_path: str, shape: tuple, batches=(1, 32), rounds: int = 5, iters: int = 10) -> dict:
    """Median ms per run, float ONNX vs INT8 ONNX on ORT CPU, interleaved round by round."""
    sessions = {"float": ort_session(float_path), "int8": ort_session(int8_path)}
    out = {}
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *shape[1:])).astype(np.float32)
        times = {k: [] for k in sessions}
        for _ in range(rounds):
            for k, s in sessions.items():
                s.run(None, {"input": x})
                t0 = time.perf_counter()
                for _ in range(iters):
                    s.run(None, {"input": x})
                times[k].append(1000 * (time.perf_counter() - t0) / iters)
        f, i = statistics.median(times["float"]), statistics.median(times["int8"])
        out[f"batch{b}"] = {"float_ms": f, "int8_ms": i, "int8_over_float": i / f}
    return out


def mobile(path: str, workdir: str) -> dict:
    """ORT's static NNAPI/CoreML usability check and the conversion to the .ort format, run in this
    process (their command-line wrappers spend 4 s each importing ORT again); what they print, Python
    and native, goes to the report's logs, not the console."""
    # imported here: ORT's tools take 1.8 s to import, which only a mobile profile's export should pay
    from onnxruntime.tools.mobile_helpers.usability_checker import analyze_model

    stem = os.path.splitext(os.path.basename(path))[0]
    ort_dir = os.path.join(workdir, "ort", stem)  # one folder per model (ort_format.convert)
    check_text, check_ok = logged(lambda log: analyze_model(pathlib.Path(path), skip_optimize=False, logger=log))
    ort_files, conv_text, conv_ok = convert(path, ort_dir, runtime_optimized=True)  # the command line's styles
    lines = [ln.split("- ", 1)[-1] if "- " in ln else ln for ln in check_text.splitlines()]
    summary = [
        ln for ln in lines if any(k in ln for k in ("partition", "NNAPI", "CoreML", "nodes", "should", "supported"))
    ]
    configs = sorted(f for f in os.listdir(ort_dir) if f.endswith(".config"))
    return {
        "usability_check_exit_code": 0 if check_ok else 1,
        "usability_summary": summary[:40],
        "usability_log": check_text[-6000:],
        "ort_conversion_ok": conv_ok and bool(ort_files),
        "ort_conversion_log": conv_text[-2000:],
        "ort_dir": ort_dir,
        "ort_files": [os.path.basename(f) for f in ort_files],
        "required_operators_configs": configs,
    }


REPORT = "validation.json"  # the report's file in the export folder (what marks a folder as holding an export)
ACCURACY_KEYS = ("torch_integer", "torch_frozen", "torch_qat_graph")  # the torch references, gate first


def validate(
    path: str,
    *,
    target: "str | Target | None" = None,
    inputs: list[np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    torch_outputs: np.ndarray | None = None,
    frozen_outputs: np.ndarray | None = None,
    integer_outputs: np.ndarray | None = None,
    float_path: str | None = None,
    out_dir: str | None = None,
    ladder: dict | None = None,
    rung: str = "qat_acc",
    runtimes: list[str] | None = None,
    frozen=None,
    float_torch=None,
    runtime_samples: int | None = None,
    fold: dict | None = None,
    int4_path: str | None = None,
) -> dict:
    """Validate an INT8 ONNX model on real input batches ``inputs`` with classes ``labels`` ((N,), or
    (N, H, W) for segmentation, scored by mIoU: ``metrics.Score``).

    ``ladder``: the accuracies of the rungs below this model (``float_acc``, and ``ptq_acc`` for a
    fine-tuned one); this model's ORT accuracy is added as ``rung`` and, with all three, the
    recovery (qat - ptq) / (float - ptq).
    ``torch_outputs``: logits of the QAT graph (BatchNorm unfolded, float bias), as trained;
    ``frozen_outputs``: logits of the frozen torch graph (BatchNorm folded, int32 bias) in float
    QDQ semantics; ``integer_outputs``: the same graph computed as integer kernels
    (``integer_reference``). The pass criterion is the integer reference's top-1 agreement with
    ORT; the others are reported beside it (at 4 bits, one-LSB rounding differences at ties
    cascade through deep networks, docs/guide/export.md).
    ``runtimes``: the runtimes to run the model on (default: the target's), each measured against
    the integer reference (ORT CPU's logits when there is none) on the same inputs (the first
    ``runtime_samples`` of them when given); ``frozen``/``float_torch``: the torch graphs, for
    runtimes that lower torch programs;
    ``int4_path``: the same graph with INT4 weights, run by the runtimes that compute with them (a
    runtime that cannot run the file's activation type is a ValidationError before anything runs).
    The file is checked against the trained model too: ``fold`` (``freeze.fold_check``) must pass,
    and the deployed accuracy must be within ACCURACY_GAP_MAX of the QAT graph's on the same data."""
    target = load_target(target)
    model = check_model_file(path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="validate-", dir=out_dir)
    runtimes = check_names(target.runtimes if runtimes is None else runtimes)
    activation_type = activation_container(model)
    check_formats(runtimes, activation_type)
    rep: dict = {
        "model": path,
        "int4_model": int4_path,
        "activation_type": activation_type,
        "target": target.name,
        "checks": list(target.checks),
        "host": host_limits(onnx.load(int4_path or path), activation_type),  # the file ORT CPU runs for parity
        "providers_available": ort.get_available_providers(),
        "providers_run": ["CPUExecutionProvider"],
        "note": "Fusion, parity and accuracy below are ORT's CPU provider; the runtimes section runs the "
        "model on each runtime the target names. NNAPI and CoreML are checked statically only.",
    }
    try:
        if "fusion" in target.checks:
            rep["fusion"] = fusion(path, work)
        scale = output_scale(model)
        if scale is None:
            raise ValidationError(
                f"{path}: the output is not dequantized from an integer tensor; there is no output "
                "LSB to measure parity in (export it with qat_sadam.export_onnx)"
            )
        rep["output_lsb"] = scale
        if inputs is not None:
            rep["samples"] = int(sum(len(x) for x in inputs))
            if runtimes and runtime_samples and runtime_samples < rep["samples"]:
                rep["runtime_samples"] = runtime_samples
        if inputs is not None and ("parity" in target.checks or "accuracy" in target.checks):
            # The file the device runs: with INT4 storage ORT CPU computes it in float after the INT4
            # DequantizeLinear, a check of the packed weights (and no u8 x s8 saturation on x86 without VNNI).
            rep["parity_file"] = int4_path or path
            full_all = _run(ort_session(rep["parity_file"]), inputs, all_outputs=True)
            plain = _run(ort_session(rep["parity_file"], ort.GraphOptimizationLevel.ORT_DISABLE_ALL), inputs)
            full = full_all[0]
            parity = {"ort_all_vs_ort_no_opt": lsb_stats(full, plain, scale)}
            refs_all = {
                k: _output_arrays(v)
                for k, v in zip(ACCURACY_KEYS, (integer_outputs, frozen_outputs, torch_outputs))
                if v is not None
            }
            refs = {k: v[0] for k, v in refs_all.items()}
            tie = RUNTIMES["ort-cpu"].tolerances[activation_type].max_lsb  # ORT CPU's own tolerance
            parity.update({f"{k}_vs_ort": lsb_stats(v, full, scale, tie) for k, v in refs.items()})
            rep["parity"] = parity
            if len(model.graph.output) > 1:  # every output against its reference, in its own LSB
                rep["outputs"] = _parity_by_output(model, full_all, refs_all, tie)
            if labels is not None:
                rep["accuracy"] = {
                    "metric": "mIoU" if labels.ndim > 1 else "top-1",
                    "ort_int8": score(full, labels),
                    "samples": int(len(labels)),
                    **{k: score(v, labels) for k, v in refs.items()},
                }
                ort_trusted = "parity" in target.checks and not rep["host"]["limits_ort"]
                rep["accuracy"].update(_deployed(rep["accuracy"], ort_trusted))
                if "torch_qat_graph" in refs:
                    deployed = full if rep["accuracy"]["deployed_by"] == "ORT CPU" else refs["torch_integer"]
                    rep["accuracy"]["gap_standard_error"] = _paired_standard_error(
                        deployed, refs["torch_qat_graph"], labels
                    )
        if "size" in target.checks:
            rep["size"] = {"int8_bytes": os.path.getsize(path)}
            if int4_path:
                rep["size"]["int4_bytes"] = os.path.getsize(int4_path)
                rep["size"]["int4_over_int8"] = os.path.getsize(int4_path) / os.path.getsize(path)
            if float_path:
                rep["size"]["float_bytes"] = os.path.getsize(float_path)
                rep["size"]["int8_over_float"] = os.path.getsize(path) / os.path.getsize(float_path)
                if int4_path:
                    rep["size"]["int4_over_float"] = os.path.getsize(int4_path) / os.path.getsize(float_path)
        if "latency" in target.checks and float_path:
            shape = tuple(d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim)
            rep["latency"] = latency(path, float_path, shape, batches=(1,) if target.fixed_batch else (1, 32))
        if "mobile" in target.checks:
            rep["mobile"] = mobile(path, out_dir)
            ort_file = (
                os.path.join(rep["mobile"]["ort_dir"], rep["mobile"]["ort_files"][0])
                if rep["mobile"]["ort_files"]
                else None
            )
            if ort_file and inputs is not None:
                rep["mobile"]["ort_file"] = ort_file
                rep["mobile"]["parity_ort_format_vs_onnx"] = lsb_stats(
                    _run(ort_session(ort_file), inputs), _run(ort_session(path), inputs), scale
                )
        if inputs is not None and runtimes:
            files = ModelFiles(path, float_path, frozen, float_torch, inputs[0][:1], work, int4_path, activation_type)
            x = np.concatenate(inputs)[:runtime_samples]
            ref = (
                _output_arrays(integer_outputs)[0][: len(x)]
                if integer_outputs is not None
                else _run(ort_session(path), [x])
            )
            y = labels[: len(x)] if labels is not None else None
            log = os.path.join(out_dir, "runtimes.log")  # the runtimes' native log lines, not the console's
            with open(log, "w"):
                pass
            rep["runtimes"] = {
                n: measure(n, files, x, ref, scale, y, log=log, tolerance=target.tolerance(n, activation_type))
                for n in runtimes
            }
            for r in rep["runtimes"].values():  # x86 u8 x s8 kernels on a host where they saturate these weights
                r["host_limited"] = rep["host"]["limits_ort"] and r["host_u8s8"] and not r.get("within_tolerance", True)
            rep["runtimes_reference"] = "torch integer reference" if integer_outputs is not None else "ORT CPU"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if fold is not None:
        rep["fold_check"] = fold
    if ladder is not None and "accuracy" in rep:
        rep["ladder"] = accuracy_ladder({**ladder, rung: rep["accuracy"]["deployed"]}, rep["accuracy"]["samples"])
        rep["ladder_figure"] = ladder_figure(rep, os.path.join(out_dir, "ladder.png"))
    rep["passed"], rep["failures"], rep["host_limited"] = _verdict(rep)
    rep["speed_notes"] = _speed_notes(rep)
    with open(os.path.join(out_dir, REPORT), "w") as f:
        json.dump(rep, f, indent=2)
    with open(os.path.join(out_dir, "validation.md"), "w") as f:
        f.write(to_markdown(rep))
    return rep


LADDER_KEYS = ("float_acc", "ptq_acc", "qat_acc", "recovery")


def accuracy_ladder(rungs: dict, samples: int) -> dict:
    """float, PTQ INT8 and QAT INT8 accuracy with recovery = (qat - ptq) / (float - ptq): the share of
    the accuracy PTQ lost that QAT won back (None where a rung is missing or PTQ lost less than one
    sample's worth, 1 / samples: a ratio to a loss that small, or none, says nothing; a segmentation
    ladder's 0.00004 mIoU gave 125)."""
    out = {k: rungs.get(k) for k in LADDER_KEYS[:3]}
    f, p, q = out["float_acc"], out["ptq_acc"], out["qat_acc"]
    lost = None if None in (f, p, q) else f - p
    out["recovery"] = (q - p) / lost if lost is not None and lost * max(samples, 1) >= 1 else None
    return {**out, "samples": samples}


def format_ladder(ladder: dict) -> list[str]:
    """The ladder's four cells as text: accuracies in %, recovery as a ratio, '-' where missing."""
    cells = ["-" if ladder.get(k) is None else f"{100 * ladder[k]:.2f}%" for k in LADDER_KEYS[:3]]
    if ladder.get("recovery") is not None:
        return cells + [f"{ladder['recovery']:.3f}"]
    rungs = all(ladder.get(k) is not None for k in LADDER_KEYS[:3])  # all there: PTQ lost too little to recover
    return cells + [f"- (PTQ lost under one of {ladder['samples']} samples)" if rungs else "-"]


# The deployed model (ORT INT8) may differ from the trained QAT graph by rounding at ties, which
# flips near-tie predictions; a wrong export (a lost BatchNorm shift, a wrong scale) costs more. A gap
# fails when it is both this large and GAP_SIGMAS standard errors of the paired difference: on a
# barely trained model, whose logits sit within a few LSB, 200 samples move by points on rounding alone.
ACCURACY_GAP_MAX = 0.02
GAP_SIGMAS = 3.0


def _paired_standard_error(deployed: np.ndarray, trained: np.ndarray, labels: np.ndarray) -> float | None:
    """The standard error of the mean per-sample difference in correctness (deployed - trained) on
    the same samples; None for dense labels, whose pixels are not independent samples."""
    if labels.ndim > 1 or len(labels) < 2:
        return None
    d = (deployed.argmax(1) == labels).astype(float) - (trained.argmax(1) == labels)
    return float(d.std(ddof=1) / np.sqrt(len(d)))


def _parity_by_output(model: onnx.ModelProto, ort_outputs: list, refs: dict, tie_lsb: float) -> dict:
    out = {}
    for i, o in enumerate(model.graph.output):
        s = output_scale(model, i)
        if s is None:
            raise ValidationError(f"output {o.name!r} is not dequantized from an integer tensor: no LSB to measure")
        out[o.name] = {"output_lsb": s}
        for k, v in refs.items():
            if len(v) != len(ort_outputs):
                raise ValidationError(f"{k}: {len(v)} reference outputs for the file's {len(ort_outputs)}")
            out[o.name][f"{k}_vs_ort"] = lsb_stats(v[i], ort_outputs[i], s, tie_lsb)
    return out


SLOWER = 1.05  # INT8 / float time above which a note is due: these machines' timings vary by a few %


def _speed_notes(rep: dict) -> list[str]:
    """A note, not a failure, where the INT8 file ran slower than the float one, with what ORT's
    optimized graph shows of the likely cause (counted, not guessed)."""
    timed = [(f"ORT CPU {k}", v["int8_over_float"]) for k, v in rep.get("latency", {}).items()]
    timed += [
        (f"{n} batch1", r.get("latency_batch1", {}).get("int8_over_float")) for n, r in rep.get("runtimes", {}).items()
    ]
    slower = [f"{ratio:.2f}x on {where}" for where, ratio in timed if ratio is not None and ratio > SLOWER]
    if not slower:
        return []
    fu = rep.get("fusion", {})
    ops = fu.get("optimized_ops", {})
    counts = {
        "float ops between DequantizeLinear and QuantizeLinear": sum(
            v["count"] for v in fu.get("float_ops", {}).values()
        ),
        "Q/DQ nodes it kept": ops.get("QuantizeLinear", 0) + ops.get("DequantizeLinear", 0),
        "layout Transposes": ops.get("Transpose", 0),
    }
    seen = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    why = (
        f"; ORT's optimized graph has {seen}: overhead that small layers give the integer kernels too "
        "little work to repay"
        if seen
        else ""
    )
    return [f"INT8 runs slower than float: {', '.join(slower)}{why}"]


def _verdict(rep: dict) -> tuple[bool, list[str], list[str]]:
    """(passed, failures, host-limited differences): what ORT CPU, or a runtime with the same x86
    u8 x s8 kernels, shows on a host whose kernels saturate the file's weights (``host.py``) is
    reported apart and does not fail the file."""
    fails, host = [], []
    limited = rep["host"]["limits_ort"]
    acc = rep.get("accuracy", {})
    gap = abs(acc["torch_qat_graph"] - acc["deployed"]) if "torch_qat_graph" in acc else 0.0
    se = acc.get("gap_standard_error")
    if gap > ACCURACY_GAP_MAX and (se is None or gap > GAP_SIGMAS * se):
        noise = "" if se is None else f" and {gap / max(se, 1e-12):.1f} standard errors of the paired difference"
        fails.append(
            f"deployed accuracy ({acc['deployed_by']}) {100 * acc['deployed']:.2f}% is more than "
            f"{100 * ACCURACY_GAP_MAX:g} points{noise} from "
            f"the trained QAT graph's {100 * acc['torch_qat_graph']:.2f}% on the same {acc['samples']} samples"
        )
    fc = rep.get("fold_check")
    if fc and not fc["ok"]:
        tol = " ".join(filter(None, (f"{fc['tolerance_lsb']:g}", fc.get("tolerance_note"))))
        collapsed = fc.get("collapsed_scales", {})
        cause = (
            "; weight scales at the floor (an LSQ scale trained through zero: its int32 bias overflows) in "
            + ", ".join(f"{k} channels {v[:5]}" for k, v in collapsed.items())
            + ": train quantizer scales at a far smaller lr than the weights (qat_sadam.sadam_param_groups)"
            if collapsed
            else ""
        )
        fails.append(
            f"BatchNorm fold check: layers {', '.join(fc['failing'][:5])} differ from the QAT conv+BN by up to "
            f"{fc['max_lsb']:.1f} output LSB (tolerance {tol}){cause}"
        )
    if "fusion" in rep and not rep["fusion"]["ok"]:
        fails.append(
            f"not every conv/linear became an integer kernel: float ops left {rep['fusion']['float_compute_left']}"
        )
    gated = {"": rep.get("parity", {})} if "outputs" not in rep else {f"{k}: ": v for k, v in rep["outputs"].items()}
    for name, parity in gated.items() if "parity" in rep["checks"] else ():
        tq = parity.get("torch_integer_vs_ort")
        if tq and tq["top1_agreement_decisive"] < 0.995:
            (host if limited else fails).append(
                f"{name}top-1 agreement torch (integer reference) vs ORT is {tq['top1_agreement_decisive']:.4f} "
                f"< 0.995 (outside {tq['near_ties']} near ties)"
            )
    if "mobile" in rep and not rep["mobile"]["ort_conversion_ok"]:
        fails.append("conversion to the .ort format failed")
    for name, r in rep.get("runtimes", {}).items():
        if r["status"] == "failed":
            fails.append(f"{name}: {r['reason']}")
        elif r["status"] == "ran" and not r["within_tolerance"]:
            p, t = r["parity"], r["tolerance"]
            (host if r.get("host_limited") else fails).append(
                f"{name}: {p['max_lsb']:.1f} LSB max, top-1 agreement {100 * p['top1_agreement_decisive']:.1f}% "
                f"outside {p['near_ties']} near ties vs the "
                f"{rep['runtimes_reference']} (tolerance {t['max_lsb']:g} LSB, {100 * t['top1_agreement']:.0f}%)"
            )
    return not fails, fails, host


def _parity_row(pair: str, v: dict) -> str:
    return (
        f"| {pair} | {v['max_lsb']:.2f} | {v['p99_lsb']:.2f} | {100 * v['mismatch_frac']:.2f}% | "
        f"{100 * v['top1_agreement']:.2f}% |"
    )


def to_markdown(rep: dict) -> str:
    L = [
        f"# Validation of {os.path.basename(rep['model'])} (target {rep['target']})",
        "",
        f"**{'PASSED' if rep['passed'] else 'FAILED'}**" + "".join(f"\n- {f}" for f in rep["failures"]),
        "",
    ]
    if rep["host_limited"]:
        L += ["Differences this host causes, not the file (not failures):", ""]
        L += [f"- {f}" for f in rep["host_limited"]] + ["", f"Host: {rep['host']['note']}.", ""]
    if rep.get("speed_notes"):
        L += ["Speed (notes, not failures):", ""] + [f"- {n}" for n in rep["speed_notes"]] + [""]
    L += [
        f"Providers that ran: {', '.join(rep['providers_run'])}. Available in this build: "
        f"{', '.join(rep['providers_available'])}. {rep['note']}",
        "",
    ]
    if "fusion" in rep:
        fu = rep["fusion"]
        L += [
            "## Integer kernels (ORT_ENABLE_ALL optimized graph)",
            "",
            f"{fu['integer_kernels']} integer kernels for {fu['float_ops_in_export']} conv/linear ops; float compute "
            "left: "
            f"{fu['float_compute_left'] or 'none'}",
            "",
            "| op | count |",
            "|---|---|",
        ]
        L += [f"| {k} | {v} |" for k, v in fu["optimized_ops"].items()] + [""]
        if fu["float_ops"]:
            L += ["Float ops left, and why:", "", "| op | count | reason |", "|---|---|---|"]
            L += [f"| {k} | {v['count']} | {v['reason']} |" for k, v in fu["float_ops"].items()] + [""]
    if "parity" in rep:
        L += [
            "## Parity (output LSB = %.4g)" % rep["output_lsb"],
            "",
            "| pair | max LSB | p99 LSB | outputs off by >0.5 LSB | top-1 agreement |",
            "|---|---|---|---|---|",
        ]
        L += [_parity_row(k, v) for k, v in rep["parity"].items()] + [""]
    if "outputs" in rep:
        L += [
            "## Parity of each output (accuracy and the runtimes take the first)",
            "",
            "| output | LSB | pair | max LSB | p99 LSB | outputs off by >0.5 LSB | top-1 agreement |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, o in rep["outputs"].items():
            L += [f"| {name} | {o['output_lsb']:.4g} " + _parity_row(k, v) for k, v in o.items() if k != "output_lsb"]
        L.append("")
    if "accuracy" in rep:
        a = rep["accuracy"]
        L += [
            "## Accuracy",
            "",
            f"{a['samples']} test samples, {a.get('metric', 'top-1')}: ORT INT8 {100 * a['ort_int8']:.2f}%"
            + "".join(f", {k.replace('_', ' ')} {100 * a[k]:.2f}%" for k in ACCURACY_KEYS if k in a),
            "",
            f"Deployed accuracy (the ladder's rung, the gate's): {a['deployed_by']}.",
            "",
            "torch integer = the frozen graph computed as ORT's integer kernels compute it (int32 accumulation, one "
            "requantization); torch frozen = BatchNorm folded, int32 bias, float QDQ semantics; torch qat graph = the "
            "trained graph (BatchNorm unfolded, float bias).",
            "",
        ]
    if "fold_check" in rep:
        fc = rep["fold_check"]
        L += [
            "## Fold check (frozen layer vs QAT conv + BatchNorm, eval mode)",
            "",
            f"{len(fc['layers'])} layers; worst {fc['max_lsb']:.3f} output LSB (tolerance {fc['tolerance_lsb']:g}); "
            f"failing: {', '.join(fc['failing']) or 'none'}",
            "",
        ]
    if "ladder" in rep:
        L += [
            "## Accuracy ladder",
            "",
            "| float | PTQ INT8 (ORT) | QAT INT8 (ORT) | recovery |",
            "|---|---|---|---|",
            "| " + " | ".join(format_ladder(rep["ladder"])) + " |",
            "",
            f"{rep['ladder']['samples']} test samples; float in torch, PTQ and QAT as deployed (INT8 on ORT).",
            "",
            "![accuracy ladder, float down to each runtime](ladder.png)",
            "",
        ]
    if "runtimes" in rep:
        L += (
            [f"## Runtimes (parity against the {rep['runtimes_reference']})", ""]
            + runtime_table(rep["runtimes"])
            + [""]
        )
        L += [
            f"- {n}: {r['what']}. Placement: {r.get('placement', '-')}. Tolerance: {r['tolerance']['cause']}."
            for n, r in rep["runtimes"].items()
        ] + [""]
    if "latency" in rep:
        L += [
            "## Latency on ORT CPU (median, interleaved)",
            "",
            "| batch | float ms | INT8 ms | INT8 / float |",
            "|---|---|---|---|",
        ]
        L += [
            f"| {k[5:]} | {v['float_ms']:.2f} | {v['int8_ms']:.2f} | {v['int8_over_float']:.2f} |"
            for k, v in rep["latency"].items()
        ] + [""]
    if "size" in rep:
        s = rep["size"]
        L += [
            "## File size",
            "",
            "; ".join(_size_lines(s)),
            "",
        ]
    if "mobile" in rep:
        m = rep["mobile"]
        L += (
            ["## Mobile (static checks; no mobile provider ran)", "", "ORT mobile usability check:", "", "```"]
            + m["usability_summary"]
            + [
                "```",
                "",
                f".ort conversion: {'ok' if m['ort_conversion_ok'] else 'FAILED'} "
                f"({', '.join(m['ort_files'] + m['required_operators_configs'])})",
            ]
        )
        if "parity_ort_format_vs_onnx" in m:
            p = m["parity_ort_format_vs_onnx"]
            L.append(f"; .ort vs .onnx: max {p['max_lsb']:.2f} LSB, top-1 agreement {100 * p['top1_agreement']:.2f}%")
        L.append("")
    return "\n".join(L)


def _size_lines(s: dict) -> list[str]:
    """The file sizes, with their ratios to the float file and of the INT4 file to the int8 one."""
    out = [
        f"INT8 {s['int8_bytes'] / 1e6:.3f} MB" + (f" ({s['int8_over_float']:.3f}x float)" if "float_bytes" in s else "")
    ]
    if "int4_bytes" in s:
        ratio = f"{s['int4_over_float']:.3f}x float, " if "int4_over_float" in s else ""
        out.append(f"INT4 weights {s['int4_bytes'] / 1e6:.3f} MB ({ratio}{s['int4_over_int8']:.3f}x the int8 file)")
    if "float_bytes" in s:
        out.append(f"float {s['float_bytes'] / 1e6:.3f} MB")
    return out


def _tolerance(t: dict) -> str:
    return f"tolerance {t['max_lsb']:g} LSB, {100 * t['top1_agreement']:g}% top-1"


def runtime_cells(r: dict) -> list[str]:
    """status, max LSB, p99 LSB, top-1 agreement, accuracy, INT8/float latency of one runtime row."""
    if r["status"] != "ran":
        return [f"{r['status']}: {r['reason']}" + (f" ({r['install']})" if "install" in r else "")] + ["-"] * 5
    p, lat = r["parity"], r.get("latency_batch1", {})
    return [
        (
            "within tolerance"
            if r["within_tolerance"]
            else "HOST-LIMITED"
            if r.get("host_limited")
            else "OUT OF TOLERANCE"
        )
        + f" ({_tolerance(r['tolerance'])})",
        f"max {p['max_lsb']:.1f} LSB",
        f"p99 {p['p99_lsb']:.1f} LSB",
        f"top-1 {100 * p['top1_agreement_decisive']:.1f}% ({p['near_ties']} near ties; "
        f"{100 * p['top1_agreement']:.1f}% of all)",
        "-" if "accuracy" not in r else f"acc {100 * r['accuracy']:.2f}%",
        f"{lat['int8_over_float']:.2f}" if "int8_over_float" in lat else "-",
    ]


def runtime_table(runtimes: dict) -> list[str]:
    L = [
        "| runtime | status | max LSB | p99 LSB | top-1 agreement | accuracy | INT8/float latency (batch 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in runtimes.items():
        cells = runtime_cells(r)
        L.append(f"| {n} | " + " | ".join([cells[0]] + [c.split(" ", 1)[-1] for c in cells[1:]]) + " |")
    return L


def format_report(rep: dict, out_dir: str) -> str:
    """The validation report as a few lines for the terminal (validation.md has the tables)."""
    L = [
        f"validation {'PASSED' if rep['passed'] else 'FAILED'} (target {rep['target']}); providers run: "
        f"{', '.join(rep['providers_run'])}"
    ]
    if "fusion" in rep:
        fu = rep["fusion"]
        L.append(
            f"  integer kernels: {fu['integer_kernels']} for {fu['float_ops_in_export']} conv/linear/matmul; "
            f"float compute left: {fu['float_compute_left'] or 'none'}"
        )
        if fu["float_ops"]:
            L.append(
                "  float ops between DQ and Q: " + ", ".join(f"{k} x{v['count']}" for k, v in fu["float_ops"].items())
            )
    if "parity" in rep:
        gated = (
            "" if "parity" in rep["checks"] else f"; reported, not gated: parity is not among {rep['target']}'s checks"
        )
        L.append(f"  ORT CPU ran {os.path.basename(rep['parity_file'])}, {rep['activation_type']} activations{gated}")
    if "samples" in rep:
        runtimes = (
            f"; the runtimes run the first {rep['runtime_samples']}"
            if "runtime_samples" in rep
            else ", every runtime below too"
        )
        L.insert(1, f"  samples: {rep['samples']} inputs for parity and accuracy{runtimes}")
    for key, name in (
        ("torch_integer_vs_ort", "torch integer reference"),
        ("torch_frozen_vs_ort", "torch frozen graph"),
        ("torch_qat_graph_vs_ort", "torch QAT graph"),
    ):
        p = rep.get("parity", {}).get(key)
        if p:
            L.append(
                f"  {name} vs ORT: max {p['max_lsb']:.1f} LSB, p99 {p['p99_lsb']:.1f} LSB, "
                f"top-1 agreement {100 * p['top1_agreement']:.2f}%"
            )
    if "accuracy" in rep:
        a = rep["accuracy"]
        L.append(
            f"  {a.get('metric', 'top-1')}: ORT INT8 {100 * a['ort_int8']:.2f}%"
            + "".join(f", {k.replace('_', ' ')} {100 * a[k]:.2f}%" for k in ACCURACY_KEYS if k in a)
            + (f"; deployed: {a['deployed_by']}" if a["deployed_by"] != "ORT CPU" else "")
        )
    if "fold_check" in rep:
        L.append(
            f"  fold check: worst layer {rep['fold_check']['max_lsb']:.3f} output LSB over "
            f"{len(rep['fold_check']['layers'])} layers"
        )
    if "ladder" in rep:
        L.append("  ladder: float {}, PTQ INT8 {}, QAT INT8 {}, recovery {}".format(*format_ladder(rep["ladder"])))
        L.append(f"  ladder figure: {rep['ladder_figure']}")
    if "size" in rep and "int8_over_float" in rep["size"]:
        L.append(f"  size: {'; '.join(_size_lines(rep['size']))}")
    for k, v in rep.get("latency", {}).items():
        L.append(
            f"  latency {k}: float {v['float_ms']:.2f} ms, INT8 {v['int8_ms']:.2f} ms, ratio {v['int8_over_float']:.2f}"
        )
    for n, r in rep.get("runtimes", {}).items():
        L.append(
            f"  runtime {n}: "
            + runtime_cells(r)[0]
            + (" (" + ", ".join(runtime_cells(r)[1:5]) + ")" if r["status"] == "ran" else "")
        )
    L += [f"  FAIL: {f}" for f in rep["failures"]]
    L += [f"  note: {n}" for n in rep.get("speed_notes", [])]
    if rep["host_limited"]:
        L += [f"  HOST: {f}" for f in rep["host_limited"]] + [f"  host note: {rep['host']['note']}"]
    L.append(f"  report: {os.path.join(out_dir, 'validation.md')}")
    logs = {r["log"] for r in rep.get("runtimes", {}).values() if "log" in r}
    L += [f"  runtimes' own log: {log}" for log in sorted(logs) if os.path.getsize(log)]
    return "\n".join(L)
