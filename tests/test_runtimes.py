"""Each runtime of qat_sadam/export/runtimes on a small exported net, against the integer reference.

A runtime whose package is absent is skipped here with the reason (and reported "not run" by the
validator, never passed); `make venv` installs them all."""

import collections
import importlib
import json
import os
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qat_sadam import calibrate, prepare_qat
from qat_sadam.cli import main
from qat_sadam.errors import ValidationError
from qat_sadam.export import (
    RUNTIMES,
    ModelFiles,
    export_float_onnx,
    export_onnx,
    float_model,
    freeze,
    host,
    ort_session,
)
from qat_sadam.export.host import u8s8_saturates
from qat_sadam.export.runtimes import check_names, measure, native_output_to
from qat_sadam.export.runtimes.executorch_xnnpack import pt2e_form
from qat_sadam.export.target import Target
from qat_sadam.export.validate import fusion, output_scale, validate
from qat_sadam.models import build_model

CPU = Target(name="test", weight_bits_max=7, checks=["fusion", "parity"], runtimes=[])


def _exported(tmp_path, bits, name="small_cnn", target=CPU):
    torch.manual_seed(0)
    model = prepare_qat(build_model(name, 10) if isinstance(name, str) else name, {"bits": bits})
    x = torch.randn(32, 3, 32, 32)
    calibrate(model, [x])
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()
    done = export_onnx(model, x[:1], str(tmp_path / "m.onnx"), target)
    float_path = export_float_onnx(model, x[:1], str(tmp_path / "f.onnx"), target)
    files = ModelFiles(done["path"], float_path, done["frozen"], float_model(model), x[:1].numpy(), str(tmp_path))
    with torch.no_grad():
        ref = done["integer"](x).numpy()
    return files, x.numpy(), ref, output_scale(onnx.load(done["path"]))


def _require(name):
    reason = RUNTIMES[name].missing()
    if reason:
        pytest.skip(f"{name} not installed here ({reason}); install: {RUNTIMES[name].install}")


# W4A4 on every runtime (sub-8-bit activation ranges); 8-bit activations on every runtime are
# test_formats.py's W4A8 case, so W8A8 runs on ORT CPU alone here.
@pytest.mark.parametrize("name,bits", [(name, 4) for name in RUNTIMES] + [("ort-cpu", 8)])
def test_runtime_matches_the_integer_reference_within_its_tolerance(tmp_path, name, bits):
    _require(name)
    files, x, ref, scale = _exported(tmp_path, bits)
    row = measure(name, files, x, ref, scale)
    assert row["status"] == "ran", row.get("reason")
    tol = RUNTIMES[name].tolerances["uint8"]
    assert row["parity"]["max_lsb"] <= tol.max_lsb and row["parity"]["top1_agreement"] >= tol.top1_agreement
    assert row["within_tolerance"] and row["placement"]
    if name in (
        "ort-cpu",
        "ort-web",
        "executorch-xnnpack",
        "openvino",
    ):  # exact on this small net (docs/guide/runtimes.md)
        assert row["parity"]["max_lsb"] == 0.0
    if not RUNTIMES[name].simulated:
        assert row["latency_batch1"]["int8_ms"] > 0 and row["latency_batch1"]["float_ms"] > 0


def test_executorch_keeps_sub_8_bit_ranges(tmp_path):
    """The rewrite shifts uint8 to int8 and clamps 4-bit ranges; without the clamp XNNPACK would
    let a 4-bit conv output run over its 16 levels."""
    files, x, ref, scale = _exported(tmp_path, 4)
    gm = pt2e_form(files.frozen)
    qd = torch.ops.quantized_decomposed
    quants = [n for n in gm.graph.nodes if n.target == qd.quantize_per_tensor.default]
    ranges = collections.Counter((n.args[3], n.args[4]) for n in quants)
    assert (-128, -113) in ranges and all(n.args[5] == torch.int8 for n in quants)
    assert any(n.target == torch.ops.aten.clamp.default for n in gm.graph.nodes)
    with torch.no_grad():  # the rewrite computes what the frozen graph computes
        np.testing.assert_allclose(
            gm(torch.from_numpy(x)).numpy(), files.frozen(torch.from_numpy(x)).numpy(), atol=1e-5
        )


