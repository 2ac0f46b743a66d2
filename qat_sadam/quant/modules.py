"""Quantized layers: a float layer plus a weight FakeQuantize (composable, Brevitas style).

Weights are quantized per output channel: axis 0 of a conv's or linear layer's weight. A transposed
conv stores its weight as (in, out/groups, k...): its quantizer's axis is 1, as torch.ao quantizes
it, per output channel without groups and per output channel of a group, shared by the groups, with
them (every consumer of a weight quantizer then reads the parameter as it is stored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fake_quant import FakeQuantize
from .spec import QuantSpec


def transposed_to_conv_layout(w: torch.Tensor, groups: int) -> torch.Tensor:
    """(in, out/groups, k...) -> (out, in/groups, k...): output channels first, kernels not flipped."""
    cin, cout_g, k = w.shape[0], w.shape[1], w.shape[2:]
    return w.reshape(groups, cin // groups, cout_g, *k).transpose(1, 2).reshape(groups * cout_g, cin // groups, *k)


class _WeightQuantized:
    """Mixin: the layer's weight passes through ``weight_quant`` (per output channel) on every forward."""

    weight_quant: FakeQuantize
    weight_axis = 0  # the output channels' axis of the stored weight

    @classmethod
    def from_float(cls, layer: nn.Module, spec: QuantSpec):
        q = cls.__new__(cls)
        q.__dict__.update(layer.__dict__)  # same Parameter objects: no copy of the weights
        q._parameters, q._buffers, q._modules = dict(layer._parameters), dict(layer._buffers), dict(layer._modules)
        spec = spec.with_(axis=cls.weight_axis) if spec.per_channel else spec
        q.weight_quant = FakeQuantize(spec, "weight", channels=layer.weight.shape[cls.weight_axis])
        q.weight_quant.init_from(layer.weight)
        return q


class QuantConv1d(_WeightQuantized, nn.Conv1d):
    def forward(self, x):
        return self._conv_forward(x, self.weight_quant(self.weight), self.bias)


class QuantConv2d(_WeightQuantized, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight_quant(self.weight), self.bias)


class _QuantTransposed(_WeightQuantized):
    weight_axis = 1

    def forward(self, x, output_size=None):
        pad = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, self.spatial_dims, self.dilation
        )
        conv = F.conv_transpose1d if self.spatial_dims == 1 else F.conv_transpose2d
        w = self.weight_quant(self.weight)
        return conv(x, w, self.bias, self.stride, self.padding, pad, self.groups, self.dilation)


class QuantConvTranspose1d(_QuantTransposed, nn.ConvTranspose1d):
    spatial_dims = 1


class QuantConvTranspose2d(_QuantTransposed, nn.ConvTranspose2d):
    spatial_dims = 2


class QuantLinear(_WeightQuantized, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight_quant(self.weight), self.bias)


QUANT_MODULES = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
}
QUANT_CONVS = (QuantConv1d, QuantConv2d, QuantConvTranspose1d, QuantConvTranspose2d)
QUANT_TRANSPOSED = (QuantConvTranspose1d, QuantConvTranspose2d)
