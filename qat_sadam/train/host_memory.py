"""Host memory: let a training step reuse the pages the step before it freed.

PyTorch's CPU allocator keeps no cache (c10's alloc_cpu is posix_memalign and free), and glibc
serves each block above its mmap threshold (at most 32 MiB on 64-bit) with a fresh mapping that it
unmaps on free. Every step's large activations are then new pages, which the kernel faults in and
zeroes on first touch: on MobileNetV2 at batch 128, ~360k page faults and 1.5 s of system time in
a ~7 s QAT step, a float step ~140k and 0.5 s (it keeps fewer activation-size buffers).
``heap`` turns glibc's mmap path and heap trimming off (mallopt), so that freed blocks stay in the
heap and the next steps take them: after a few steps no faults at all, for ~7% more resident
memory (glibc keeps a few spare blocks of a size that posix_memalign's slack cannot reuse at
once). docs/studies/benchmarks.md has the measurements.

There is no torch setting for this, and tcmalloc or jemalloc would have to be preloaded before the
process starts; mallopt acts at run time, on what is allocated after it.
"""

from __future__ import annotations

import ctypes
import functools
import os

from ..errors import RecipeError

MODES = ("auto", "heap", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_HEAP = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0}
_USER_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")
_state = {"mode": "system"}


@functools.cache
def _glibc():
    """The process's C library where it is glibc (the symbols of this process: nothing is loaded)."""
    if os.name != "posix":
        return None
    libc = ctypes.CDLL(None)
    return libc if all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")) else None


def set_host_memory(mode: str) -> str:
    """Apply ``mode`` to this process and return what runs: ``heap`` or ``system``. ``auto`` is heap
    on glibc unless the environment already chose (MALLOC_* variables, a preloaded allocator)."""
    if mode not in MODES:
        raise RecipeError(f"host_memory must be one of {', '.join(MODES)}, got {mode!r}")
    libc = _glibc()
    if mode == "auto":
        mode = "heap" if libc is not None and not any(os.environ.get(k) for k in _USER_ENV) else "system"
    if mode == "heap" and libc is None:
        raise RecipeError("host_memory: heap needs glibc's mallopt, which this platform lacks; use auto or system")
    if (
        libc is not None and mode != _state["mode"]
    ):  # system after heap (same process): glibc's defaults, free pages returned
        for param, value in (_HEAP if mode == "heap" else _GLIBC_DEFAULTS).items():
            if not libc.mallopt(param, value):
                raise OSError(f"mallopt({param}, {value}) failed")
        if mode == "system":
            libc.malloc_trim(0)
        _state["mode"] = mode
    return mode
