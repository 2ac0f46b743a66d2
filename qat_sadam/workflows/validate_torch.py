"""Validate your own QAT model from Python: export it and check the file as `qat-sadam export` does."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..export import DEFAULT_TARGET
from .export_run import export_and_validate


def validate(
    model: torch.nn.Module, data, target: str | None = None, runtimes: list[str] | None = None, out_dir: str = "."
) -> dict:
    """Export your QAT model and validate the file as `qat-sadam export` validates a run's: integer
    kernels in ORT's optimized graph, parity with the integer reference in output LSB, the BatchNorm
    fold check, accuracy against the QAT graph's, size, latency, and each runtime (ExecuTorch lowers
    the torch model itself).

    Args:
        model: the model ``prepare_qat`` returned, calibrated and trained (switched to eval here).
        data: batches of (inputs, labels), labels None for no accuracy, or of inputs alone; the
            first input is the export's example.
        target: a profile name (``qat-sadam targets``) or YAML path; default cpu-x86.
        runtimes: the runtimes to run the file on (``qat-sadam runtimes``); default the target's.
        out_dir: where model.onnx, float.onnx and validation.md/json are written.

    Returns:
        The report: ``passed``, ``failures``, ``fusion``, ``parity``, ``accuracy``, ``fold_check``,
        ``runtimes`` and the rest, as out_dir/validation.json holds it (validation.md renders it)."""
    batches = [(b, None) if isinstance(b, torch.Tensor) else (b[0], b[1]) for b in data]
    if not batches:
        raise UserError("validate: data holds no batch")
    rep = export_and_validate(model.eval(), batches, target or DEFAULT_TARGET, out_dir, runtimes=runtimes)
    return rep
