"""One row of the model zoo: a model a user brings, prepared, exported and validated on ORT.

Random weights and random inputs: what is checked is that the model prepares, that every conv,
linear and matmul runs as an integer kernel, which ops stay float and why, and that the integer
reference equals ORT (max LSB, top-1 agreement), not accuracy.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from ..errors import UserError
from ..export import Target, export_onnx, validate
from ..export.outputs import output_list
from ..models import build_model
from ..quant import calibrate, prepare_qat

SIZES = (32, 64, 96, 128, 224, 256)
TARGET = Target(name="cpu-x86", weight_bits_max=7, checks=["fusion", "parity"])


def runnable_sizes(name: str, source: str):
    """(model, size) for each of SIZES at which the float model runs, smallest first."""
    error = None
    for size in SIZES:
        try:
            model = build_model(name, 10, image_size=size, source=source).eval()
            with torch.no_grad():
                model(torch.randn(2, 3, size, size))
            yield model, size
        except (ValueError, UserError):
            raise
        except Exception as e:  # models refuse sizes in many ways (asserts, shape errors)
            error = e
    if error is not None:
        raise ValueError(f"no input size of {SIZES} runs: {str(error).splitlines()[0][:160]}")


def zoo_row(
    name: str, source: str = "torchvision", bits: int = 8, images: int = 16, seed: int = 0, attempts: int = 2
) -> dict:
    """Prepare, calibrate, export for the cpu-x86 profile and validate one model, at the smallest
    input size where that works (of the first ``attempts`` sizes the float model runs at); the row
    says where it stopped and why if it did."""
    row = {"model": name, "source": source, "bits": bits, "stage": "build"}
    try:
        for i, (model, size) in enumerate(runnable_sizes(name, source)):
            row = model_row(model, name, source, (3, size, size), bits, images, seed)
            if "error" not in row or i + 1 >= attempts:
                break
    except (ValueError, UserError) as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:240]}"
    return row


def _runtime_cell(r: dict) -> dict:
    if r["status"] != "ran":
        return {"status": r["status"], "reason": r.get("reason", "")[:200]}
    p = r["parity"]
    return {
        "status": "ran",
        "max_lsb": p["max_lsb"],
        "top1_agreement": p["top1_agreement"],
        "within_tolerance": r["within_tolerance"],
        "host_limited": bool(r.get("host_limited")),
    }


def model_row(
    model,
    name: str,
    source: str,
    shape: tuple,
    bits: int = 8,
    images: int = 16,
    seed: int = 0,
    target: Target | str = TARGET,
    runtimes: list[str] | None = None,
) -> dict:
    """Prepare, calibrate on ``images`` random inputs of ``shape`` (C, H, W or C, L), export for
    ``target`` (cpu-x86 by default) and validate ``model`` on ORT CPU; every output the model returns
    (a tensor, or a dict, tuple or list of them) is measured, and the row holds the worst: the largest
    difference, the lowest top-1 agreement. With ``runtimes``, the first output on each of them too."""
    torch.manual_seed(seed)
    row = {
        "model": name,
        "source": source,
        "bits": bits,
        "size": shape[-1],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "stage": "prepare",
    }
    t0 = time.perf_counter()
    try:
        qat = prepare_qat(model, {"bits": bits})
        row["opaque_modules"] = qat.opaque_modules
        x = torch.randn(images, *shape)
        row["stage"] = "calibrate"
        calibrate(qat, [x])
        qat.eval()
        row["stage"] = "export"
        with tempfile.TemporaryDirectory() as tmp:
            done = export_onnx(qat, x[:1], os.path.join(tmp, "model.onnx"), target)
            row["stage"] = "validate"
            with torch.no_grad():
                integer = [o.numpy() for o in output_list(done["integer"](x))]
            rep = validate(
                done["path"],
                target=target,
                inputs=[x.numpy()],
                integer_outputs=integer,
                out_dir=tmp,
                runtimes=runtimes,
                frozen=done["frozen"],
            )
            size_ratio = os.path.getsize(done["path"]) / (4e6 * row["params_m"])
        fu = rep["fusion"]
        each = [o["torch_integer_vs_ort"] for o in rep.get("outputs", {"": rep["parity"]}).values()]
        row.update(
            stage="done",
            integer_kernels=fu["integer_kernels"],
            float_compute_left=fu["float_compute_left"],
            float_ops={k: v["count"] for k, v in fu["float_ops"].items()},
            outputs=len(each),
            max_lsb=max(p["max_lsb"] for p in each),
            top1_agreement=min(p["top1_agreement"] for p in each),
            int8_over_float=size_ratio,
            fully_integer=fu["ok"],
            bit_exact=fu["ok"] and all(p["max_lsb"] == 0 for p in each),
            runtimes={k: _runtime_cell(r) for k, r in rep.get("runtimes", {}).items()},
        )
    except (ValueError, UserError) as e:  # ExportError is a UserError; anything else is a bug to fix
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:240]}" if str(e) else type(e).__name__
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row
