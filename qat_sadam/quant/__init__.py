"""The quantizer: specs, fake-quant modules, QAT preparation, calibration and BatchNorm re-estimation."""

from .calibration import calibrate, reestimate_batchnorm
from .config import QATConfig
from .fake_quant import FakeQuantize
from .kernels import fused_kernels_buildable, use_fused_kernels
from .modules import QuantConv2d, QuantLinear
from .prepare import prepare_qat, quantizers
from .spec import QuantSpec

__all__ = [
    "QATConfig",
    "QuantSpec",
    "FakeQuantize",
    "QuantConv2d",
    "QuantLinear",
    "prepare_qat",
    "calibrate",
    "reestimate_batchnorm",
    "quantizers",
    "fused_kernels_buildable",
    "use_fused_kernels",
]
