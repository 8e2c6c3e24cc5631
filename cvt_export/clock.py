"""The one timing loop: calls of a function, timed one by one after untimed warm-up calls. A leaf
(the standard library only): the benchmark's latencies (`harness.timing`) and the runners' GEMM
limits (`backends.timed_median_ms`) are measured by it."""

from __future__ import annotations

import time
from collections.abc import Callable


def time_calls(fn: Callable[[], object], *, warmup: int, iters: int | None, seconds: float,
               min_iters: int = 3, warm_seconds: float = 0.0) -> list[float]:
    """Per-call seconds after at least `warmup` untimed calls lasting at least `warm_seconds`:
    exactly `iters` calls, or as many as fit in `seconds` (at least `min_iters`)."""
    start, warm = time.perf_counter(), 0
    while warm < warmup or time.perf_counter() - start < warm_seconds:
        fn()
        warm += 1
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if iters is not None:
            if len(times) >= iters:
                break
        elif time.perf_counter() - start >= seconds and len(times) >= min_iters:
            break
    return times
