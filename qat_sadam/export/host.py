"""The host's limits on what ORT CPU computes: the CPU features that decide its integer arithmetic.

On x86 without VNNI (AVX2, or AVX-512 without VNNI), ORT's u8 x s8 GEMM multiplies with
vpmaddubsw, which adds each pair of products in 16 bits with saturation: with uint8 activations
(up to 255) two weights whose magnitudes sum past 128 can saturate, so weights beyond 7 bits (|w| >
63) give results no integer kernel elsewhere gives. VNNI (vpdpbusd) accumulates in 32 bits, and
ARM's kernels widen before adding: there the result is exact. A difference ORT CPU shows on such a
host, for such weights, says nothing about the file (docs/guide/runtimes.md); the validator reports
it as a host limit, not a failure.
"""

from __future__ import annotations

import functools
import platform

import numpy as np
import onnx
import onnx.numpy_helper

SEVEN_BIT_MAX = 63  # |w| <= 63: a pair of products with a uint8 activation stays within int16


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU feature flags the kernel reports (/proc/cpuinfo; empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def u8s8_saturates(flags: frozenset | None = None, machine: str | None = None) -> bool:
    """Whether ORT's u8 x s8 kernels add product pairs in 16 bits here (x86 without VNNI)."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    x86 = machine in ("x86_64", "amd64", "i686", "i386")
    return x86 and not ({"avx512_vnni", "avx_vnni", "avx_vnni_int8"} & flags)


def widest_weight(model: onnx.ModelProto) -> int:
    """The largest |integer| of the int8 weights (initializers of rank >= 2) in the graph."""
    widest = 0
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2:
            widest = max(widest, int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int16)).max(initial=0)))
    return widest


def host_limits(model: onnx.ModelProto, activation_type: str = "uint8") -> dict:
    """What this host means for ORT CPU's results on ``model``: the features read, and ``limits_ort``
    with the reason when its u8 x s8 kernels can saturate on the file's weights (uint16 activations
    run in float kernels: never)."""
    flags = cpu_flags()
    features = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "asimddp"})
    widest = widest_weight(model)
    limited = activation_type == "uint8" and u8s8_saturates() and widest > SEVEN_BIT_MAX
    out = {"machine": platform.machine(), "cpu_features": features, "widest_weight": widest, "limits_ort": limited}
    if limited:
        out["note"] = (
            f"this CPU ({platform.machine()}, {'/'.join(features) or 'no SIMD flags read'}) has no VNNI: ORT CPU's "
            f"u8 x s8 kernels add product pairs in 16 bits and saturate with 8-bit weights (up to |{widest}|); "
            "ORT CPU's differences here are the host's, not the file's, and the runtimes that run the target's "
            "arithmetic are checked against the integer reference instead"
        )
    return out
