"""The QAT toolkits a user would pick instead of qat-sadam: Brevitas (AMD), NNCF (Intel) and AIMET
(Qualcomm), each driven the way its own documentation and examples drive it, behind one interface
for tools/benchmarks/bench_peers.py:

    ptq(float_model, calib, example, bits, work)   -> the toolkit's simulated model after its best PTQ
    qat_start(float_model, calib, example, bits)   -> the simulated model QAT starts from (trained by the caller)
    export(sim, example, path)                     -> the file the toolkit's deployment path writes
    runtimes                                       -> which of our runtimes read that file

Settings are the toolkits' documented defaults except where a setting is named here with the reason.
First and last layers stay at 8 bits where the toolkit allows it, as ours do: their weights, the
model's input, the last layer's input and its output (Brevitas, AIMET: per-quantizer bit widths, set
before calibration); NNCF's ``quantize`` has one bit width for weights and one for activations, so
its edges take the cell's bits. Each toolkit is imported where it is used: a run of one toolkit
needs only that one installed (and NNCF and Brevitas patch torch functions on import).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from bench_peers import ONNX_NAMES
from torch import nn


@dataclass(frozen=True)
class Bits:
    w: int
    a: int

    @property
    def name(self) -> str:
        return f"W{self.w}A{self.a}"


def _edge_layers(model: nn.Module, kinds) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    return [layers[0], layers[-1]]


class Toolkit:
    name = ""
    version = ""
    file_kind = ""  # what the export writes
    runtimes: tuple[str, ...] = ()  # our runtimes that read the file
    first_last_8bit = False  # whether the first and last layers' weights stay at 8 bits
    ptq_method = ""

    def forward(self, sim: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return sim(x)


# -- Brevitas ---------------------------------------------------------------------------------------


class Brevitas(Toolkit):
    """brevitas_examples' PTQ recipe for torchvision CNNs (ptq_evaluate.py): graph equalization (20
    iterations, biases merged), BN merged into the convs, fx backend, per-channel float-scale weights,
    static symmetric activations at the 99.999th percentile, calibration, bias correction; QAT trains
    that model (Brevitas learns the activation scales collected in calibration). Learned rounding
    (AdaRound-like) is not run: its layerwise loop costs 1,000 iterations per layer, hours on two cores.
    Export: QCDQ ONNX (QuantizeLinear-Clip-DequantizeLinear; sub-8-bit values as clipped int8)."""

    name = "brevitas"
    file_kind = "QCDQ ONNX, opset 17, int8 containers"
    runtimes = ("ort-cpu", "qnn-htp", "openvino")
    first_last_8bit = True
    ptq_method = "graph equalization + percentile calibration + bias correction"

    def __init__(self):
        import brevitas

        self.version = brevitas.__version__

    def _quantized(self, float_model, calib, bits: Bits):
        import brevitas.nn as qnn
        from brevitas.graph.quantize import preprocess_for_quantize
        from brevitas_examples.imagenet_classification.ptq.ptq_common import calibrate, quantize_model

        m = preprocess_for_quantize(
            copy.deepcopy(float_model).eval(), equalize_iters=20, equalize_merge_bias=True, merge_bn=True
        )
        q = quantize_model(
            m,
            backend="fx",
            weight_bit_width=bits.w,
            act_bit_width=bits.a,
            bias_bit_width=32,
            weight_quant_granularity="per_channel",
            act_quant_percentile=99.999,
            act_quant_type="sym",
            scale_factor_type="float_scale",
            quant_format="int",
        )
        layers = _edge_layers(q, (qnn.QuantConv2d, qnn.QuantLinear))
        for _, layer in layers:
            _brevitas_8bit(layer.weight_quant)
        nodes = {n.target: n for n in q.graph.nodes if n.op == "call_module"}
        first, last = nodes[layers[0][0]], nodes[layers[1][0]]
        for node in (first.args[0], last.args[0], *last.users):  # input, last input, last output
            act = getattr(q.get_submodule(node.target), "act_quant", None) if node.op == "call_module" else None
            if act is not None:
                _brevitas_8bit(act)
        q.eval()
        with torch.no_grad():
            q(calib[0])
        calibrate([(x, None) for x in calib], q)
        return q

    def ptq(self, float_model, calib, example, bits, work):
        from brevitas_examples.imagenet_classification.ptq.ptq_common import apply_bias_correction

        q = self._quantized(float_model, calib, bits)
        apply_bias_correction([(x, None) for x in calib], q)
        return q

    def qat_start(self, float_model, calib, example, bits):
        return self._quantized(float_model, calib, bits)

    def forward(self, sim, x):
        y = sim(x)
        return getattr(y, "value", y)

    def export(self, sim, example, path):
        from brevitas.export import export_onnx_qcdq

        export_onnx_qcdq(sim.eval(), example, path, opset_version=17, dynamo=False, **ONNX_NAMES)
        return path


def _brevitas_8bit(proxy) -> None:
    """Brevitas's way to change an injected quantizer after construction: a new injector, re-initialised."""
    proxy.quant_injector = proxy.quant_injector.let(bit_width=8)
    proxy.init_tensor_quant()


