"""Running the commands as a user would, and checking the one-line error contract."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
import traceback
import types
from pathlib import Path
from typing import Any

import numpy as np

BIN = Path(sys.executable).parent
ENTRY_POINTS = {"cvt-export": "cvt_export.cli.export", "cvt-bench": "cvt_export.cli.bench"}
# Where the commands run: "process" (the installed console script in a new interpreter, as a user
# runs it: `make test` and `make test-full`) or "in-process" (the same `main()` called in the test's
# interpreter with its own argv, environment, working folder, stdout and stderr: `make check`,
# where starting an interpreter that imports torch for each of about 80 calls was a third of the run).
CLI_MODE = os.environ.get("CVT_TEST_CLI", "process")
# Read when a library is imported, so a call that sets them runs in its own process either way
IMPORT_TIME_ENV = ("HF_", "TMPDIR", "TEMP", "TMP", "OMP_", "MKL_", "OV_", "ORT_", "PYTHONPATH")


def run_cli(tool: str, *args: str, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The command's exit code, stdout and stderr, as `subprocess.run` gives them."""
    extra = {"HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    if CLI_MODE == "in-process" and not any(k.startswith(IMPORT_TIME_ENV) for k in env or {}):
        return _in_process(tool, list(args), extra, cwd)
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True,
                          env={**os.environ, **extra}, cwd=cwd, timeout=timeout)


def _in_process(tool: str, args: list[str], env: dict[str, str],
                cwd: Path | None) -> subprocess.CompletedProcess[str]:
    """The console script's `main()` in this interpreter. What a process would give back: the exit
    code (SystemExit's), and an uncaught exception as its traceback on stderr with exit code 1.
    Output that C++ runtimes write straight to file descriptor 2 is not captured here; the
    process mode of `make test` sees it."""
    main = importlib.import_module(ENTRY_POINTS[tool]).main
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_main = sys.modules["__main__"]
    code = 0
    try:
        os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = [str(BIN / tool), *args]
        # the parser names the program after argv[0] when __main__ is a script, as a console
        # script's is (under `python -m pytest` it would say "python -m pytest.cvt-export")
        sys.modules["__main__"] = types.ModuleType("__main__")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.modules["__main__"] = saved_main
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([str(BIN / tool), *args], code, out.getvalue(), err.getvalue())


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
