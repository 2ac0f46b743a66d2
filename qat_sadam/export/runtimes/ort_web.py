"""ONNX Runtime Web under node: the browser's path. Its `wasm` backend is ORT's own CPU kernels
compiled to WebAssembly (the npm build has no XNNPACK backend), so its integer arithmetic is ORT
CPU's without the x86 SIMD paths. The npm package is pinned by web/package-lock.json and installed
outside the package, in a cache folder (``qat-sadam runtimes --install-web``; `make venv`
runs it): the package itself stays small and read-only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import numpy as np
import onnx

from ...errors import ValidationError
from .base import ModelFiles, Runtime, Session, Tolerance
from .ort_cpu import UINT16_FLOAT_CAUSE, UINT16_FLOAT_LSB

WEB_DIR = os.path.join(os.path.dirname(__file__), "web")  # package.json, its lock and run.cjs (package data)
TIMING_ITERS = 10
INSTALL_COMMAND = "qat-sadam runtimes --install-web"


def install_dir() -> str:
    """Where npm installs onnxruntime-web: $QAT_SADAM_CACHE/ort-web, else
    $XDG_CACHE_HOME (or ~/.cache)/qat-sadam/ort-web."""
    cache = os.environ.get("QAT_SADAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qat-sadam"
    )
    return os.path.join(cache, "ort-web")


def install() -> str:
    """npm ci of the pinned onnxruntime-web into install_dir(); returns that folder."""
    if shutil.which("npm") is None:
        raise ValidationError("npm not found: install Node.js >= 18 with npm to run models on ONNX Runtime Web")
    folder = install_dir()
    os.makedirs(folder, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(os.path.join(WEB_DIR, name), os.path.join(folder, name))
    subprocess.run(["npm", "ci", "--prefix", folder, "--no-audit", "--no-fund", "--loglevel=error"], check=True)
    return folder


class OrtWeb(Runtime):
    name = "ort-web"
    install = f"{INSTALL_COMMAND}  (npm ci into {install_dir()}; run by make venv; needs node >= 18)"
    what = "onnxruntime-web, wasm backend (ORT's kernels in WebAssembly), node, one thread"
    tolerances = {
        "uint8": Tolerance(
            1.0,
            0.99,
            "ORT's portable kernels: QLinearConv requantizes as on x86; QLinearAdd and the "
            "u8 x s8 GEMM take the scalar path (no 16-bit pair sums), so a tie can round one LSB apart",
        ),
        "uint16": Tolerance(UINT16_FLOAT_LSB, 0.99, UINT16_FLOAT_CAUSE),
    }
    # Its wasm build loads INT4 weights but dequantizes them and convolves in float (no INT4 kernel): 3 LSB
    # from the reference on MobileNetV2 W4A8, where its integer kernels on the int8 container give 0.
    int4_storage = False

    def missing(self) -> str | None:
        if shutil.which("node") is None:
            return "node not found (install Node.js >= 18)"
        if not os.path.isdir(os.path.join(install_dir(), "node_modules", "onnxruntime-web")):
            return f"npm package onnxruntime-web not installed in {install_dir()}"
        return None

    def load(self, files: ModelFiles, int8: bool = True) -> Session:
        path = self.onnx_path(files, int8)
        graph = onnx.load(path).graph
        fixed = graph.input[0].type.tensor_type.shape.dim[0].dim_value or None
        # The output's static dims after the batch (a dense prediction's C, H, W): node writes it flat.
        per_sample = [d.dim_value or -1 for d in graph.output[0].type.tensor_type.shape.dim[1:]]
        info: dict = {}

        def run(x: np.ndarray) -> np.ndarray:
            batch = fixed or len(x)
            with tempfile.TemporaryDirectory(dir=files.work_dir) as tmp:
                xin, yout = os.path.join(tmp, "x.bin"), os.path.join(tmp, "y.bin")
                x.astype(np.float32).tofile(xin)
                proc = subprocess.run(
                    [
                        "node",
                        os.path.join(WEB_DIR, "run.cjs"),
                        os.path.abspath(path),
                        xin,
                        ",".join(map(str, x.shape)),
                        str(batch),
                        yout,
                        str(TIMING_ITERS),
                    ],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "NODE_PATH": os.path.join(install_dir(), "node_modules")},
                )
                if proc.returncode:
                    raise ValidationError(f"onnxruntime-web failed: {(proc.stderr or proc.stdout).strip()[:300]}")
                info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                return np.fromfile(yout, dtype=np.float32).reshape(len(x), *per_sample)

        return Session(run, {"wasm": "all nodes"}, info)
