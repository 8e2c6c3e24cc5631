"""Wall-clock timing of a runner and the process's memory, measured the same way for everyone.

Timing covers `runner(x)` only: inputs are preprocessed once beforehand and outputs are
already host float32 arrays when the call returns (GPU runners synchronize inside).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cvt_export.clock import time_calls
from cvt_export.metrics import latency_stats
from cvt_export.records import LatencyStats


def measure(runner: Callable[[np.ndarray], np.ndarray], x: np.ndarray, *, warmup: int,
            iters: int | None, seconds: float) -> LatencyStats:
    return latency_stats(time_calls(lambda: runner(x), warmup=warmup, iters=iters, seconds=seconds),
                         batch=len(x))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident memory since the last reset (VmHWM), in MB; None where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # never reset: an upper bound
