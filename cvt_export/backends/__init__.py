"""Backends turn an artifact folder into a Runner; the harness only ever talks to runners.

A backend is a small object (Polygraphy's shape): `available()` says whether its SDK and
device are here and, if not, why; `compile(folder, precision, **options)` returns a Runner.
A Runner is a context manager (resources live between enter and exit) and a callable
`float32[B,3,H,W] -> float32[B,1000]`; it checks inputs against what the artifact declares
and reports the precision and device it really ran on. Each backend's SDK is imported
inside its own file, only when used, so `import cvt_export` needs none of them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cvt_ref.errors import CvtError


class BackendError(CvtError):
    """A backend that is missing, or an artifact it cannot run."""


@dataclass
class RunnerInfo:
    backend: str
    precision: str            # what was asked for: fp32 | fp16 | bf16 | int8
    executed: str             # what really runs, as the SDK reports it (e.g. "bf16 (AMX)")
    device: str               # e.g. "CPU: AMD EPYC (2 threads)", "cuda:0 NVIDIA H100"
    artifact: str             # the file the runner executes
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Runner(Protocol):
    info: RunnerInfo

    def __enter__(self) -> Runner: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]

    def available(self) -> tuple[bool, str]: ...

    def compile(self, folder: Path, precision: str, **options: Any) -> Runner: ...


class RunnerBase:
    """Shared input checks and context-manager plumbing; subclasses implement `_run`."""

    info: RunnerInfo

    def __init__(self, info: RunnerInfo, image_size: int, fixed_batch: int | None = None) -> None:
        self.info = info
        self.image_size = image_size
        self.fixed_batch = fixed_batch

    def __enter__(self) -> RunnerBase:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Free what the runner holds (sessions, compiled models, device memory)."""

    def check_input(self, x: np.ndarray) -> np.ndarray:
        want = (3, self.image_size, self.image_size)
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1:] != want or x.shape[0] < 1:
            got = getattr(x, "shape", type(x).__name__)
            raise BackendError(f"{self.info.backend}: input must be float32[B, {want[0]}, {want[1]}, "
                               f"{want[2]}], got {got}")
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            raise BackendError(f"{self.info.backend}: {self.info.artifact} was exported for batch "
                               f"{self.fixed_batch}, got {x.shape[0]}")
        if x.dtype != np.float32:
            raise BackendError(f"{self.info.backend}: input must be float32, got {x.dtype}")
        return np.ascontiguousarray(x)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(self.check_input(x)), dtype=np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


BACKEND_MODULES = {
    "torch": "cvt_export.backends.torch",
    "ort": "cvt_export.backends.ort",
    "openvino": "cvt_export.backends.openvino",
    "tensorrt": "cvt_export.backends.tensorrt",
}
ALIASES = {"trt": "tensorrt", "onnxruntime": "ort", "ov": "openvino", "pytorch": "torch"}


def get_backend(name: str) -> Backend:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BACKEND_MODULES:
        raise BackendError(f"unknown backend {name!r}; use one of {', '.join(BACKEND_MODULES)} "
                           f"(or {', '.join(ALIASES)})")
    module = importlib.import_module(BACKEND_MODULES[key])  # imports no SDK at module level
    backend: Backend = module.BACKEND
    return backend


def all_backends() -> list[Backend]:
    return [get_backend(name) for name in BACKEND_MODULES]
