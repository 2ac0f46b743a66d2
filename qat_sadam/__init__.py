"""qat-sadam: quantization-aware training with S-Adam, and INT8 ONNX export.

The public API is loaded on first use (PEP 562), so that the command line answers ``--help``
without importing torch."""

import importlib

__version__ = "0.1.0"
_API = {
    "QATConfig": "quant",
    "QuantSpec": "quant",
    "prepare_qat": "quant",
    "calibrate": "quant",
    "SAdam": "optim",
    "ProxSGD": "optim",
    "sadam_param_groups": "optim",
    "export_onnx": "export",
    "validate": "workflows.validate_torch",
    "load_recipe": "train.recipe",
    "Recipe": "train.recipe",
    "load_run": "train.model",
    "Run": "train.run",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'qat_sadam' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
