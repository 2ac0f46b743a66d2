"""torch.distributed helpers: a run launched by torchrun trains data-parallel; otherwise all no-ops."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group when torchrun set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        return 0, 1, 0
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks (the tensor itself in one process)."""
    if not dist.is_initialized():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (the flag itself in one process)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_diff_from_rank0(tensors) -> float:
    """Largest |t - t on rank 0| over the tensors and ranks: 0.0 when every rank holds the same state."""
    if not dist.is_initialized():
        return 0.0
    tensors = list(tensors)
    worst = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    for t in tensors:
        ref = t.detach().clone()
        dist.broadcast(ref, 0)
        worst = torch.maximum(worst, (t.detach() - ref).abs().max().double())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def shutdown() -> None:
    """Wait for every rank, then close the process group (an open gloo group can abort at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
