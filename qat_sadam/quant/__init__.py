"""The quantizer: specs, fake-quant modules, QAT preparation, calibration and BatchNorm re-estimation."""

from .calibration import calibrate, reestimate_batchnorm
from .config import QATConfig
from .fake_quant import FakeQuantize
from .kernels import fused_kernels_buildable, use_fused_kernels
from .modules import (
    QUANT_CONVS,
    QUANT_TRANSPOSED,
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantLinear,
)
from .prepare import prepare_qat, quantizers
from .spec import QuantSpec

__all__ = [
    "QATConfig",
    "QuantSpec",
    "FakeQuantize",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QUANT_CONVS",
    "QUANT_TRANSPOSED",
    "QuantLinear",
    "prepare_qat",
    "calibrate",
    "reestimate_batchnorm",
    "quantizers",
    "fused_kernels_buildable",
    "use_fused_kernels",
]
