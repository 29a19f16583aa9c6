"""What the processes of a run agree on: their rank, and sums or maxima of small CPU tensors.

Outside a process group a run is rank 0 of 1, and every reduction is the process's own value.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["rank_and_world_size", "all_reduce", "mean_over_ranks", "agreed_stop_signal"]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(t: torch.Tensor, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``t`` summed (or reduced by ``op``) over the ranks, through ``device`` (NCCL reduces on the GPU),
    returned on the CPU."""
    moved = t.to(device)
    dist.all_reduce(moved, op=op)
    return moved.cpu()


def mean_over_ranks(total: float, count: int, device: torch.device, world_size: int) -> float:
    """``sum(total) / sum(count)`` over the ranks (in float64); NaN when ``sum(count)`` is 0."""
    if world_size > 1:
        t = all_reduce(torch.tensor([total, float(count)], dtype=torch.float64), device)
        return float(t[0] / t[1]) if t[1] else math.nan
    return total / count if count else math.nan


def agreed_stop_signal(signum: int | None, device: torch.device, world_size: int) -> int | None:
    """The stop request every rank acts on: the largest signal number any rank received (``None``
    when none did), so that all ranks stop at the same step."""
    if world_size == 1:
        return signum
    flag = all_reduce(torch.tensor([0 if signum is None else int(signum)]), device, dist.ReduceOp.MAX)
    return int(flag.item()) or None
