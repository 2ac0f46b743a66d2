"""Qualcomm's Hexagon NPU through ONNX Runtime's QNN execution provider (the onnxruntime-qnn plugin),
its HTP backend running as a simulator on x86. CPU fallback is disabled: a node QNN does not take
fails the load instead of running quietly on the CPU."""

from __future__ import annotations

import os

import onnx
import onnxruntime as ort

from ...errors import ValidationError
from .base import ModelFiles, Runtime, Session, Tolerance, missing_modules
from .ort_cpu import ort_session, session_runner


def fixed_batch_copy(path: str, work_dir: str, batch: int = 1) -> str:
    """QNN compiles static shapes: a copy of the model with its dynamic batch set to ``batch``
    (ORT's own tool, onnx_model_utils), or the file itself when its shapes are fixed already."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    model = onnx.load(path)
    params = {d.dim_param for v in model.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    if not params:
        return path
    for p in params:
        make_dim_param_fixed(model.graph, p, batch)
    fix_output_shapes(model)
    out = os.path.join(work_dir, f"fixed-b{batch}-" + os.path.basename(path))
    onnx.save(model, out)
    return out


def qnn_session(path: str) -> ort.InferenceSession:
    """An ORT session of ``path`` on QNN's HTP backend with CPU fallback disabled; ValidationError
    when QNN does not take every node."""
    import onnxruntime_qnn as oq  # optional extra: imported only when this runtime is asked for

    if oq.get_ep_name() not in {d.ep_name for d in ort.get_ep_devices()}:
        ort.register_execution_provider_library(oq.get_ep_name(), oq.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == oq.get_ep_name()]
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices(devices, {"backend_path": oq.get_qnn_htp_path()})
    try:
        return ort_session(path, options=so, providers=None)
    except ValidationError as e:
        raise ValidationError(f"QNN HTP rejects the model (CPU fallback disabled): {e}") from None


class QnnHtp(Runtime):
    name = "qnn-htp"
    install = "pip install onnxruntime-qnn  (or: pip install -e '.[runtimes]')"
    what = "Qualcomm Hexagon NPU (HTP) via the ORT QNN provider, x86 simulator, CPU fallback disabled"
    simulated = True
    tolerances = {
        "uint8": Tolerance(
            64.0,
            0.85,
            "HTP requantizes with less precision than ORT's float32 scale ratio: site by site, 1-5% of "
            "values land 1 LSB apart, all within 0.15 of a rounding tie; through 50 layers at 4 bits (a level "
            "is a 16th of the range) these compound to tens of LSB at the logits (docs/guide/runtimes.md)",
        ),
        "uint16": Tolerance(
            256.0,
            0.99,
            "HTP computes 16-bit activations with an error that grows with the value, about 2^-11 relative "
            "(tens of 16-bit LSB, a tenth of an 8-bit LSB, at the logits: docs/guide/runtimes.md)",
        ),
    }
    int4_storage = True  # signed INT4 weights become bw=4 fixed point on HTP (UINT4 is refused: never written)

    def missing(self) -> str | None:
        return missing_modules("onnxruntime_qnn")

    def load(self, files: ModelFiles, int8: bool = True) -> Session:
        import onnxruntime_qnn as oq

        sess = qnn_session(fixed_batch_copy(self.onnx_path(files, int8), files.work_dir))
        return Session(
            session_runner(sess),
            {"QNNExecutionProvider (HTP)": "all nodes (CPU fallback disabled)"},
            {
                "precision": f"{files.activation_type} activations, "
                f"{'int4' if self.int4_storage and files.int4_onnx else 'int8'} weights on HTP",
                "providers": sess.get_providers(),
                "batch_compiled": sess.get_inputs()[0].shape[0],
                "onnxruntime_qnn": getattr(oq, "__version__", "?"),
            },
        )
