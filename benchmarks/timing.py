"""Helpers shared by the benchmarks: the mean of back-to-back calls, how many make a sample, interleaved
medians, interleaved best rounds, and the bytes of a layer's float state_dict (the size the packed files are
compared with)."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def sample(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of ``inner`` back-to-back calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def calibrate(fn: Callable[[], object], target: float = 2e-3) -> int:
    """How many back-to-back calls of ``fn`` take about ``target`` seconds (1 to 1000)."""
    fn()
    one = max(sample(fn, 1), 1e-7)
    return max(1, min(1000, int(target / one)))


def interleaved_medians(
    candidates: dict[str, tuple[str | None, Callable[[], object]]], reps: int, warmup: float | None = None
) -> dict[str, float]:
    """Median seconds per call of every ``{name: (isa, fn)}``, interleaved: every repetition times every
    candidate once, with onebit's ISA set to ``isa`` first (None: leave it). Before each sample: one
    untimed call and a 2 ms pause, or with ``warmup`` untimed calls filling that many seconds, no pause
    (a packed call whose weights were read a call earlier needs about ten calls to settle). The caller
    sets torch's thread count and restores the ISA."""
    from onebit import _C

    def use(isa):
        if isa:
            _C.set_isa(isa)

    inner = {}
    for name, (isa, fn) in candidates.items():
        use(isa)
        inner[name] = calibrate(fn)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, (isa, fn) in candidates.items():
            use(isa)
            if warmup is None:
                fn()
                time.sleep(0.002)
            else:
                end = time.perf_counter() + warmup
                while time.perf_counter() < end:
                    fn()
            samples[name].append(sample(fn, inner[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def best_ms(calls: dict[str, Callable[[], object]], rounds: int, inner: int = 10, settle: int = 3) -> dict[str, float]:
    """ms per call of each ``{name: fn}``: interleaved rounds of ``inner`` calls (after ``settle`` untimed ones),
    each at its best round; thread CPU time at one thread (a busy machine's other processes not counted),
    wall time at more."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, fn in calls.items():
            for _ in range(settle):
                fn()
            start = clock()
            for _ in range(inner):
                fn()
            best[name] = min(best[name], (clock() - start) / inner * 1e3)
    return best


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of ``torch.save(module.state_dict())`` (also for layers safetensors cannot hold, e.g. int8 dynamic)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes
