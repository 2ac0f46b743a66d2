"""qat-sadam against the QAT toolkits users pick instead (docs/studies/peers.md): Brevitas, NNCF and
AIMET (tools/benchmarks/peer_toolkits.py), from the same float checkpoint, on the same data, with the
same calibration batches and the same fine-tune (the recipe's epochs of AdamW at the recipe's lr, a
cosine schedule, the same batches in the same order; no lr tuned for anyone).

    QAT_SADAM_DATA=/path/to/data python tools/benchmarks/bench_toolkits.py \
        --recipe mobilenet_v2_finetune --bits W4A8 --seeds 0 1 2 --out docs/studies/peers/mobilenet_v2

Per toolkit and seed: PTQ accuracy (its best PTQ), QAT accuracy (its simulated model), the file its
export writes, that file on our runtimes (accuracy, top-1 agreement and largest logit difference with
the toolkit's own simulated model on ``--samples`` test images, and whether the convolutions ran as
integer kernels), and the file's size over the float ONNX file. Ours: ``qat-sadam train`` with
``--bits`` and ``qat-sadam export --runtimes`` on the same runtimes, in subprocesses (the user's path).
``--no-runtimes`` (extra seeds) measures QAT accuracy alone. ``--cost`` times one QAT step of each
toolkit and ours against float steps, interleaved in one process per toolkit (``--seeds`` with no
value: the costs alone). Each toolkit runs in its own process. Rows accumulate in OUT/toolkits.json
(a cell run again replaces its row); OUT/toolkits.md is the table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import onnx
import torch
from bench_peers import _accuracy, _interleaved, _loaders, _stepper, fine_tune, fine_tune_steps, float_onnx
from peer_toolkits import TOOLKITS, Bits
from torch import nn

from qat_sadam.export.host import host_limits
from qat_sadam.export.runtimes import RUNTIMES, ModelFiles
from qat_sadam.export.validate import fusion
from qat_sadam.quant import calibrate
from qat_sadam.train.model import build_float_model, quantize_model
from qat_sadam.train.recipe import load_recipe, parse_bits

OUR_RUNTIMES = ("ort-cpu", "qnn-htp", "openvino")


class Logits(nn.Module):
    """A toolkit's simulated model as a plain logits module (Brevitas returns QuantTensors)."""

    def __init__(self, toolkit, sim):
        super().__init__()
        self.toolkit, self.sim = toolkit, sim

    def forward(self, x):
        return self.toolkit.forward(self.sim, x)


def _file_bytes(path: str) -> int:
    """The deployed bytes: an OpenVINO IR is its .xml and .bin."""
    side = os.path.splitext(path)[0] + ".bin"
    return os.path.getsize(path) + (os.path.getsize(side) if path.endswith(".xml") else 0)


def _integer_kernels(rt: str, path: str, session, work: str) -> str:
    """Whether the convolutions ran as integer kernels, read from what the runtime executed."""
    if rt == "ort-cpu":
        f = fusion(path, work)
        left = ", ".join(f"{c} {o}" for o, c in f["float_compute_left"].items())
        return "yes" if f["ok"] else f"no: {left} left in float beside {f['integer_kernels']} integer kernels"
    if rt == "openvino":
        return openvino_kernels(session.details["executed_layers"])
    return "yes: all nodes on HTP (CPU fallback disabled)"


def openvino_kernels(layers: dict) -> str:
    """How many of the convolutions and fully connected layers OpenVINO ran in integer precision."""
    compute = {k: v for k, v in layers.items() if k.split(":")[0] in ("Convolution", "FullyConnected")}
    floats = sum(v for k, v in compute.items() if k.endswith(":f32"))
    total = sum(compute.values())
    return f"{total - floats} of {total} conv/FC layers" + (f" ({floats} in f32)" if floats else "")


def on_runtimes(model_fn, path: str, names, x: np.ndarray, y: np.ndarray, work: str) -> dict:
    """The file on each runtime: accuracy, top-1 agreement and largest logit difference with
    ``model_fn`` (the toolkit's simulated model) on the same images, and the kernels it ran."""
    with torch.no_grad():
        ref = model_fn(torch.from_numpy(x)).numpy()
    out = {}
    for name in names:
        rt = RUNTIMES[name]
        try:
            s = rt.load(ModelFiles(onnx=path, work_dir=work))
            got = s.run(x)
        except Exception as e:  # a runtime that refuses the file is a row with its error
            out[name] = {"status": "failed", "error": str(e).strip().splitlines()[0][:300]}
            continue
        out[name] = {
            "status": "ran",
            "accuracy": float((got.argmax(1) == y).mean()),
            "top1_agreement_with_sim": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(got - ref).max()),
            "integer_kernels": _integer_kernels(name, path, s, work),
            "host_limited": name == "ort-cpu" and host_limits(onnx.load(path))["limits_ort"],
            "executed_layers": s.details.get("executed_layers"),
        }
    return out