# -- NNCF ------------------------------------------------------------------------------------------


class Nncf(Toolkit):
    """``nncf.quantize`` (its default PTQ: min-max statistics, fast bias correction) and, for QAT, the
    same quantized model fine-tuned (NNCF's documented QAT flow; its quantizer scales are parameters).
    Below 8 bits the hardware config must allow them: ``target_device=NPU`` (the only one with 4-bit
    weights and activations). With 4-bit activations NPU refuses the global average pool ("Quantization
    parameter constraints ... incompatible with HW capabilities ... pool/adaptive_avg_pool2d/0"); the
    smallest fix, applied here, is NNCF's ignored scope on that op type (no quantizer at its input).
    Export: ``openvino.convert_model`` to OpenVINO IR (FakeQuantize ops), the
    file NNCF's deployment path writes; NNCF's ONNX export writes QuantizeLinear pairs at 8 bits only."""

    name = "nncf"
    file_kind = "OpenVINO IR (FakeQuantize)"
    runtimes = ("openvino-ir",)
    ptq_method = "nncf.quantize defaults (min-max, fast bias correction)"

    def __init__(self):
        import nncf

        self.version = nncf.__version__

    def ptq(self, float_model, calib, example, bits, work):
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

        device = nncf.TargetDevice.ANY if bits.w == bits.a == 8 else nncf.TargetDevice.NPU
        pool = ["adaptive_avg_pool2d"] if bits.a < 8 else []
        return nncf.quantize(
            copy.deepcopy(float_model).eval(),
            nncf.Dataset(calib),
            subset_size=len(calib),
            target_device=device,
            ignored_scope=nncf.IgnoredScope(types=pool),
            advanced_parameters=AdvancedQuantizationParameters(
                weights_quantization_params=QuantizationParameters(num_bits=bits.w),
                activations_quantization_params=QuantizationParameters(num_bits=bits.a),
            ),
        )

    def qat_start(self, float_model, calib, example, bits):
        return self.ptq(float_model, calib, example, bits, None)

    def export(self, sim, example, path):
        import openvino as ov

        path = os.path.splitext(path)[0] + ".xml"
        ov.save_model(ov.convert_model(sim.eval(), example_input=example), path, compress_to_fp16=False)
        return path


# -- AIMET -----------------------------------------------------------------------------------------

ADAROUND_ITERATIONS = 500  # AIMET's default is 10,000 per layer: hours on two cores; the count is stated in the table


