"""Intel's OpenVINO CPU plugin reading the QDQ ONNX model (the edge boxes' runtime). Inference
precision is pinned to f32: its default on CPUs with AMX/AVX512-BF16 is bf16, which moves sub-8-bit
outputs by tens of LSB; the report says what the plugin would have chosen."""

from __future__ import annotations

from ...errors import ValidationError
from .base import ModelFiles, Runtime, Session, Tolerance, first_line, missing_modules


class OpenVinoCpu(Runtime):
    name = "openvino"
    host_u8s8 = True
    install = "pip install openvino  (or: pip install -e '.[runtimes]')"
    what = "OpenVINO CPU plugin (oneDNN): QDQ ONNX read as u8/i8 convolutions, INFERENCE_PRECISION_HINT f32"
    tolerances = {
        "uint8": Tolerance(
            64.0,
            0.95,
            "OpenVINO rewrites the QDQ graph into its own low-precision kernels (oneDNN) with their own "
            "requantization: MobileNetV2 W4A4 (PTQ) moved by up to 39 LSB (p99 17, top-1 97.3%) with the f32 "
            "hint; not analysed site by site yet (docs/guide/runtimes.md)",
        )
    }
    refuses = {
        "uint16": "OpenVINO drops 16-bit QuantizeLinear/DequantizeLinear pairs and computes in float "
        "(its output equals the graph without them): the model would not run as quantized"
    }
    int4_storage = True  # weights run as i4 (FullyConnected:i4)

    def missing(self) -> str | None:
        return missing_modules("openvino")

    def load(self, files: ModelFiles, int8: bool = True) -> Session:
        import openvino as ov  # optional extra

        core = ov.Core()
        default = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
        try:
            compiled = core.compile_model(self.onnx_path(files, int8), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        except Exception as e:  # OpenVINO raises RuntimeError with its own text
            raise ValidationError(f"OpenVINO cannot compile the model: {first_line(e)}") from None
        kinds = {}  # the executed graph's layers by type and the precision they run at (constants aside)
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            key = f"{info['layerType'].astype(str)}:{info['runtimePrecision'].astype(str)}"
            if not key.startswith(("Const:", "Input:", "Output:")):
                kinds[key] = kinds.get(key, 0) + 1
        request = compiled.create_infer_request()

        def run(x):
            try:
                return request.infer({0: x})[compiled.output(0)]
            except RuntimeError as e:  # OpenVINO's own errors: a shape or a kernel it refuses
                raise ValidationError(f"OpenVINO failed to run the model: {first_line(e)}") from None

        first = compiled.input(0).get_partial_shape()[0]
        return Session(
            run,
            {"CPU": "all nodes"},
            batch=first.get_length() if first.is_static else None,
            details={
                "precision": "f32 hint",
                "default_precision_on_this_cpu": str(default),
                "executed_layers": dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:12]),
                "openvino": ov.__version__,
            },
        )