def _sample(test, n: int):
    xs, ys = zip(*test.batches())
    return torch.cat(xs)[:n].numpy(), torch.cat(ys)[:n].numpy()


def toolkit_cell(
    tk, recipe, bits: Bits, seed: int, float_model, calib, example, train, test, samples, work, save, runtimes=True
) -> dict:
    os.makedirs(work, exist_ok=True)
    # extra seeds (runtimes=False) measure QAT alone: the PTQ, the file and its runtimes are seed 0's
    ptq = Logits(tk, tk.ptq(float_model, calib, example, bits, work)) if runtimes else None
    torch.manual_seed(seed)
    qat = Logits(tk, tk.qat_start(float_model, calib, example, bits))
    start_acc = _accuracy(qat.eval(), test)
    fine_tune(qat.train(), recipe, train, fine_tune_steps(recipe, train), f"{tk.name} {bits.name} QAT")
    qat.eval()
    row = {
        "toolkit": tk.name,
        "version": tk.version,
        "bits": bits.name,
        "seed": seed,
        "ptq_method": tk.ptq_method,
        "first_last_8bit_weights": tk.first_last_8bit,
        **({"ptq_acc": _accuracy(ptq.eval(), test)} if ptq else {}),
        "qat_start_acc": start_acc,
        "qat_acc": _accuracy(qat, test),
        "file_kind": tk.file_kind,
    }
    if runtimes:
        save(row)  # the accuracies survive a runtime that crashes the process (a native fault in one did)
        path = tk.export(qat.sim, example, os.path.join(work, f"{tk.name}.onnx"))
        x, y = _sample(test, samples)
        row["file"] = path
        row["size_over_float"] = _file_bytes(path) / os.path.getsize(os.path.join(os.path.dirname(work), "float.onnx"))
        row["runtimes"] = on_runtimes(
            qat, path, [r.replace("openvino-ir", "openvino") for r in tk.runtimes], x, y, work
        )
    return row


def failing_cell(cell, tk, recipe, bits: Bits, seed: int, *args) -> dict:
    """``cell``'s row, or where the toolkit fails on the model a row with its error (one line)."""
    try:
        return cell(tk, recipe, bits, seed, *args)
    except Exception as e:  # the toolkit's own exception types; the row keeps its message
        text = str(e).strip()
        return {
            "toolkit": tk.name,
            "version": tk.version,
            "bits": bits.name,
            "seed": seed,
            "file_kind": tk.file_kind,
            "error": f"{type(e).__name__}: {' '.join(text.split())[:300]}",
        }


def _qat_sadam(*args: str, report: str) -> None:
    """Run the CLI; exit 1 is a validation that failed (a result, its report written), anything else an error."""
    rc = subprocess.run([sys.executable, "-m", "qat_sadam", *args], stdout=subprocess.DEVNULL).returncode
    if rc not in (0, 1) or not os.path.isfile(report):
        raise RuntimeError(f"qat-sadam {' '.join(args)} exited {rc} without {report}")


def ours_cell(
    recipe_name: str, bits: Bits, seed: int, float_model, test, samples, work, runtimes=True, sets=()
) -> dict:
    """Ours as a user runs it: train (PTQ, QAT, export and validation), then the runtimes."""
    run = os.path.join(work, "run")
    if not os.path.isfile(os.path.join(run, "export", "validation.json")):
        _qat_sadam(
            "train",
            recipe_name,
            *("--bits", bits.name, "--seed", str(seed), "--out", run, "--force", "--quiet"),
            *(a for s in sets for a in ("--set", s)),
            report=os.path.join(run, "export", "validation.json"),
        )
    summary = json.load(open(os.path.join(run, "summary.json")))
    deployed = json.load(open(os.path.join(run, "export", "validation.json")))["accuracy"]["deployed"]
    row = {
        "toolkit": "qat-sadam",
        "bits": bits.name,
        "seed": seed,
        "ptq_method": "calibration + BN re-estimation",
        "first_last_8bit_weights": True,
        "ptq_acc": summary["ptq_acc"],
        "qat_acc": summary["qat_acc"],
        "deployed_acc": deployed,
        "file_kind": "QDQ ONNX (integer graph), checked against our integer reference",
    }
    if not runtimes:
        return row
    rts = os.path.join(run, "export-runtimes")
    if not os.path.isfile(os.path.join(rts, "validation.json")):
        # 8-bit activations: the qnn-htp profile (opset 21, 4-bit weights stored as INT4, as AIMET writes them)
        target = ["--target", "qnn-htp"] if bits.a == 8 else []
        _qat_sadam(
            "export",
            run,
            *target,
            *("--runtimes", ",".join(OUR_RUNTIMES), "-o", rts, "--samples", str(samples)),
            report=os.path.join(rts, "validation.json"),
        )
    rep = json.load(open(os.path.join(rts, "validation.json")))
    path = rep["int4_model"] or rep["model"]
    return {
        **row,
        "file": path,
        "size_over_float": os.path.getsize(path) / os.path.getsize(os.path.join(os.path.dirname(work), "float.onnx")),
        "runtimes": {
            n: {
                "status": r["status"],
                **(
                    {
                        "accuracy": r["accuracy"],
                        "top1_agreement_with_sim": r["parity"]["top1_agreement"],
                        "max_lsb_vs_integer_reference": r["parity"]["max_lsb"],
                        "host_limited": r["host_limited"],
                        "executed_layers": r["details"].get("executed_layers"),
                        **(
                            {"integer_kernels": openvino_kernels(r["details"]["executed_layers"])}
                            if n == "openvino"
                            else {}
                        ),
                    }
                    if r["status"] == "ran"
                    else {"error": r.get("reason", r.get("error", ""))}
                ),
            }
            for n, r in rep["runtimes"].items()
        },
    }


