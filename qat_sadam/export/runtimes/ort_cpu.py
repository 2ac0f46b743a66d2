"""ONNX Runtime's CPU provider: the reference deployment (QLinearConv/QGemm integer kernels)."""

from __future__ import annotations

import collections

import numpy as np
import onnxruntime as ort

from ...errors import ValidationError
from .base import ModelFiles, Runtime, Session, Tolerance, first_line

# ORT has no 16-bit integer conv or GEMM (CPU, WebAssembly): it computes DequantizeLinear -> float conv ->
# QuantizeLinear, where the reference accumulates exactly: 1 LSB16 on quickstart W8A16, 5 on MobileNetV2's
# 53 layers (PTQ W8A16, docs/guide/runtimes.md).
UINT16_FLOAT_LSB = 8.0
UINT16_FLOAT_CAUSE = (
    "no 16-bit integer kernel: each conv and GEMM runs in float32 between DequantizeLinear and QuantizeLinear, "
    "where the reference accumulates exactly; a site's output lands one 16-bit LSB apart at a rounding tie "
    "and later layers carry it"
)


def ort_session(
    path: str,
    level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    optimized_path: str | None = None,
    options: ort.SessionOptions | None = None,
    providers=("CPUExecutionProvider",),
):
    """An ORT session; ValidationError with ORT's first line when the model does not load."""
    so = options or ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    try:
        return ort.InferenceSession(path, so, providers=list(providers) if providers else None)
    except Exception as e:  # ORT raises its own exception types for unreadable models
        raise ValidationError(f"ONNX Runtime cannot load {path}: {first_line(e)}") from None


def session_runner(sess, all_outputs: bool = False):
    """A function running a batch of any size through ``sess``, in chunks of its batch when the
    model's batch dimension is fixed (mobile profiles, QNN): the first output, or with
    ``all_outputs`` the list of every output."""
    name, batch = sess.get_inputs()[0].name, sess.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else None

    def once(x):
        outs = sess.run(None, {name: x})
        return outs if all_outputs else [outs[0]]

    def run(x):
        try:
            chunks = [once(x)] if step is None else [once(x[i : i + step]) for i in range(0, len(x), step)]
        except Exception as e:  # ORT's own exception types: a kernel refused the graph at run time
            raise ValidationError(f"ONNX Runtime failed to run the model: {first_line(e)}") from None
        outs = [np.concatenate(parts) for parts in zip(*chunks)]
        return outs if all_outputs else outs[0]

    return run


class OrtCpu(Runtime):
    name = "ort-cpu"
    host_u8s8 = True
    install = "pip install onnxruntime"
    what = "ONNX Runtime CPU provider, x86-64: QLinearConv/QGemm integer kernels (MLAS)"
    tolerances = {
        "uint8": Tolerance(
            0.0,
            1.0,
            "the integer reference emulates these kernels op by op; on x86 without VNNI "
            "full-range 8-bit weights saturate the u8 x s8 pair sums (use 7-bit weights, cpu-x86.yaml)",
        ),
        "uint16": Tolerance(UINT16_FLOAT_LSB, 0.99, UINT16_FLOAT_CAUSE),
    }

    def load(self, files: ModelFiles, int8: bool = True) -> Session:
        sess = ort_session(self.onnx_path(files, int8))
        return Session(
            session_runner(sess),
            {"CPUExecutionProvider": "all nodes"},
            {"precision": "int8 x uint8 -> int32" if int8 else "float32", "ort_version": ort.__version__},
        )


def op_histogram(model) -> dict:
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())
