"""ONNX Runtime's mobile format (.ort): the conversion a profile listing ``ort`` among its formats
gets at export, and the capture of what ORT's tools print (Python logging, prints, native output)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import shutil
import tempfile

from ..errors import ExportError
from .runtimes.base import native_output_to


def logged(run) -> tuple[str, bool]:
    """Run ``run(logger)`` with its logging, prints and native output captured: (text, no exception)."""
    text = io.StringIO()
    log = logging.getLogger(f"qat_sadam.mobile.{id(text)}")
    handler = logging.StreamHandler(text)
    handler.setFormatter(logging.Formatter("%(levelname)s:  %(message)s"))
    log.handlers, log.propagate = [handler], False
    log.setLevel(logging.INFO)
    with tempfile.NamedTemporaryFile("r", suffix=".log") as native:
        ok = True
        with native_output_to(native.name), contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            try:
                run(log)
            except Exception as e:  # ORT's tools raise what the model provokes; the caller reports it
                text.write(f"{type(e).__name__}: {e}\n")
                ok = False
        return text.getvalue() + native.read(), ok


def convert(path: str, folder: str, runtime_optimized: bool = False) -> tuple[list[str], str, bool]:
    """Convert ``path`` to .ort in ``folder`` (emptied first: ORT's converter converts every model in
    the folder it is given, and a file another model left there must not be taken for this one's).
    Returns (the .ort files, this model's first, its runtime-optimized twin after it; the converter's
    output; whether it raised nothing)."""
    # imported here: ORT's tools take 1.8 s to import, which only a mobile export should pay
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    shutil.copy(path, os.path.join(folder, os.path.basename(path)))
    styles = [OptimizationStyle.Fixed] + ([OptimizationStyle.Runtime] if runtime_optimized else [])
    text, ok = logged(lambda log: convert_onnx_models_to_ort(pathlib.Path(folder), optimization_styles=styles))
    stem = os.path.splitext(os.path.basename(path))[0]
    files = sorted((f for f in os.listdir(folder) if f.endswith(".ort")), key=lambda f: (f != f"{stem}.ort", f))
    return [os.path.join(folder, f) for f in files], text, ok


def write_ort(path: str) -> str:
    """``path``'s .ort twin beside it (model.onnx -> model.ort), ORT's fixed optimization style;
    an ExportError with the converter's last line where it produces none."""
    stem, folder = os.path.splitext(path)[0], os.path.splitext(path)[0] + ".ort-work"
    files, text, ok = convert(path, folder)
    try:
        if not ok or not files:
            last = (text.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"{path}: ONNX Runtime's .ort converter made no file ({last})")
        shutil.move(files[0], stem + ".ort")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return stem + ".ort"