def step_costs(recipe, bits: Bits, name: str, float_model, calib, example, train, rounds: int) -> dict:
    """One QAT step of ``name`` (ours or a toolkit) against a float step, blocks of 8 interleaved."""
    batch = next(iter(train.batches(0)))
    if name == "qat-sadam":
        model = quantize_model(recipe, copy.deepcopy(float_model))
        calibrate(model, [batch[0]])
    else:
        tk = TOOLKITS[name]()
        model = Logits(tk, tk.qat_start(float_model, calib, example, bits))
    steppers = {
        "float": _stepper(copy.deepcopy(float_model).train(), recipe, "adamw")[0],
        name: _stepper(model.train(), recipe, "adamw")[0],
    }
    return _interleaved(steppers, batch, rounds)[name]


def write_table(rows: list[dict], costs: dict, path: str) -> None:
    cells = {}
    for r in rows:
        cells.setdefault((r["bits"], r["toolkit"]), []).append(r)
    L = [
        "| bits | toolkit | seeds | PTQ acc | QAT acc | file | size / float | ORT CPU | QNN HTP | OpenVINO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (bits, tool), all_rs in sorted(cells.items()):
        rs = [r for r in all_rs if "error" not in r]
        if not rs:
            L.append(f"| {bits} | {tool} | 0 | fails: {all_rs[-1]['error']} |" + " |" * 6)
            continue
        ran = next((r for r in rs if "runtimes" in r), None)  # the seed whose file went to the runtimes
        file_cells = (
            [f"{ran['size_over_float']:.3f}"] + [_runtime_cell(ran["runtimes"].get(n)) for n in OUR_RUNTIMES]
            if ran
            else ["-"] * (1 + len(OUR_RUNTIMES))
        )
        L.append(
            f"| {bits} | {tool} | {len(rs)} | {_mean_sd(rs, 'ptq_acc')} | {_mean_sd(rs, 'qat_acc')} | "
            f"{rs[0]['file_kind']} | " + " | ".join(file_cells) + " |"
        )
    if costs:
        L += ["", "QAT step cost over a float step (each toolkit interleaved with float steps in its own process):", ""]
        for bits, c in sorted(costs.items()):
            L.append(f"- {bits}: " + ", ".join(f"{k} {v['over_float']:.2f}x" for k, v in sorted(c.items())))
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")


def _mean_sd(rs, key) -> str:
    v = [100 * r[key] for r in rs if key in r]
    if not v:
        return "-"
    return f"{statistics.mean(v):.1f}" + (f" ± {statistics.stdev(v):.1f} ({len(v)})" if len(v) > 1 else "")


def _runtime_cell(r: dict | None) -> str:
    if r is None:
        return "not run (no file it reads)"
    if r["status"] != "ran":
        return f"fails: {r.get('error', r['status'])}"
    diff = (
        f"{r['max_lsb_vs_integer_reference']:.0f} LSB from our integer reference"
        if "max_lsb_vs_integer_reference" in r
        else f"max logit diff {r['max_abs_logit_diff']:.2f}"
    )
    kernels = r.get("integer_kernels") or (r.get("executed_layers") and openvino_kernels(r["executed_layers"]))
    kernels = f"; integer kernels: {kernels}" if kernels else ""
    host = " HOST-LIMITED (x86 without VNNI: ORT's u8 x s8 kernels saturate)" if r.get("host_limited") else ""
    agree = f"agrees {100 * r['top1_agreement_with_sim']:.1f}% with its sim"
    return f"{100 * r['accuracy']:.1f}%{host}, {agree}, {diff}{kernels}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--bits", required=True, help="W8A8, W4A8, W4A4, ...")
    p.add_argument("--seeds", type=int, nargs="*", default=[0], help="none: only the step costs (--cost)")
    p.add_argument("--toolkits", default="qat-sadam," + ",".join(TOOLKITS))
    p.add_argument("--samples", type=int, default=256, help="test images each runtime runs")
    p.add_argument(
        "--no-runtimes", action="store_true", help="QAT accuracy only: no peer PTQ, export or runtimes (extra seeds)"
    )
    p.add_argument("--cost", action="store_true", help="also time the QAT steps (interleaved)")
    p.add_argument("--cost-rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--set", action="append", default=[], dest="sets", metavar="KEY=VALUE", help="a recipe change, for everyone"
    )
    a = p.parse_args()
    parse_bits(a.bits)  # RecipeError, one line, on a bad value
    names = [n for n in a.toolkits.split(",") if n]
    unknown = set(names) - {"qat-sadam", *TOOLKITS}
    if unknown:
        sys.exit(f"error: unknown toolkit {sorted(unknown)[0]!r}; choose from qat-sadam, {', '.join(TOOLKITS)}")
    os.makedirs(a.out, exist_ok=True)
    if len(names) > 1:
        # One process per toolkit: NNCF and Brevitas patch torch functions on import (AIMET then refuses
        # to load: "PyTorch doesn't support overriding torch.cat"), and a patched torch would slow the others.
        for n in names:
            if subprocess.run([sys.executable, *sys.argv, "--toolkits", n]).returncode:
                print(f"{n}: its process failed (its output above); going on with the others", file=sys.stderr)
        return
    run_toolkit(a, names[0])


