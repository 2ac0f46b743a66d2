"""The quantizer: specs, fake-quant modules, QAT preparation and calibration."""
from .config import QATConfig
from .fake_quant import FakeQuantize
from .modules import QuantConv2d, QuantLinear
from .prepare import calibrate, prepare_qat, quantizers
from .spec import QuantSpec

__all__ = ["QATConfig", "QuantSpec", "FakeQuantize", "QuantConv2d", "QuantLinear", "prepare_qat", "calibrate", "quantizers"]
