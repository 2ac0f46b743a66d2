"""Quantized layers: a float layer plus a weight FakeQuantize (composable, Brevitas style)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .fake_quant import FakeQuantize
from .spec import QuantSpec


class _WeightQuantized:
    """Mixin: the layer's weight passes through ``weight_quant`` (per output channel) on every forward."""

    weight_quant: FakeQuantize

    @classmethod
    def from_float(cls, layer: nn.Module, spec: QuantSpec):
        q = cls.__new__(cls)
        q.__dict__.update(layer.__dict__)  # same Parameter objects: no copy of the weights
        q._parameters, q._buffers, q._modules = dict(layer._parameters), dict(layer._buffers), dict(layer._modules)
        q.weight_quant = FakeQuantize(spec, "weight", channels=layer.weight.shape[0])
        q.weight_quant.init_from(layer.weight)
        return q


class QuantConv2d(_WeightQuantized, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight_quant(self.weight), self.bias)


class QuantLinear(_WeightQuantized, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight_quant(self.weight), self.bias)


QUANT_MODULES = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