class _ResidualBehindIdentity(torch.nn.Module):
    """ResNet-18's CIFAR stem and first block in small: the max pool replaced by an Identity whose
    output feeds both the block's first conv and its residual add."""

    def __init__(self):
        super().__init__()
        self.stem, self.pool = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Identity()
        self.conv1, self.conv2 = (torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_executorch_lowers_a_residual_add_fed_through_an_identity(tmp_path):
    """An Identity between a dequantize and two consumers made the dequantize shared after
    torch.export, and XNNPACK's partitioner found a dependency cycle (ResNet-18 W4A4)."""
    _require("executorch-xnnpack")
    torch.manual_seed(0)
    files, x, ref, scale = _exported(tmp_path, 4, _ResidualBehindIdentity())
    row = measure("executorch-xnnpack", files, x, ref, scale)
    assert row["status"] == "ran", row.get("reason")
    assert row["placement"]["portable kernels (not delegated)"] == "none"
    assert row["parity"]["max_lsb"] == 0.0


def _clip_form(path, out, uint8: bool):
    """The exporter's sub-8-bit form Q1 -> DQ1 -> Min(., DQ(hi)) -> Q2 -> DQ2 rewritten into an older
    one: Q1 -> Clip(uint8 0, hi) -> DQ2 (``uint8``), or Q1 -> DQ1 -> Clip(float) -> Q2 -> DQ2."""
    m = onnx.load(path)
    nodes = list(m.graph.node)
    by_out = {o: n for n in nodes for o in n.output}
    value = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in nodes if n.op_type == "Constant"}
    value.update({i.name: numpy_helper.to_array(i) for i in m.graph.initializer})
    for n in nodes:  # the exporter aliases shared constants through Identity nodes
        if n.op_type == "Identity" and n.input[0] in value:
            value[n.output[0]] = value[n.input[0]]
    drop, new = set(), []
    for mn in (n for n in nodes if n.op_type == "Min"):
        dq1, bound = by_out[mn.input[0]], by_out[mn.input[1]]
        q1, q2 = by_out[dq1.input[0]], next(n for n in nodes if mn.output[0] in n.input)
        scale, zp, hi = (float(value[q1.input[1]]), int(value[q1.input[2]]), int(value[bound.input[0]]))
        if uint8:
            names, values, dtype = [f"{mn.name}_lo", f"{mn.name}_hi"], (0, hi), np.uint8
            clip = helper.make_node("Clip", [q1.output[0], *names], [q2.output[0]], name=mn.name + "_clip")
            drop |= {id(dq1), id(mn), id(q2)}
        else:
            names, values, dtype = [f"{mn.name}_lo", f"{mn.name}_hi"], (-zp * scale, (hi - zp) * scale), np.float32
            clip = helper.make_node("Clip", [dq1.output[0], *names], [mn.output[0]], name=mn.name + "_clip")
            drop |= {id(mn)}
        m.graph.initializer.extend(numpy_helper.from_array(np.array(v, dtype), n) for v, n in zip(values, names))
        new.append((q1 if uint8 else dq1, clip))
    kept = [n for n in nodes if id(n) not in drop]
    for after, c in new:
        kept.insert(kept.index(after) + 1, c)
    del m.graph.node[:]
    m.graph.node.extend(kept)
    onnx.save(m, out)
    return len(new)


def test_min_form_keeps_ort_cpu_fused_and_exact(tmp_path):
    """Same integer kernels, same logits as the Q -> Clip(uint8) -> DQ form; the price is one
    DequantizeLinear/QuantizeLinear pair per bound that ORT does not fold (docs/guide/runtimes.md)."""
    files, x, ref, scale = _exported(tmp_path, 4)
    bounds = _clip_form(files.onnx, str(tmp_path / "old.onnx"), uint8=True)
    assert bounds > 0
    new, old = ort_session(files.onnx), ort_session(str(tmp_path / "old.onnx"))
    np.testing.assert_array_equal(new.run(None, {"input": x})[0], old.run(None, {"input": x})[0])
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    fa, fb = fusion(files.onnx, str(tmp_path / "a")), fusion(str(tmp_path / "old.onnx"), str(tmp_path / "b"))
    assert fa["ok"] and fa["integer_kernels"] == fb["integer_kernels"] == 3 and not fa["float_compute_left"]
    a, b = fa["optimized_ops"], fb["optimized_ops"]
    assert a["QuantizeLinear"] - b["QuantizeLinear"] == a["DequantizeLinear"] - b["DequantizeLinear"] == bounds
    assert a["Min"] == b["Clip"] == bounds


