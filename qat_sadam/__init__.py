"""qat-sadam: quantization-aware training with S-Adam, and INT8 ONNX export."""
from .optim import ProxSGD, SAdam, sadam_param_groups
from .export import export_onnx
from .quant import QATConfig, QuantSpec, calibrate, prepare_qat

__version__ = "0.1.0"
__all__ = ["QATConfig", "QuantSpec", "prepare_qat", "calibrate", "SAdam", "ProxSGD", "sadam_param_groups", "export_onnx"]
