"""Timing helpers shared by the benchmarks: the mean of back-to-back calls, and how many make a sample."""

from __future__ import annotations

import time
from typing import Callable


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
