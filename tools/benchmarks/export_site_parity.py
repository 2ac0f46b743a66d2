"""Where do torch and ONNX Runtime part? Parity at every activation quantizer of an exported model.

For each Q/DQ site of the INT8 graph (in graph order) it reports, on CIFAR-100 test images (or a run's own test data):
- cascaded: the frozen torch graph (float QDQ semantics) vs ORT's fused integer graph, each run
  end to end, the share of the site's integers that differ and by how much;
- isolated: the same torch op fed ORT's own values at the sites before it, so only that op's
  arithmetic can differ, and how close to a rounding tie the differing values were in torch;
- the integer reference (qat_sadam.export.integer_reference) vs ORT, end to end.
Intermediate integers come from the runtime by adding each site's uint8 tensor as a graph output
(ORT CPU's fused kernels keep their output names, so its optimized graph keeps its kernels: checked
below; on every runtime the logits with the extra outputs must equal those without).
``--runtime qnn-htp`` runs both graphs on QNN's HTP simulator (CPU fallback disabled) instead;
``--run RUN_DIR`` analyses a trained run's exported checkpoint on its own test data instead of a
briefly trained model.

    QAT_SADAM_DATA=/path/to/data python tools/benchmarks/export_site_parity.py --model resnet18 --bits 4
    QAT_SADAM_DATA=/path/to/data python tools/benchmarks/export_site_parity.py --model mobilenet_v2 --bits 4 \
        --target mobile-arm --runtime qnn-htp --images 100
    QAT_SADAM_DATA=/path/to/data python tools/benchmarks/export_site_parity.py --run
    runs/finetune/mobilenet_v2/qat-w4-s0 \
        --target mobile-arm --runtime qnn-htp --images 100
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(__file__))
from export_acceptance import CASES, briefly_trained, cifar100  # noqa: E402

from qat_sadam.export import (
    export_onnx,  # noqa: E402
    ort_session,  # noqa: E402
)
from qat_sadam.export.qdq import QuantDequant  # noqa: E402
from qat_sadam.export.runtimes.qnn_htp import fixed_batch_copy, qnn_session  # noqa: E402
from qat_sadam.train.model import load_run  # noqa: E402
from qat_sadam.workflows.export_run import test_batches  # noqa: E402


def _with_site_outputs(path: str, out: str) -> list[str]:
    """Add the uint8 input of every activation DequantizeLinear as a graph output; returns their names.
    A sub-8-bit range is Q -> DQ -> Min -> Q -> DQ: its site is the second Q (the bounded one)."""
    m = onnx.load(path)
    quantized = {o for n in m.graph.node if n.op_type in ("QuantizeLinear", "Clip") for o in n.output}
    consumers = collections.defaultdict(list)
    for n in m.graph.node:
        for i in n.input:
            consumers[i].append(n.op_type)
    sites = [
        n.input[0]
        for n in m.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized and consumers[n.output[0]] != ["Min"]
    ]
    m.graph.output.extend(onnx.helper.make_tensor_value_info(s, onnx.TensorProto.UINT8, None) for s in sites)
    onnx.save(m, out)
    return sites


def _integers(q: QuantDequant, y: torch.Tensor) -> torch.Tensor:
    return torch.round(y / q.scale + q.zero_point.float())


def _torch_sites(frozen, x, ort_sites=None):
    """Each QuantDequant call's integers and distance of its pre-rounding value to a tie; with
    ``ort_sites`` every site's output is replaced by ORT's (isolation)."""
    recs = []

    def hook(m, inp, out):
        pre = inp[0] / m.scale + m.zero_point.float()
        tie = (pre - torch.floor(pre) - 0.5).abs() if ort_sites is not None else None  # memory: isolated pass only
        recs.append((_integers(m, out).to(torch.int16), tie))
        if ort_sites is not None:
            o = torch.from_numpy(ort_sites[len(recs) - 1].astype(np.float32)).reshape(out.shape)
            return (o - m.zero_point.float()) * m.scale

    hooks = [m.register_forward_hook(hook) for m in frozen.modules() if isinstance(m, QuantDequant)]
    with torch.no_grad():
        frozen(x)
    for h in hooks:
        h.remove()
    return recs


def _run(sess, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """The outputs ``names`` of ``sess`` on ``x``, in chunks of the session's batch when it is fixed."""
    batch = sess.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(x)
    runs = [sess.run(names, {sess.get_inputs()[0].name: x[i : i + step]}) for i in range(0, len(x), step)]
    return [np.concatenate(outs) for outs in zip(*runs)]


