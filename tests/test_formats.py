"""The edge formats: W4A8 with 4-bit weights stored as INT4, W8A16 with uint16 activations (opset 21),
each on the runtimes that run it, and one-line refusals where a runtime or a profile cannot."""

import dataclasses
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from qat_sadam import calibrate, prepare_qat
from qat_sadam.cli import main
from qat_sadam.errors import ExportError, RecipeError, ValidationError
from qat_sadam.export import RUNTIMES, ModelFiles, export_onnx, load_target, ort_session
from qat_sadam.export.runtimes import measure
from qat_sadam.export.target import Target
from qat_sadam.export.validate import activation_container, output_scale, validate
from qat_sadam.models import build_model
from qat_sadam.train.recipe import parse_bits

# The qnn-htp profile at batch 8 with 7-bit first/last weights: ORT CPU's u8 x s8 kernels are then exact
# on x86 without VNNI too, so ORT's parity can be gated here.
HTP = Target(
    name="test-htp",
    opset=21,
    activation_type="uint16",
    weight_storage="int4",
    weight_bits_max=7,
    checks=["parity", "accuracy", "size"],
    runtimes=[],
)


def _trained(bits: str):
    """small_cnn prepared at ``bits`` (W4A8, W8A16), calibrated and moved by a few train-mode passes."""
    torch.manual_seed(0)
    q = parse_bits(bits)
    model = prepare_qat(build_model("small_cnn", 10), {"weight_bits": q["weight_bits"], "act_bits": q["act_bits"]})
    x = torch.randn(32, 3, 16, 16)
    calibrate(model, [x])
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval(), x


def _initializer_types(path: str) -> dict:
    m = onnx.load(path)
    inits = {t.name: t for t in m.graph.initializer}
    return {
        n.input[0]: inits[n.input[0]].data_type
        for n in m.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) > 1
    }


def test_w4a8_stores_4bit_weights_as_int4_with_the_same_integers(tmp_path):
    model, x = _trained("W4A8")
    done = export_onnx(model, x[:1], str(tmp_path / "m.onnx"), HTP)
    assert done["int4_path"] == str(tmp_path / "m.int4.onnx") and done["activation_type"] == "uint8"
    int8, int4 = _initializer_types(done["path"]), _initializer_types(done["int4_path"])
    assert set(int8.values()) == {TensorProto.INT8}
    # 4-bit middle layers as INT4; the 8-bit first and last layers stay int8
    assert sorted(int4.values()).count(TensorProto.INT4) == len(done["int4_weights"]) == 1  # small_cnn: body.0
    assert TensorProto.INT8 in int4.values()
    a, b = ({t.name: t for t in onnx.load(p).graph.initializer} for p in (done["path"], done["int4_path"]))
    for name in done["int4_weights"]:  # two values per byte, the same integers
        assert np.array_equal(numpy_helper.to_array(b[name]).astype(np.int8), numpy_helper.to_array(a[name]))
        assert len(b[name].raw_data) == (numpy_helper.to_array(a[name]).size + 1) // 2
    halved = sum(numpy_helper.to_array(a[name]).size for name in done["int4_weights"]) / 2
    assert os.path.getsize(done["path"]) - os.path.getsize(done["int4_path"]) >= 0.85 * halved  # less a new zero point
    assert onnx.load(done["int4_path"]).opset_import[0].version == 21
    with torch.no_grad():
        ref = done["integer"](x).numpy()
    scale = output_scale(onnx.load(done["path"]))
    for path in (done["path"], done["int4_path"]):  # ORT runs both: int8 kernels, and float after INT4 DQ
        out = ort_session(path).run(None, {"input": x.numpy()})[0]
        assert np.abs(out - ref).max() / scale <= 1.0 + 1e-3