def test_a_node_qnn_rejects_fails_the_validation(tmp_path):
    """The uint8 Clip between Q and DQ is a tensor without a quantization encoding to QNN: with CPU
    fallback disabled the model does not load, and validation fails."""
    _require("qnn-htp")
    files, x, ref, scale = _exported(tmp_path, 4)
    _clip_form(files.onnx, str(tmp_path / "old.onnx"), uint8=True)
    tgt = Target(name="t", weight_bits_max=7, checks=["parity"], runtimes=["qnn-htp"])
    rep = validate(str(tmp_path / "old.onnx"), target=tgt, inputs=[x], integer_outputs=ref, out_dir=str(tmp_path))
    assert rep["runtimes"]["qnn-htp"]["status"] == "failed" and not rep["passed"]
    assert any(f.startswith("qnn-htp: QNN HTP rejects the model") for f in rep["failures"])
    rep = validate(files.onnx, target=tgt, inputs=[x], integer_outputs=ref, out_dir=str(tmp_path))
    assert rep["runtimes"]["qnn-htp"]["status"] == "ran" and rep["passed"], rep["failures"]


def _conv_then_bound(path: str, bound: str) -> str:
    """x -> Q/DQ -> 1x1 conv (int8 weights) -> Q -> DQ -> {Clip(0, 6) | Min(., DQ(15))} -> Q -> DQ, uint8
    scale 0.4: a 4-bit range of 16 levels (0 to 6.0) after a conv, as in MobileNetV2 W4A4."""
    t = helper.make_tensor
    inits = [
        t("s", TensorProto.FLOAT, [], [0.4]),
        t("z", TensorProto.UINT8, [], [0]),
        t("lo", TensorProto.FLOAT, [], [0.0]),
        t("hi", TensorProto.FLOAT, [], [6.0]),
        t("hi_q", TensorProto.UINT8, [], [15]),
        t("w", TensorProto.INT8, [4, 4, 1, 1], (np.eye(4, dtype=np.int8) * 100).flatten().tolist()),
        t("ws", TensorProto.FLOAT, [4], [0.01] * 4),
        t("wz", TensorProto.INT8, [4], [0] * 4),
    ]
    n = helper.make_node
    nodes = [
        n("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        n("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        n("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        n("Conv", ["xd", "wd"], ["c"]),
        n("QuantizeLinear", ["c", "s", "z"], ["q1"]),
        n("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
    ]
    nodes += (
        [n("Clip", ["d1", "lo", "hi"], ["b"])]
        if bound == "clip"
        else [n("DequantizeLinear", ["hi_q", "s", "z"], ["hi_d"]), n("Min", ["d1", "hi_d"], ["b"])]
    )
    nodes += [n("QuantizeLinear", ["b", "s", "z"], ["q2"]), n("DequantizeLinear", ["q2", "s", "z"], ["y"])]
    io = [helper.make_tensor_value_info(v, TensorProto.FLOAT, [1, 4, 4, 4]) for v in ("x", "y")]
    model = helper.make_model(
        helper.make_graph(nodes, bound, io[:1], io[1:], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_qnn_htp_keeps_a_bound_written_as_min_not_as_a_float_clip(tmp_path):
    """Why the exporter writes sub-8-bit bounds as Min: after a conv, QNN HTP accepts a float Clip
    between DQ and Q and ignores it (outputs run to 20 past the 6.0 bound), and keeps a Min with a
    dequantized bound exactly as ORT CPU does (docs/guide/runtimes.md, MobileNetV2 W4A4 site by site)."""
    _require("qnn-htp")
    from qat_sadam.export.runtimes.qnn_htp import qnn_session

    x = {"x": np.linspace(0, 20, 64, dtype=np.float32).reshape(1, 4, 4, 4)}
    out = {
        (bound, rt): session(_conv_then_bound(str(tmp_path / f"{bound}.onnx"), bound)).run(None, x)[0]
        for bound in ("min", "clip")
        for rt, session in (("cpu", ort_session), ("qnn", qnn_session))
    }
    assert out["min", "cpu"].max() == out["clip", "cpu"].max() == np.float32(6.0)
    np.testing.assert_array_equal(out["min", "qnn"], out["min", "cpu"])
    assert out["clip", "qnn"].max() > 19.0


def test_runtime_out_of_tolerance_fails_and_absent_runtime_is_not_run(tmp_path, monkeypatch):
    files, x, ref, scale = _exported(tmp_path, 4)
    monkeypatch.setattr(RUNTIMES["openvino"], "missing", lambda: "Python package openvino not installed")
    tgt = Target(name="t", weight_bits_max=7, checks=["parity"], runtimes=["ort-cpu", "openvino"])
    shifted = ref + 3 * scale * (np.arange(ref.shape[1]) == 0)  # a reference 3 LSB off in one class
    rep = validate(files.onnx, target=tgt, inputs=[x], integer_outputs=shifted, out_dir=str(tmp_path))
    ov, cpu = rep["runtimes"]["openvino"], rep["runtimes"]["ort-cpu"]
    assert ov["status"] == "not run" and "pip install" in ov["install"] and "openvino" not in " ".join(rep["failures"])
    assert cpu["status"] == "ran" and cpu["parity"]["max_lsb"] == pytest.approx(3.0, abs=1e-3)
    assert not cpu["within_tolerance"] and not rep["passed"] and rep["failures"][0].startswith("ort-cpu: 3.0 LSB max")
    assert "not run" in (tmp_path / "validation.md").read_text()


def test_unknown_runtime_is_a_user_error():
    assert check_names(["all"]) == list(RUNTIMES)
    with pytest.raises(ValidationError, match="unknown runtime 'tflite'; choose from ort-cpu"):
        check_names(["ort-cpu", "tflite"])
    with pytest.raises(ValidationError, match="unknown runtime"):
        Target(name="t", runtimes=["coreml"])


def test_the_newcomers_path_ends_in_a_verdict_right_for_the_file(tmp_path, monkeypatch, capsys):
    """The README's path at a cut budget: a barely trained float model (its logits within a few LSB of
    each other), a short W4A4 fine-tune, export to the mobile profile (8-bit first and last layers,
    batch fixed at 1) on ORT CPU and OpenVINO, the two runtimes whose x86 kernels saturate 8-bit
    weights without VNNI (every runtime costs 45 s here; each has its own test). The file is right:
    PASSED, whatever this host's kernels saturate (HOST lines). A fold broken in one layer FAILS."""
    float_run, run = tmp_path / "float", tmp_path / "ft"
    quick = ["--quiet", "--set", "max_steps=8"]
    assert main(["train", "quickstart_float", "--out", str(float_run)] + quick) == 0
    ft = ["--set", f"model.checkpoint={float_run}"]
    assert main(["train", "quickstart_finetune", "--bits", "4", "--out", str(run)] + quick + ft) == 0
    trained = capsys.readouterr().out  # the fine-tune's own reports: PTQ, then QAT, each labelled
    assert "None" not in trained
    ptq, qat = trained.split("PTQ INT8 (")[1].split("QAT INT8 (after the fine-tune):")
    assert ptq.count("samples:") == qat.count("samples:") == 1 and "ladder: float" in qat
    export = ["export", str(run), "--target", "mobile-arm", "--samples", "64"]
    assert main(export + ["--runtimes", "ort-cpu,openvino", "-o", str(tmp_path / "mobile")]) == 0
    rep = json.loads((tmp_path / "mobile" / "validation.json").read_text())
    assert rep["passed"] and not rep["failures"], rep["failures"]
    ran = {n: r for n, r in rep["runtimes"].items() if r["status"] == "ran"}
    assert "ort-cpu" in ran and all(r["samples"] == 64 for r in ran.values())  # 64 batches of one
    assert all(r["within_tolerance"] or r["host_limited"] for r in ran.values())
    _check_console(capsys.readouterr().out, rep)
    fz = importlib.import_module("qat_sadam.export.freeze")
    real = fz._folded
    monkeypatch.setattr(fz, "_folded", lambda layer, bn: (lambda w, s_, b: (w, s_, b + 0.5))(*real(layer, bn)))
    assert main(export + ["--runtimes", "ort-cpu", "-o", str(tmp_path / "broken")]) == 1
    rep = json.loads((tmp_path / "broken" / "validation.json").read_text())
    assert any(f.startswith("BatchNorm fold check") for f in rep["failures"]), rep["failures"]


def _check_console(out: str, rep: dict) -> None:
    """What the user reads: no field of a feature that is off (None), one sample count per report,
    and two lines about the same pair (the integer reference against ORT CPU, on the same file and
    the same samples) that agree."""
    assert "None" not in out
    report = out[out.index("validation PASSED") :]
    assert report.count("samples:") == 1 and f"samples: {rep['samples']} inputs" in report
    assert rep["parity_file"] == rep["model"]  # ORT CPU ran the same file in both lines
    top = re.search(r"torch integer reference vs ORT: max ([\d.]+) LSB", report).group(1)
    row = re.search(r"runtime ort-cpu: [^(]*\(tolerance [^)]*\) \(max ([\d.]+) LSB", report).group(1)
    assert top == row


def test_a_fixed_batch_model_runs_in_chunks_on_every_runtime(tmp_path):
    """Mobile profiles fix the batch at 1; 8 inputs run as 8 chunks, on each runtime installed."""
    torch.manual_seed(0)
    model = prepare_qat(build_model("small_cnn", 10), {"bits": 8})
    x = torch.randn(8, 3, 32, 32)
    calibrate(model, [x])
    tgt = Target(name="fixed", weight_bits_max=7, fixed_batch=1, checks=["parity"], runtimes=[])
    done = export_onnx(model.eval(), x[:1], str(tmp_path / "m.onnx"), tgt)
    float_path = export_float_onnx(model, x[:1], str(tmp_path / "f.onnx"), tgt)
    files = ModelFiles(done["path"], float_path, done["frozen"], float_model(model), x[:1].numpy(), str(tmp_path))
    with torch.no_grad():
        ref = done["integer"](x).numpy()
    ran = 0
    for name, rt in RUNTIMES.items():
        if rt.missing():
            continue
        row = measure(name, files, x.numpy(), ref, output_scale(onnx.load(done["path"])))
        assert row["status"] == "ran" and row["samples"] == 8, (name, row.get("reason"))
        ran += 1
    assert ran >= 1


def test_native_log_lines_go_to_the_runtimes_log_not_above_the_verdict(tmp_path, capfd):
    """What a native library writes on the process's file descriptors 1 and 2 (ExecuTorch's cpuinfo
    lines) lands in the log; Python's own output around the block still reaches the console."""
    log = tmp_path / "runtimes.log"
    print("before")
    with native_output_to(str(log)):
        os.write(1, b"[cpuinfo_utils.cpp:87] Failed to open midr file\n")
        os.write(2, b"native warning\n")
    print("after")
    out, err = capfd.readouterr()
    assert "cpuinfo" not in out + err and "native warning" not in out + err
    assert "before" in out and "after" in out
    assert log.read_text() == "[cpuinfo_utils.cpp:87] Failed to open midr file\nnative warning\n"


def test_host_features_decide_whether_ort_cpu_saturates():
    assert u8s8_saturates(frozenset({"avx2"}), "x86_64") and u8s8_saturates(frozenset({"avx512bw"}), "AMD64")
    assert not u8s8_saturates(frozenset({"avx2", "avx_vnni"}), "x86_64")
    assert not u8s8_saturates(frozenset({"avx512f", "avx512_vnni"}), "x86_64")
    assert not u8s8_saturates(frozenset({"asimddp"}), "aarch64")


@pytest.mark.parametrize("saturates", [True, False])
def test_ort_cpu_differences_on_a_saturating_host_are_the_hosts_not_failures(tmp_path, monkeypatch, saturates):
    """8-bit weights (|w| up to 127) on a host whose u8 x s8 kernels saturate: ORT CPU's differences go
    under HOST, the verdict stands on the other checks; on an exact host the same differences fail."""
    monkeypatch.setattr(host, "u8s8_saturates", lambda: saturates)
    full8 = Target(name="t8", checks=["parity", "accuracy"], runtimes=["ort-cpu"])
    files, x, ref, scale = _exported(tmp_path, 8, target=full8)
    shifted = ref + 3 * scale * (np.arange(ref.shape[1]) == 0)
    rep = validate(files.onnx, target=full8, inputs=[x], integer_outputs=shifted, out_dir=str(tmp_path))
    cpu = rep["runtimes"]["ort-cpu"]
    assert rep["host"]["widest_weight"] > 63 and rep["host"]["limits_ort"] is saturates
    assert not cpu["within_tolerance"] and cpu["host_limited"] is saturates
    assert (
        rep["passed"] is saturates and bool(rep["host_limited"]) is saturates and bool(rep["failures"]) is not saturates
    )
    if saturates:
        assert rep["host_limited"][0].startswith("ort-cpu: ") and "no VNNI" in rep["host"]["note"]


def test_executorch_takes_4bit_linear_weights_as_4bit_and_keeps_convs_in_int8():
    """With INT4 storage, a linear layer whose integers fit [-8, 7] is lowered as XNNPACK's 4-bit
    weights (qc4w); convs and 8-bit layers keep the int8 container (a 4-bit conv does not lower)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )
    model = prepare_qat(net, {"weight_bits": 4, "act_bits": 8})
    calibrate(model, [torch.randn(8, 3, 8, 8)])
    frozen, _ = freeze(model.eval())
    qd = torch.ops.quantized_decomposed
    ranges = {
        n.args[0].target: (n.args[4], n.args[5])
        for n in pt2e_form(frozen, int4_linear=True).graph.nodes
        if n.target == qd.dequantize_per_channel.default
    }
    # first conv and last linear 8-bit, the middle conv 4-bit values in int8, the middle linear 4-bit
    assert ranges == {"0_w": (-127, 127), "2_w": (-127, 127), "4_w": (-8, 7), "6_w": (-127, 127)}
