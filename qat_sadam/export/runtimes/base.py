"""What every runtime offers the validator: load a model, run a batch, say what ran where.

A runtime is an engine a user ships the INT8 model to. Each module in this package wraps one
behind ``Runtime``: ``missing()`` says why it cannot run here (a package or a tool absent, with
the install command), ``load()`` turns the exported model into a ``Session`` (converting it where
the runtime has its own format), and the session runs float32 batches and reports the placement
(which nodes the accelerator or delegate took) and the arithmetic it exposes (precision, kernels).
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from torch import nn


@contextlib.contextmanager
def native_output_to(path: str):
    """What native libraries print while the block runs (file descriptors 1 and 2, which Python's
    sys.stdout never sees: ExecuTorch's cpuinfo lines, QNN's and OpenVINO's logs) goes to ``path``,
    appended: the runtimes' log belongs beside the report, not above its verdict."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, target in zip(saved, (1, 2)):
            os.dup2(fd, target)
            os.close(fd)


@dataclass
class ModelFiles:
    """The exported model in the forms runtimes load: the INT8 QDQ ONNX file and its float twin,
    and the frozen torch graphs (for runtimes that lower torch programs, ExecuTorch)."""

    onnx: str
    float_onnx: str | None = None
    frozen: nn.Module | None = None
    float_torch: nn.Module | None = None
    example: np.ndarray | None = None
    work_dir: str = "."
    int4_onnx: str | None = None  # the same graph with 4-bit weights stored as INT4 (weight_storage: int4)
    activation_type: str = "uint8"  # the widest activation container: uint8 or uint16


@dataclass
class Tolerance:
    """How far a runtime's logits may sit from the integer reference, and why they differ at all."""

    max_lsb: float = 0.0
    top1_agreement: float = 1.0
    cause: str = "same integer arithmetic as the reference"


@dataclass
class Session:
    run_batch: object  # callable: float32 array (N, ...) -> float32 logits (N, classes)
    placement: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    batch: int | None = None  # the model's fixed batch size, if it has one: inputs run in chunks of it

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self.batch or len(x)
        return np.concatenate(
            [np.asarray(self.run_batch(x[i : i + step]), dtype=np.float32) for i in range(0, len(x), step)]
        )


class Runtime(abc.ABC):
    name = ""
    install = ""  # the command that makes it available
    what = ""  # one line: the engine, the kernels, the device it stands for
    tolerances: dict[str, Tolerance] = {"uint8": Tolerance()}  # by activation container (uint8, uint16)
    refuses: dict[str, str] = {}  # activation containers it cannot run as written, and why
    int4_storage = False  # computes with INT4 weights: runs NAME.int4.onnx where the export wrote one
    simulated = False  # an emulator of the device: its timings say nothing about the device
    host_u8s8 = False  # runs the host's x86 u8 x s8 kernels (host.py: they saturate 8-bit weights without VNNI)

    def missing(self) -> str | None:
        """None when the runtime can run here, else the reason."""
        return None

    def onnx_path(self, files: ModelFiles, int8: bool = True) -> str:
        """The file this runtime runs: the float twin, the INT4-stored graph where it computes with
        INT4 weights and the export wrote one, else the int8 container."""
        if not int8:
            return files.float_onnx
        return files.int4_onnx if self.int4_storage and files.int4_onnx else files.onnx

    @abc.abstractmethod
    def load(self, files: ModelFiles, int8: bool = True) -> Session:
        """The INT8 model (or with ``int8=False`` its float twin) ready to run on this runtime."""


def missing_modules(*modules: str) -> str | None:
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"Python package {', '.join(absent)} not installed" if absent else None


def first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
