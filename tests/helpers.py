"""Running the real console scripts, as a user would, and checking the one-line error contract."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

BIN = Path(sys.executable).parent


def run_cli(tool: str, *args: str, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


def int8_backends() -> tuple[str, ...]:
    """The CPU backends whose INT8 runs on this machine: OpenVINO's needs VNNI or AMX (a machine
    fact, read from /proc/cpuinfo; on an AVX2-only CPU its INT8 kernels saturate)."""
    from cvt_export import machine

    return ("ort", "openvino") if machine.int8_dot_exact() else ("ort",)


STEP_LINE = re.compile(r"^\[ *\d+\.\d s\] ")  # a progress step in a log (cli.common.status)


def assert_user_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    """Exit 2, exactly one line on stderr that starts with 'error:' and says `fragment` (after the
    progress steps a log shows while the work ran, if it got that far)."""
    lines = [line for line in result.stderr.strip().splitlines() if not STEP_LINE.match(line)]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine in float64, written here independently of cvt_export's metrics."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


class PerturbedBackend:
    """A real backend whose runner adds noise to the logits, as a faulty build would."""

    def __init__(self, inner: Any, scale: float) -> None:
        self.inner, self.scale = inner, scale
        self.name, self.precisions = inner.name, inner.precisions

    def available(self) -> tuple[bool, str]:
        return self.inner.available()

    def compile(self, folder: Path, precision: str, **options: Any) -> Any:
        runner = self.inner.compile(folder, precision, **options)
        real = runner._run
        runner._run = lambda x: self._noisy(real(x))
        return runner

    def probe(self, folder: Path, precision: str, names: list[str], x: np.ndarray,
              **options: Any) -> dict[str, np.ndarray]:
        out = self.inner.probe(folder, precision, names, x, **options)
        return out | {"logits": self._noisy(out["logits"])}  # the fault is in the head

    def _noisy(self, logits: np.ndarray) -> np.ndarray:
        return logits + self.scale * np.random.default_rng(len(logits)).standard_normal(logits.shape)


def triton_or_skip() -> None:
    """Skip, with the reason, where PyPI's tritonserver binary is not installed."""
    import pytest

    from cvt_export.triton import TritonError
    from cvt_export.triton.server import triton_home

    try:
        triton_home()
    except TritonError as e:
        pytest.skip(str(e))
