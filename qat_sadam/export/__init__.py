"""The exporter: frozen integer graphs, INT8 QDQ ONNX, validation on ONNX Runtime."""
from .freeze import ExportError, freeze
from .onnx_export import export_float_onnx, export_onnx
from .target import Target, load_target

__all__ = ["export_onnx", "export_float_onnx", "freeze", "ExportError", "Target", "load_target"]
