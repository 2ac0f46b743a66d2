"""The peers side by side (docs/studies/peers.md): ORT quantize_static PTQ, torchao PT2E PTQ and QAT
(X86InductorQuantizer, deployed with torch.compile), and qat-sadam's PTQ and QAT, from the same
float checkpoint, on the same data, with the same fine-tune steps and optimizer (AdamW at the
fine-tune recipe's lr; no lr tuning for anyone), W8A8.

    QAT_SADAM_DATA=/path/to/data python tools/benchmarks/bench_peers.py \
        --recipe resnet18_finetune --ours runs/finetune/resnet18 --out docs/studies/peers/resnet18

``--ours`` holds the fine-tune study's runs (tools/studies/finetune_study.sh): ptq-w8-s0 and qat-w8-s0
(AdamW); qat-w8-sadam-s0 (S-Adam defaults) is trained here if absent. Their INT8 accuracy is ORT's,
read from their validation reports. Step costs are measured in this process, interleaved round by
round (float step, our QAT step, our S-Adam step, PT2E QAT step); latencies likewise, each INT8
model against the float model on the same runtime. OUT gets rows.json and table.md. ``--arm`` adds
ArmInductorQuantizer's PTQ and QAT rows to an existing OUT (accuracy and step cost; no latency on x86);
``--latency`` measures the ORT rows' latencies again (all against one float model, interleaved).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torchao.quantization.pt2e import move_exported_model_to_eval
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer.arm_inductor_quantizer import (
    ArmInductorQuantizer,
    get_default_arm_inductor_quantization_config,
)
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)
from tqdm import tqdm

from qat_sadam.export import ort_session
from qat_sadam.export.validate import fusion
from qat_sadam.optim import loss_closure
from qat_sadam.quant import calibrate
from qat_sadam.train.data import Loader, load_data
from qat_sadam.train.model import build_float_model, quantize_model
from qat_sadam.train.optimizers import build_optimizer
from qat_sadam.train.recipe import load_recipe


def _loaders(recipe):
    data = load_data(recipe.data)
    info = {
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "mean": list(data.mean),
        "std": list(data.std),
    }
    aug = recipe.data.augment
    bs = recipe.data.batch_size
    train = Loader(
        data.train,
        bs,
        data.mean,
        data.std,
        shuffle=True,
        seed=recipe.seed,
        crop_padding=aug.crop_padding,
        flip=aug.flip,
    )
    calib = Loader(data.train, bs, data.mean, data.std, shuffle=True, seed=recipe.seed)
    test = Loader(data.test, 256, data.mean, data.std, shuffle=False)
    return info, train, calib, test


def _accuracy(fn, test) -> float:
    hits = n = 0
    with torch.no_grad():
        for x, y in test.batches():
            hits += int((fn(x).argmax(1) == y).sum())
            n += len(y)
    return hits / n


def _median_ms(fns: dict, x, rounds=5, iters=5) -> dict:
    """Median ms per call of each function, interleaved round by round."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f(x)
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                f(x)
            times[k].append(1000 * (time.perf_counter() - t0) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def _ort(path):
    s = ort_session(path)
    return lambda x: torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


# -- ORT quantize_static ---------------------------------------------------------------------------


class _Reader(CalibrationDataReader):
    def __init__(self, batches):
        self.it = iter([{"input": x.numpy()} for x in batches])

    def get_next(self):
        return next(self.it, None)


ONNX_NAMES = {
    "input_names": ["input"],
    "output_names": ["logits"],
    "dynamic_axes": {"input": {0: "b"}, "logits": {0: "b"}},
}


def float_onnx(float_model, example, path: str) -> str:
    """The float model as ONNX (the size and latency denominator), written once."""
    if not os.path.isfile(path):
        torch.onnx.export(float_model.eval(), (example,), path, dynamo=False, opset_version=17, **ONNX_NAMES)
    return path


def ort_ptq(float_model, calib_batches, example, work) -> dict:
    fpath, qpath = os.path.join(work, "float.onnx"), os.path.join(work, "ort_static.onnx")
    float_onnx(float_model, example, fpath)
    quantize_static(
        fpath,
        qpath,
        _Reader(calib_batches),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return {"float_path": fpath, "path": qpath}


# -- torchao PT2E ----------------------------------------------------------------------------------

# x86: u8 activations, per-channel s8 weights, inductor's x86 int8 kernels. arm: s8 activations,
# per-tensor s8 weights (its QAT supports nothing else), for inductor on Arm CPUs.
QUANTIZERS = {
    "x86": (X86InductorQuantizer, get_default_x86_inductor_quantization_config),
    "arm": (ArmInductorQuantizer, get_default_arm_inductor_quantization_config),
}


def _quantizer(is_qat: bool, kind: str = "x86"):
    cls, config = QUANTIZERS[kind]
    return cls().set_global(config(is_qat=is_qat))


def _export(model, example):
    """torch.export with a dynamic batch dimension (PT2E's graphs are otherwise fixed to the example),
    as a module whose ReLU calls are separate source partitions (_one_partition_per_relu_call)."""
    ep = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    return _one_partition_per_relu_call(ep.module())


def _one_partition_per_relu_call(gm):
    """torchvision's BasicBlock calls its one self.relu twice. PT2E's source partitions group both
    calls under the module's name, and X86InductorQuantizer's conv + add + relu matcher refuses the
    two-output partition ("Input partition has more than one output node", torchao 0.18). Each
    ReLU call gets its own module name in the metadata the partitions are read from (torch.export's
    nn_module_stack); the graph and its arithmetic are untouched."""
    relu = f"{torch.nn.ReLU.__module__}.{torch.nn.ReLU.__qualname__}"
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            key, (fqn, cls) = next(reversed(stack.items()))
            if cls in (torch.nn.ReLU, relu):
                stack[key] = (f"{fqn}.{n.name}", cls)
    return gm


def pt2e_ptq(float_model, calib_batches, example, kind: str = "x86"):
    m = _export(copy.deepcopy(float_model).eval(), example)
    m = prepare_pt2e(m, _quantizer(False, kind))
    with torch.no_grad():
        for x in calib_batches:
            m(x)
    return convert_pt2e(m)


def pt2e_qat_model(float_model, example, kind: str = "x86"):
    m = _export(copy.deepcopy(float_model).train(), example)
    return prepare_qat_pt2e(m, _quantizer(True, kind))


def _compiled(model):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # the X86 int8 path: weights folded and prepacked as constants
    return torch.compile(
        model, dynamic=False
    )  # one graph per batch size: the int8 conv lowering fails with symbolic batch


# -- training steps --------------------------------------------------------------------------------


def _stepper(model, recipe, optimizer_name=None):
    opt_cfg = dict(recipe.optimizer) if optimizer_name is None else {**recipe.optimizer, "name": optimizer_name}
    if optimizer_name == "sadam":
        opt_cfg = {k: v for k, v in opt_cfg.items() if k in ("name", "lr", "weight_decay")}
    opt = build_optimizer(opt_cfg, model, seed=recipe.seed, probe_buffers=list(model.buffers()))

    def step(batch):
        x, y = batch
        return opt.step(loss_closure(opt, lambda: F.cross_entropy(model(x), y)))

    return step, opt


def fine_tune_steps(recipe, train) -> int:
    """The recipe's epochs of ``train``, or its max_steps where fewer: the steps our trainer takes."""
    steps = recipe.epochs * len(train)
    return min(steps, recipe.max_steps) if recipe.max_steps else steps


def fine_tune(model, recipe, train, steps: int, desc: str) -> None:
    """The fine-tune every peer gets: AdamW at the recipe's lr, cosine schedule, the recipe's batches."""
    step, opt = _stepper(model, recipe, "adamw")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    done = 0
    with tqdm(total=steps, desc=desc) as bar:
        for epoch in range(10**6):
            for batch in train.batches(epoch):
                step(batch)
                sched.step()
                done += 1
                bar.update()
                if done == steps:
                    return


def _interleaved(steppers: dict, batch, rounds: int) -> dict:
    """Median s per training step of each stepper, blocks of 8 steps interleaved round by round
    (S-Adam probes one step in 8: a block covers its cycle); ratios to the "float" stepper."""
    times = {k: [] for k in steppers}
    for _ in range(rounds):
        for k, s in steppers.items():
            t0 = time.perf_counter()
            for _ in range(8):
                s(batch)
            times[k].append((time.perf_counter() - t0) / 8)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {k: {"s_per_step": v, "over_float": v / med["float"]} for k, v in med.items()}


def step_costs(recipe, float_model, train, rounds: int) -> dict:
    """Float, our QAT (AdamW), our QAT (S-Adam), PT2E QAT (x86), interleaved."""
    batch = next(iter(train.batches(0)))
    ours = quantize_model(recipe, copy.deepcopy(float_model))
    calibrate(ours, [batch[0]])
    ours_sadam = copy.deepcopy(ours)
    pt2e = pt2e_qat_model(float_model, batch[0][:2])
    fm = copy.deepcopy(float_model).train()
    return _interleaved(
        {
            "float": _stepper(fm, recipe, "adamw")[0],
            "ours_adamw": _stepper(ours.train(), recipe, "adamw")[0],
            "ours_sadam": _stepper(ours_sadam.train(), recipe, "sadam")[0],
            "pt2e_qat": _stepper(pt2e, recipe, "adamw")[0],
        },
        batch,
        rounds,
    )


def arm_rows(recipe, float_model, calib_batches, example, train, test, steps: int, rounds: int) -> dict:
    """ArmInductorQuantizer's PTQ and QAT (same steps and optimizer as the x86 rows). Its int8 kernels
    are inductor's Arm lowering, which this x86 host cannot run: accuracy is that of the converted
    model run eagerly (quantize/dequantize in float, PT2E's reference), and there is no latency."""
    qat = pt2e_qat_model(float_model, example, "arm")
    fine_tune(qat, recipe, train, steps, "PT2E QAT fine-tune")
    models = {
        "torchao_pt2e_arm_ptq": pt2e_ptq(float_model, calib_batches, example, "arm"),
        "torchao_pt2e_arm_qat": convert_pt2e(move_exported_model_to_eval(qat)),
    }
    rows = {
        key: {
            "int8_acc": _accuracy(m, test),
            "runtime": "eager PT2E reference (Arm int8 kernels need an Arm CPU)",
            "latency": None,
            "size_over_float": None,
            "checked": "no: the eager reference is the only arithmetic run",
        }
        for key, m in models.items()
    }
    batch = next(iter(train.batches(0)))
    rows["step_cost_arm"] = _interleaved(
        {
            "float": _stepper(copy.deepcopy(float_model).train(), recipe, "adamw")[0],
            "pt2e_arm_qat": _stepper(pt2e_qat_model(float_model, batch[0][:2], "arm"), recipe, "adamw")[0],
        },
        batch,
        rounds,
    )
    return rows


# -- ours ------------------------------------------------------------------------------------------


def _ours_row(run: str) -> dict:
    rep = json.load(open(os.path.join(run, "export", "validation.json")))
    p = rep["parity"]["torch_integer_vs_ort"]
    return {
        "int8_acc": rep["accuracy"]["deployed"],
        "onnx": os.path.join(run, "export", "model.onnx"),
        "float_onnx": os.path.join(run, "export", "float.onnx"),
        "checked": f"yes: integer reference vs ORT max {p['max_lsb']:.0f} LSB, top-1 {100 * p['top1_agreement']:.1f}%",
    }


def _ensure_sadam_run(recipe_path: str, ours: str) -> str:
    run = os.path.join(ours, "qat-w8-sadam-s0")
    if not os.path.isfile(os.path.join(run, "export", "validation.json")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "qat_sadam",
                "train",
                recipe_path,
                "--bits",
                "8",
                "--optimizer",
                "sadam",
                "--seed",
                "0",
                "--out",
                run,
                "--force",
                "--quiet",
            ],
            check=True,
        )
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True)
    p.add_argument(
        "--ours", required=True, help="directory with ptq-w8-s0 and qat-w8-s0 (tools/studies/finetune_study.sh)"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--cost-rounds", type=int, default=3)
    p.add_argument(
        "--arm", action="store_true", help="add ArmInductorQuantizer's rows to OUT/rows.json, keeping the others"
    )
    p.add_argument(
        "--latency", action="store_true", help="measure the ORT rows' latencies of OUT/rows.json again, nothing else"
    )
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    work = os.path.join("runs", "peers", os.path.basename(os.path.normpath(a.out)))
    os.makedirs(work, exist_ok=True)
    recipe = load_recipe(a.recipe, bits=8)
    torch.manual_seed(recipe.seed)
    info, train, calib, test = _loaders(recipe)
    float_model, _ = build_float_model(recipe, info)
    float_model.eval()
    calib_batches = [x for x, _ in list(calib.batches(0))[: recipe.calibration_batches]]
    steps = fine_tune_steps(recipe, train)
    example = calib_batches[0][:2]  # batch 2: a batch of 1 would specialise the dynamic dimension
    x1, x32 = example, calib_batches[0][:32]
    if a.arm or a.latency:
        rows = json.load(open(os.path.join(a.out, "rows.json")))
        if a.arm:
            rows.update(arm_rows(recipe, float_model, calib_batches, example, train, test, steps, a.cost_rounds))
        if a.latency:
            ort_latencies(rows, x1, x32, work)
        return _write(rows, a.out)
    rows = {"float": {"float_acc": _accuracy(float_model, test)}}
    print(f"float accuracy {rows['float']['float_acc']:.4f}; fine-tune steps {steps}")

    # ORT quantize_static
    o = ort_ptq(float_model, calib_batches, example, work)
    rows["ort_quantize_static_ptq"] = {
        "int8_acc": _accuracy(_ort(o["path"]), test),
        "onnx": o["path"],
        "float_onnx": o["float_path"],
        "checked": "no: ORT is its own reference",
    }
    # ours
    sadam_run = _ensure_sadam_run(a.recipe, a.ours)
    for key, run in (
        ("qat_sadam_ptq", "ptq-w8-s0"),
        ("qat_sadam_qat_adamw", "qat-w8-s0"),
        ("qat_sadam_qat_sadam", sadam_run),
    ):
        rows[key] = _ours_row(os.path.join(a.ours, run) if key != "qat_sadam_qat_sadam" else run)
    ort_latencies(rows, x1, x32, work)

    # torchao PT2E: PTQ, then QAT with the same steps
    fcomp = _compiled(copy.deepcopy(float_model).eval())
    for key, model in (("torchao_pt2e_ptq", pt2e_ptq(float_model, calib_batches, example)), ("torchao_pt2e_qat", None)):
        if model is None:
            qat = pt2e_qat_model(float_model, example)
            fine_tune(qat, recipe, train, steps, "PT2E QAT fine-tune")
            model = convert_pt2e(move_exported_model_to_eval(qat))
        with torch.no_grad():
            comp = _compiled(model)
            acc = _accuracy(comp, test)
            eager_acc = _accuracy(model, test)
            xs = torch.cat([x for x, _ in list(test.batches())[:2]])
            a_, b_ = comp(xs), model(xs)
            agree = float((a_.argmax(1) == b_.argmax(1)).float().mean())
            lat = {f"batch{b}": _median_ms({"float": fcomp, "int8": comp}, x) for b, x in ((1, x1), (32, x32))}
        rows[key] = {
            "int8_acc": acc,
            "eager_reference_acc": eager_acc,
            "runtime": "torch.compile (inductor, x86 int8)",
            "latency": {b: {**v, "int8_over_float": v["int8"] / v["float"]} for b, v in lat.items()},
            # the converted model keeps float weights with quantize/dequantize nodes; the int8
            # weights exist only inside the compiled, frozen graph: no INT8 file to measure
            "size_over_float": None,
            "checked": f"no (torchao checks nothing); measured here: compiled vs eager reference top-1 "
            f"agreement {100 * agree:.1f}%, max |logit diff| {float((a_ - b_).abs().max()):.3g}",
        }
    rows["step_cost"] = step_costs(recipe, float_model, train, a.cost_rounds)
    _write(rows, a.out)


def ort_latencies(rows: dict, x1, x32, work: str) -> None:
    """Every ORT INT8 model and ORT's float model in one interleaved measurement per batch size, so that
    all rows share one float denominator (float speed does not depend on the weights); with each
    row, the op histogram of ORT's optimized graph (what runs)."""
    keys = [k for k in rows if "onnx" in rows[k]]
    sessions = {
        "float": _ort(rows["ort_quantize_static_ptq"]["float_onnx"]),
        **{k: _ort(rows[k]["onnx"]) for k in keys},
    }
    med = {b: _median_ms(sessions, x) for b, x in (("batch1", x1), ("batch32", x32))}
    for key in keys:
        r = rows[key]
        r["latency"] = {
            b: {"float": m["float"], "int8": m[key], "int8_over_float": m[key] / m["float"]} for b, m in med.items()
        }
        r["size_over_float"] = os.path.getsize(r["onnx"]) / os.path.getsize(r["float_onnx"])
        r["runtime"] = "ORT CPU"
        r["optimized_ops"] = fusion(r["onnx"], work)["optimized_ops"]


def _write(rows: dict, out: str) -> None:
    json.dump(rows, open(os.path.join(out, "rows.json"), "w"), indent=2)
    write_table(rows, os.path.join(out, "table.md"))
    print(open(os.path.join(out, "table.md")).read())


# row -> (name, its step-cost block and key)
NAMES = {
    "ort_quantize_static_ptq": ("ORT quantize_static (PTQ)", None),
    "torchao_pt2e_ptq": ("torchao PT2E PTQ", None),
    "torchao_pt2e_qat": ("torchao PT2E QAT (AdamW)", ("step_cost", "pt2e_qat")),
    "torchao_pt2e_arm_ptq": ("torchao PT2E PTQ, ArmInductorQuantizer", None),
    "torchao_pt2e_arm_qat": ("torchao PT2E QAT (AdamW), ArmInductorQuantizer", ("step_cost_arm", "pt2e_arm_qat")),
    "qat_sadam_ptq": ("qat-sadam PTQ", None),
    "qat_sadam_qat_adamw": ("qat-sadam QAT (AdamW)", ("step_cost", "ours_adamw")),
    "qat_sadam_qat_sadam": ("qat-sadam QAT (S-Adam defaults)", ("step_cost", "ours_sadam")),
}


def _latency(r: dict, batch: str) -> str:
    return "n/a" if r["latency"] is None else f"{r['latency'][batch]['int8_over_float']:.2f}"


def write_table(rows: dict, path: str) -> None:
    f = rows["float"]["float_acc"]
    L = [
        f"Float accuracy {100 * f:.2f}%.",
        "",
        "| method | INT8 acc | vs float | step cost / float step | runtime | latency b1 INT8/float | latency b32 "
        "INT8/float "
        "| size INT8/float | checked against a reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, (name, cost_key) in NAMES.items():
        if key not in rows:
            continue
        r = rows[key]
        cost = f"{rows[cost_key[0]][cost_key[1]]['over_float']:.2f}x" if cost_key else "- (no training)"
        L.append(
            f"| {name} | {100 * r['int8_acc']:.2f}% | {100 * (r['int8_acc'] - f):+.2f} | {cost} | {r['runtime']} | "
            f"{_latency(r, 'batch1')} | {_latency(r, 'batch32')} | "
            f"{'n/a (no INT8 file)' if r['size_over_float'] is None else format(r['size_over_float'], '.3f')} | "
            f"{r['checked']} |"
        )
    graphs = {NAMES[k][0]: rows[k]["optimized_ops"] for k in NAMES if "optimized_ops" in rows.get(k, {})}
    for i, (name, ops) in enumerate(graphs.items()):
        same = [n for n in list(graphs)[:i] if graphs[n] == ops]
        L.append(
            ("" if i else "\nORT's optimized graphs (what runs):\n")
            + f"- {name}: "
            + (f"the same op histogram as {same[0]}" if same else ", ".join(f"{c} {o}" for o, c in ops.items()))
        )
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