def _sessions(runtime: str, plain_path: str, sites_path: str, tmp: str):
    """(plain, probed) sessions; on ORT CPU, checks that the site outputs leave its kernels alone."""
    if runtime == "qnn-htp":
        return qnn_session(fixed_batch_copy(plain_path, tmp)), qnn_session(fixed_batch_copy(sites_path, tmp))
    plain = ort_session(plain_path, optimized_path=os.path.join(tmp, "opt_plain.onnx"))
    probed = ort_session(sites_path, optimized_path=os.path.join(tmp, "opt_sites.onnx"))
    # Extra outputs add layout Transposes (NHWC kernels back to NCHW outputs) and may keep a Q/DQ pair
    # that fed a fused kernel; the kernels themselves stay.
    kept = {"Transpose", "QuantizeLinear", "DequantizeLinear"}
    ops = [
        collections.Counter(n.op_type for n in onnx.load(os.path.join(tmp, f)).graph.node if n.op_type not in kept)
        for f in ("opt_plain.onnx", "opt_sites.onnx")
    ]
    assert ops[0] == ops[1], f"site outputs changed ORT's fusion: {ops}"
    print(f"optimized ORT graph: {dict(ops[0])}")
    return plain, probed


def _trained(run: str, images: int):
    """(the run's exported checkpoint as a model in eval mode, its first ``images`` test images, a description)."""
    loaded = load_run(run)
    x = torch.cat([x for x, _ in test_batches(loaded.recipe, loaded.info, images, 100)])
    return loaded.model, x, f"{run} ({os.path.basename(loaded.checkpoint)})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", choices=sorted({c[0] for c in CASES}))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--target", default="cpu-x86-vnni")
    ap.add_argument("--runtime", default="ort-cpu", choices=("ort-cpu", "qnn-htp"))
    ap.add_argument("--run", help="a trained run directory (its model and test data; --model/--bits/--steps unused)")
    a = ap.parse_args()
    if a.run:
        model, x, what = _trained(a.run, a.images)
    else:
        train, test, _ = cifar100(a.images)
        x = torch.cat(test)
        model = briefly_trained(a.model, a.bits, next(c[2] for c in CASES if c[0] == a.model), train, a.steps)
        what = f"{a.model} W{a.bits}A{a.bits}, {a.steps} AdamW steps, CIFAR-100"
    tmp = tempfile.mkdtemp()
    done = export_onnx(model, x[:1], os.path.join(tmp, "m.onnx"), a.target)
    sites = _with_site_outputs(done["path"], os.path.join(tmp, "sites.onnx"))
    plain, probed = _sessions(a.runtime, done["path"], os.path.join(tmp, "sites.onnx"), tmp)
    out_name = plain.get_outputs()[0].name
    ort_out = _run(probed, x.numpy(), [out_name, *sites])
    logits, ort_sites = ort_out[0], ort_out[1:]
    assert np.array_equal(logits, _run(plain, x.numpy(), [out_name])[0]), (
        "the site outputs changed the runtime's logits"
    )
    cascaded, isolated = _torch_sites(done["frozen"], x), _torch_sites(done["frozen"], x, ort_sites)
    assert len(cascaded) == len(sites), f"{len(cascaded)} quantizers in torch, {len(sites)} sites in the graph"
    with torch.no_grad():
        frozen_logits, int_logits = done["frozen"](x).numpy(), done["integer"](x).numpy()
    print(f"\n{what}, {len(x)} test images, target {a.target}, runtime {a.runtime}\n")
    print(
        "| # | site | cascaded: share differing | cascaded: max LSB | isolated: share differing | isolated: max LSB | "
        "isolated: max distance to a tie | integers: torch / runtime |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i, (name, o, (ct, _), (it, near)) in enumerate(zip(sites, ort_sites, cascaded, isolated)):
        o = torch.from_numpy(o.astype(np.int16)).reshape(ct.shape)
        dc, di = (ct - o).abs(), (it - o).abs()
        tie = f"{float(near[di > 0].max()):.1e}" if (di > 0).any() else "-"
        print(
            f"| {i} | {name.split('/')[1] if '/' in name else name} | {float((dc > 0).float().mean()):.2e} | "
            f"{int(dc.max())} | "
            f"{float((di > 0).float().mean()):.2e} | {int(di.max())} | {tie} | "
            f"{int(ct.min())}..{int(ct.max())} / {int(o.min())}..{int(o.max())} |"
        )
    top1 = lambda r: 100 * float((r.argmax(1) == logits.argmax(1)).mean())  # noqa: E731
    print(
        f"\ntop-1 agreement with {a.runtime}: frozen graph (float QDQ) {top1(frozen_logits):.1f}%, integer reference "
        f"{top1(int_logits):.1f}% (max |diff| {np.abs(int_logits - logits).max():.3g})"
    )


if __name__ == "__main__":
    main()