def test_w8a16_writes_uint16_activations_within_one_16bit_lsb_of_the_reference(tmp_path):
    model, x = _trained("W8A16")
    assert {q.spec.bits for q in model.activation_quantizers.values()} == {16}  # first/last raised to 16 too
    assert {q.spec.scale_mode for q in model.activation_quantizers.values()} == {"observer"}
    done = export_onnx(model, x[:1], str(tmp_path / "m.onnx"), HTP)
    m = onnx.load(done["path"])
    assert done["int4_path"] is None and activation_container(m) == "uint16"
    zero_points = {n.input[2] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    types = {t.name: t.data_type for t in m.graph.initializer}
    assert {types[z] for z in zero_points} == {TensorProto.UINT16}
    with torch.no_grad():
        ref = done["integer"](x).numpy()
    out = ort_session(done["path"]).run(None, {"input": x.numpy()})[0]
    scale = output_scale(m)
    assert scale < 1e-3 and np.abs(out - ref).max() / scale <= 1.0 + 1e-3  # ORT's float kernels: one LSB16 at a tie
    assert (out.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("bits", ["W4A8", "W8A16"])
def test_each_runtime_runs_the_format_it_takes_and_refuses_the_others(tmp_path, bits):
    model, x = _trained(bits)
    done = export_onnx(model, x[:1], str(tmp_path / "m.onnx"), HTP)
    files = ModelFiles(
        done["path"],
        None,
        done["frozen"],
        None,
        x[:1].numpy(),
        str(tmp_path),
        done["int4_path"],
        done["activation_type"],
    )
    with torch.no_grad():
        ref = done["integer"](x).numpy()
    scale = output_scale(onnx.load(done["path"]))
    for name, rt in RUNTIMES.items():
        if rt.missing():
            continue
        if done["activation_type"] in rt.refuses:
            with pytest.raises(ValidationError, match=f"runtime {name} cannot run uint16 activations"):
                measure(name, files, x.numpy(), ref, scale)
            continue
        row = measure(name, files, x.numpy(), ref, scale)
        assert row["status"] == "ran" and row["within_tolerance"], (name, row.get("reason"), row.get("parity"))


def test_profiles_and_bits_refuse_what_they_cannot_hold_in_one_line(tmp_path):
    for text in ("W9A8", "W4A12", "W16A16", "16"):
        with pytest.raises(RecipeError):
            parse_bits(text)
    assert parse_bits("W8A16") == {"weight_bits": 8, "act_bits": 16}
    w8a16, _ = _trained("W8A16")
    with pytest.raises(ExportError, match="16-bit activations and target cpu-x86 runs uint8"):
        export_onnx(w8a16, torch.zeros(1, 3, 16, 16), str(tmp_path / "a.onnx"), "cpu-x86")
    torch.manual_seed(0)
    w5 = prepare_qat(build_model("small_cnn", 10), {"weight_bits": 5, "act_bits": 8})
    with pytest.raises(ExportError, match="stores weights as INT4 and this model's have 5 bits"):
        export_onnx(w5.eval(), torch.zeros(1, 3, 16, 16), str(tmp_path / "b.onnx"), HTP)
    w4a4 = prepare_qat(build_model("small_cnn", 10), {"bits": 4})
    with pytest.raises(ExportError, match="target qnn-htp takes activations of 8 or 16 bits; this model has 4-bit"):
        export_onnx(w4a4.eval(), torch.zeros(1, 3, 16, 16), str(tmp_path / "c.onnx"), "qnn-htp")
    assert not os.listdir(tmp_path)  # nothing written
    with pytest.raises(ValidationError, match="need opset 21"):
        Target(name="t", weight_storage="int4")
    with pytest.raises(ValidationError, match="unknown activation_type 'int16'"):
        Target(name="t", opset=21, activation_type="int16")
    with pytest.raises(ValidationError, match="must set max_lsb and top1_agreement"):
        Target(name="t", tolerances={"qnn-htp": {"uint8": {"max_lsb": 4}}})
    with pytest.raises(ValueError, match="lsq cannot train 16-bit step sizes"):
        prepare_qat(build_model("small_cnn", 10), {"act_bits": 16, "activation": {"scale_mode": "lsq"}})
    htp = load_target("qnn-htp")
    assert (htp.opset, htp.weight_storage, htp.tolerance("qnn-htp", "uint8").max_lsb) == (21, "int4", 8)


def test_training_w8a16_for_a_uint8_target_is_refused_before_the_first_step(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "quickstart", "--bits", "W8A16", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target cpu-x86 runs uint8 activations only" in err[0]
    assert not (out / "checkpoints").exists()
    assert main(["train", "quickstart", "--bits", "W4A3", "--set", "export.target=qnn-htp", "--out", str(out)]) == 2
    assert "takes activations of 8 or 16 bits; this model has 3-bit ones" in capsys.readouterr().err


def test_validating_a_uint16_file_on_openvino_is_refused(tmp_path):
    model, x = _trained("W8A16")
    done = export_onnx(model, x[:1], str(tmp_path / "m.onnx"), HTP)
    with pytest.raises(ValidationError, match="runtime openvino cannot run uint16 activations: OpenVINO drops"):
        validate(done["path"], target=HTP, inputs=[x.numpy()], runtimes=["openvino"])


def test_a_profile_without_ort_parity_gates_and_ranks_on_the_integer_reference(tmp_path):
    """qnn-htp leaves ORT CPU's parity out (its u8 x s8 kernels saturate full-range 8-bit weights on x86
    without VNNI): the deployed accuracy is then the integer reference's, which the runtimes are gated
    against, and ORT's disagreement is reported, not failed."""
    model, x = _trained("W4A8")
    done = export_onnx(model, x[:1], str(tmp_path / "m.onnx"), HTP)
    with torch.no_grad():
        integer = done["integer"](x).numpy()
    shifted = np.roll(integer, 1, axis=1)  # a reference that disagrees with ORT on every sample
    labels = shifted.argmax(1)
    args = dict(inputs=[x.numpy()], labels=labels, integer_outputs=shifted, torch_outputs=shifted)
    ungated = validate(done["path"], target=dataclasses.replace(HTP, checks=["accuracy"]), **args)
    assert ungated["accuracy"]["deployed_by"] == "integer reference" and ungated["accuracy"]["deployed"] == 1.0
    assert ungated["passed"] and ungated["parity"]["torch_integer_vs_ort"]["top1_agreement"] < 0.5
    gated = validate(done["path"], target=HTP, **args)
    assert gated["accuracy"]["deployed_by"] == "ORT CPU" and not gated["passed"]