class Aimet(Toolkit):
    """AIMET's PTQ recipe: ``prepare_model``, cross-layer equalization (BN folded first), AdaRound of
    the weights (``ADAROUND_ITERATIONS`` per layer over the calibration batches), then QuantSim with the
    per-channel config and ``compute_encodings``. QAT (AIMET's recommended scheme): CLE, then QuantSim
    with ``training_range_learning_with_tf_init`` (learned ranges) trained as a model. Export:
    ``aimet_torch.onnx.export`` at opset 21, weights pre-quantized (INT4 initializers at 4 bits)."""

    name = "aimet"
    file_kind = "QDQ ONNX, opset 21, weights as INT8/INT4 initializers"
    runtimes = ("ort-cpu", "qnn-htp", "openvino")
    first_last_8bit = True
    ptq_method = f"CLE + AdaRound ({ADAROUND_ITERATIONS} it/layer) + TF-enhanced ranges"

    def __init__(self):
        import aimet_torch

        self.version = aimet_torch.__version__

    def _prepared(self, float_model, example):
        from aimet_torch.cross_layer_equalization import equalize_model
        from aimet_torch.model_preparer import prepare_model

        m = prepare_model(copy.deepcopy(float_model).eval())
        equalize_model(m, dummy_input=example)
        return m

    def _sim(self, model, calib, example, bits, scheme, frozen_encodings=None):
        from aimet_torch.common.quantsim_config.utils import get_path_for_per_channel_config
        from aimet_torch.quantization.affine import QuantizeDequantize
        from aimet_torch.quantsim import QuantizationSimModel

        sim = QuantizationSimModel(
            model,
            example,
            quant_scheme=scheme,
            default_param_bw=bits.w,
            default_output_bw=bits.a,
            config_file=get_path_for_per_channel_config(),
        )
        (_, first), (last_name, last) = _edge_layers(sim.model, (nn.Conv2d, nn.Linear))
        eight_bit = lambda q: QuantizeDequantize(q.shape, bitwidth=8, symmetric=q.symmetric)  # noqa: E731
        for layer in (first, last):
            layer.param_quantizers["weight"] = eight_bit(layer.param_quantizers["weight"])
        # activations: the model's input, the last output quantized before the last layer (its input), its output
        names = [n for n, _ in sim.model.named_modules()]
        before = [
            m
            for n, m in sim.model.named_modules()
            if names.index(n) < names.index(last_name) and _quantizes(m, "output_quantizers")
        ]
        edges = [(first.input_quantizers, 0), (before[-1].output_quantizers, 0), (last.output_quantizers, 0)]
        for quantizers, i in edges:
            if quantizers[i] is not None:
                quantizers[i] = eight_bit(quantizers[i])
        if frozen_encodings:
            sim.set_and_freeze_param_encodings(frozen_encodings)

        def forward(m, _):
            with torch.no_grad():
                for x in calib:
                    m(x)

        sim.compute_encodings(forward, None)
        return sim

    def ptq(self, float_model, calib, example, bits, work):
        from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
        from aimet_torch.common.defs import QuantScheme
        from aimet_torch.common.quantsim_config.utils import get_path_for_per_channel_config

        m = self._prepared(float_model, example)
        edges = [layer for _, layer in _edge_layers(m, (nn.Conv2d, nn.Linear))]
        m = Adaround.apply_adaround(
            m,
            example,
            AdaroundParameters([(x, None) for x in calib], len(calib), default_num_iterations=ADAROUND_ITERATIONS),
            path=work,
            filename_prefix="adaround",
            default_param_bw=bits.w,
            param_bw_override_list=[(layer, 8) for layer in edges],
            default_quant_scheme=QuantScheme.post_training_tf_enhanced,
            default_config_file=get_path_for_per_channel_config(),
        )
        return self._sim(
            m,
            calib,
            example,
            bits,
            QuantScheme.post_training_tf_enhanced,
            frozen_encodings=os.path.join(work, "adaround.encodings"),
        ).model

    def qat_start(self, float_model, calib, example, bits):
        from aimet_torch.common.defs import QuantScheme

        m = self._prepared(float_model, example)
        return self._sim(m, calib, example, bits, QuantScheme.training_range_learning_with_tf_init).model

    def export(self, sim, example, path):
        import aimet_torch.onnx as aimet_onnx

        aimet_onnx.export(
            sim.eval(), example, path, opset_version=21, dynamo=False, prequantize_constants=True, **ONNX_NAMES
        )
        return path


def _quantizes(module: nn.Module, kind: str) -> bool:
    return any(q is not None for q in getattr(module, kind, None) or [])


TOOLKITS = {"brevitas": Brevitas, "nncf": Nncf, "aimet": Aimet}
