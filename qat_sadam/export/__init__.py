"""The deployment core: frozen integer graphs, INT8 QDQ ONNX, the integer reference, target
profiles, the runtimes a model ships to (``runtimes/``) and the validation of a model file. It
imports only the quantizers (``qat_sadam.quant``): training uses it, it never reaches back."""

from ..errors import ExportError, ValidationError
from .freeze import fold_check, freeze
from .integer_reference import integer_reference
from .onnx_export import check_target_fits, export_float_onnx, export_onnx, float_model
from .runtimes import RUNTIMES, ModelFiles
from .target import DEFAULT_TARGET, Target, load_target
from .validate import ACCURACY_KEYS, check_model_file, format_report, ort_session, validate

__all__ = [
    "export_onnx",
    "check_target_fits",
    "export_float_onnx",
    "float_model",
    "freeze",
    "fold_check",
    "integer_reference",
    "ExportError",
    "ValidationError",
    "DEFAULT_TARGET",
    "Target",
    "load_target",
    "validate",
    "check_model_file",
    "format_report",
    "ort_session",
    "ACCURACY_KEYS",
    "RUNTIMES",
    "ModelFiles",
]
