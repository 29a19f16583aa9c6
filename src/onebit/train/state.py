"""The parts of a trainer's ``state_dict`` that are not torch objects' own: where the run stands, its
random streams (the process's global ones, torch's, numpy's and Python's, and each rank's augmentation
and mixup generators), and snapshots that later steps leave unchanged."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import torch

__all__ = [
    "POSITION",
    "global_rng_state",
    "set_global_rng_state",
    "rank_streams",
    "streams_state",
    "continue_streams",
    "snapshot",
]

#: where a run stands: the epoch, the step in it, the steps run, and the epoch's loss sum, examples and seconds
POSITION = ("epoch", "step", "global_step", "loss_sum", "loss_count", "elapsed")


def global_rng_state() -> dict[str, Any]:
    """The global generators' states: ``torch`` (a uint8 tensor), ``numpy`` (``np.random.get_state()``'s
    tuple) and ``python`` (``random.getstate()``'s tuple)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Continue the global generators from ``state`` (as :func:`global_rng_state` returns it)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def snapshot(value: Any) -> Any:
    """A deep copy of ``value`` whose tensors are detached copies on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(snapshot(v) for v in value)
    return copy.deepcopy(value)


def rank_streams(seed: int, rank: int, global_step: int | None = None) -> tuple[torch.Generator, np.random.Generator]:
    """Process ``rank``'s augmentation and mixup generators, seeded from ``seed`` and ``rank``; those of a
    rank > 0 resuming a run (only rank 0's streams are saved) also from the ``global_step`` it resumes at."""
    if global_step is None:
        return torch.Generator().manual_seed(seed * 7919 + rank), np.random.default_rng([seed, rank])
    return (
        torch.Generator().manual_seed(seed * 7919 + rank + 104_729 * global_step),
        np.random.default_rng([seed, rank, global_step]),
    )


def streams_state(generator: torch.Generator, mixup_rng: np.random.Generator) -> dict[str, Any]:
    """The global generators' states (:func:`global_rng_state`) with ``generator``'s and ``mixup_rng``'s."""
    return {**global_rng_state(), "generator": generator.get_state(), "mixup": mixup_rng.bit_generator.state}


def continue_streams(state: dict[str, Any], generator: torch.Generator, mixup_rng: np.random.Generator) -> None:
    """Continue the global generators, ``generator`` and ``mixup_rng`` from ``state`` (:func:`streams_state`'s)."""
    set_global_rng_state(state)
    generator.set_state(state["generator"])
    mixup_rng.bit_generator.state = state["mixup"]