def _setup(recipe_name: str, bits: str, seed: int | None, sets: list[str]):
    """The recipe at ``bits`` and ``seed`` with ``sets``, its loaders, the float model and the calibration batches."""
    recipe = load_recipe(recipe_name, sets, bits=bits, seed=seed)
    info, train, calib, test = _loaders(recipe)
    float_model, _ = build_float_model(recipe, info)
    calib_batches = [x for x, _ in list(calib.batches(0))[: recipe.calibration_batches]]
    return recipe, train, test, float_model.eval(), calib_batches


def run_toolkit(a, name: str) -> None:
    keys = parse_bits(a.bits)  # {"bits": 4} or {"weight_bits": 4, "act_bits": 8}
    bits = Bits(keys.get("weight_bits", keys.get("bits")), keys.get("act_bits", keys.get("bits")))
    work = os.path.join("runs", "toolkits", os.path.basename(os.path.normpath(a.out)))
    os.makedirs(work, exist_ok=True)
    rows_path = os.path.join(a.out, "toolkits.json")
    for seed in a.seeds:
        recipe, train, test, float_model, calib_batches = _setup(a.recipe, a.bits, seed, a.sets)
        example = calib_batches[0][:2]
        float_onnx(float_model, example, os.path.join(work, "float.onnx"))
        cell = os.path.join(work, f"{name}-{bits.name}-s{seed}")
        if name == "qat-sadam":
            row = ours_cell(a.recipe, bits, seed, float_model, test, a.samples, cell, not a.no_runtimes, a.sets)
        else:
            row = failing_cell(
                toolkit_cell,
                TOOLKITS[name](),
                recipe,
                bits,
                seed,
                float_model,
                calib_batches,
                example,
                train,
                test,
                a.samples,
                cell,
                lambda row: _save_row(rows_path, row),
                not a.no_runtimes,
            )
        _save_row(rows_path, row)
    if a.cost:
        recipe, train, _, float_model, calib_batches = _setup(a.recipe, a.bits, None, a.sets)
        cost = step_costs(recipe, bits, name, float_model, calib_batches, calib_batches[0][:2], train, a.cost_rounds)
        with _rows(rows_path) as saved:
            saved["costs"].setdefault(bits.name, {})[name] = cost
    with _rows(rows_path) as saved:
        write_table(saved["rows"], saved["costs"], os.path.join(a.out, "toolkits.md"))
    print(open(os.path.join(a.out, "toolkits.md")).read())


def _save_row(path: str, row: dict) -> None:
    """``row`` into OUT/toolkits.json, replacing the same toolkit, bits and seed."""
    key = (row["toolkit"], row["bits"], row["seed"])
    with _rows(path) as saved:
        saved["rows"] = [r for r in saved["rows"] if (r["toolkit"], r["bits"], r["seed"]) != key] + [row]


@contextlib.contextmanager
def _rows(path: str):
    """OUT/toolkits.json read, changed and written under a lock: cells may run in parallel processes."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = json.load(open(path)) if os.path.isfile(path) else {"rows": [], "costs": {}}
        yield saved
        json.dump(saved, open(path, "w"), indent=2)


if __name__ == "__main__":
    main()
