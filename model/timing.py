"""Timing a call on the machine at hand: for choices made by measurement (model/fastpath.py)
and for the benchmarks (bench/common.py)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, number: int = 1) -> float:
    """Seconds per call of `fn`: the best of `repeats` rounds of `number` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best
