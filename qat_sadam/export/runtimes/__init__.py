"""The runtimes a model ships to, one module each behind ``base.Runtime``, and the measurement of
a model on each: parity with the integer reference, top-1 agreement, accuracy, latency ratio."""

from __future__ import annotations

import statistics
import time

import numpy as np

from ...errors import ValidationError
from ...metrics import score
from .base import ModelFiles, Runtime, Session, Tolerance, native_output_to
from .executorch_xnnpack import ExecutorchXnnpack
from .openvino_cpu import OpenVinoCpu
from .ort_cpu import OrtCpu, ort_session, session_runner
from .ort_web import OrtWeb
from .qnn_htp import QnnHtp

RUNTIMES: dict[str, Runtime] = {r.name: r for r in (OrtCpu(), QnnHtp(), ExecutorchXnnpack(), OrtWeb(), OpenVinoCpu())}


def check_names(names) -> list[str]:
    """The runtime names given, or a ValidationError naming the unknown one ('all': every runtime)."""
    if list(names) == ["all"]:
        return list(RUNTIMES)
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise ValidationError(f"unknown runtime {unknown[0]!r}; choose from {', '.join(RUNTIMES)}")
    return list(names)


def check_formats(names, activation_type: str) -> None:
    """ValidationError, one line, when a runtime named cannot run ``activation_type`` activations as
    written (OpenVINO and XNNPACK with uint16): refused, never run in another form."""
    for n in names:
        reason = RUNTIMES[n].refuses.get(activation_type)
        if reason:
            raise ValidationError(f"runtime {n} cannot run {activation_type} activations: {reason}")


def lsb_stats(a: np.ndarray, b: np.ndarray, scale: float, tie_lsb: float = 0.0) -> dict:
    """Differences of ``b`` from the reference ``a`` in output LSB, and top-1 agreement (per sample, or
    per pixel of a dense output) over all of them and over the decisive ones: where the reference's
    top-2 margin exceeds ``tie_lsb``, the comparison's tolerance (0: only exact ties are left out). The
    width comes from the caller, not from the differences measured, which a broken output would widen."""
    d = np.abs(a - b) / scale
    agree = a.argmax(1) == b.argmax(1)
    top2 = -np.partition(-a, 1, axis=1) if a.shape[1] > 1 else np.concatenate([a, a - np.inf], 1)
    decisive = (np.take(top2, 0, axis=1) - np.take(top2, 1, axis=1)) / scale > tie_lsb
    return {
        "max_lsb": float(d.max()),
        "p99_lsb": float(np.percentile(d, 99)),
        "mismatch_frac": float((d > 0.5).mean()),
        "top1_agreement": float(agree.mean()),
        "top1_agreement_decisive": float(agree[decisive].mean()) if decisive.any() else 1.0,
        "near_ties": int((~decisive).sum()),
    }


def median_ms(session: Session, x: np.ndarray, rounds: int = 5, iters: int = 5) -> float:
    session.run(x)
    if "median_ms" in session.details:  # timed inside the runtime's own process (ort-web)
        return float(session.details["median_ms"])
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            session.run(x)
        times.append(1000 * (time.perf_counter() - t0) / iters)
    return statistics.median(times)


def measure(
    name: str,
    files: ModelFiles,
    inputs: np.ndarray,
    reference: np.ndarray,
    scale: float,
    labels: np.ndarray | None = None,
    log: str | None = None,
    tolerance: Tolerance | None = None,
) -> dict:
    """Run ``inputs`` on one runtime: status (ran, not run, failed), placement, parity in output LSB
    against ``reference`` (the integer reference's logits), accuracy, and the batch-1 latency of the
    INT8 model over the float model on the same runtime. The tolerance is ``tolerance`` (a target
    profile's) or the runtime's own for the files' activation container. With ``log``, what the
    runtime's native libraries print goes to that file (appended), not to the console."""
    rt = RUNTIMES[name]
    check_formats([name], files.activation_type)
    tolerance = tolerance or rt.tolerances[files.activation_type]
    row: dict = {"runtime": name, "what": rt.what, "tolerance": vars(tolerance), "host_u8s8": rt.host_u8s8}
    reason = rt.missing()
    if reason:
        return {**row, "status": "not run", "reason": reason, "install": rt.install}
    if log is None:
        return _measure(rt, row, files, inputs, reference, scale, labels, tolerance)
    with open(log, "a") as f:
        f.write(f"== {name} ==\n")
    with native_output_to(log):
        return {**_measure(rt, row, files, inputs, reference, scale, labels, tolerance), "log": log}


def _measure(rt: Runtime, row: dict, files, inputs, reference, scale, labels, tolerance: Tolerance) -> dict:
    try:
        session = rt.load(files)
        out = session.run(inputs)
    except ValidationError as e:
        return {**row, "status": "failed", "reason": str(e)}
    parity = lsb_stats(reference, out, scale, tolerance.max_lsb)
    ok = parity["max_lsb"] <= tolerance.max_lsb + 1e-3 and parity["top1_agreement_decisive"] >= tolerance.top1_agreement
    row.update(
        status="ran",
        placement=session.placement,
        details=session.details,
        parity=parity,
        within_tolerance=ok,
        samples=int(len(inputs)),
    )
    if labels is not None:
        row["accuracy"] = score(out, labels)
    if rt.simulated:
        row["latency_batch1"] = {"note": "simulator on x86: no device latency"}
    elif files.float_onnx or files.float_torch is not None:
        try:
            fl = rt.load(files, int8=False)
            x1 = inputs[:1]
            i8, f32 = median_ms(session, x1), median_ms(fl, x1)
            row["latency_batch1"] = {"int8_ms": i8, "float_ms": f32, "int8_over_float": i8 / f32}
        except ValidationError as e:
            row["latency_batch1"] = {"error": f"float model: {e}"}
    return row


__all__ = [
    "RUNTIMES",
    "ModelFiles",
    "Runtime",
    "Session",
    "Tolerance",
    "check_formats",
    "check_names",
    "lsb_stats",
    "measure",
    "native_output_to",
    "ort_session",
    "session_runner",
]
