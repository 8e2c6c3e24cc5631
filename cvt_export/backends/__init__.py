"""Backends turn an artifact folder into a Runner; the harness only ever talks to runners.

A backend is a small object (Polygraphy's shape): `available()` says whether its SDK and
device are here and, if not, why; `compile(folder, precision, *, options...)` checks the
artifact and the options (explicit keywords: a misspelt one is a TypeError) and returns a
Runner. A Runner has a lifecycle: its resources (session, compiled model, engine context)
are created when it is entered (or on its first call) and freed when it exits; used after
exit it raises BackendError. It is a callable `float32[B,3,H,W] -> float32[B,N]` that checks
its input against what the artifact declares (`inputs`: name, shape with the dynamic batch
named, dtype; and finiteness: a NaN or Inf row is refused, naming the rows), and it reports
the precision and device it really ran on. Backends that can expose per-block outputs
implement the `Probing` protocol. Calls from several threads are serialized (one at a
time, in order); a runner is not a pool. Each SDK is imported inside its own backend file, only when
used, so `import cvt_export` needs none of them.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from cvt_export import precisions
from cvt_export.artifacts import ArtifactFolder
from cvt_export.precisions import kernel_precision as kernel_precision
from cvt_export.records import TensorSpec as TensorSpec
from cvt_ref.errors import CvtError


class BackendError(CvtError):
    """A backend that is missing, or an artifact or input it cannot run."""


class BackendUnavailable(BackendError):
    """What this backend needs is not here: its SDK, the device, or the hardware feature a
    precision needs (CUDA for torch FP16, BF16 units). A benchmark lists it as skipped; any
    other BackendError (cannot load, compile or run the artifact) is an error."""


@dataclass
class RunnerInfo:
    backend: str
    precision: str            # what was asked for: fp32 | fp16 | bf16 | int8
    executed: str             # what really runs, as the SDK reports it (e.g. "bf16 (AMX)")
    device: str               # e.g. "CPU: AMD EPYC (2 threads)", "cuda:0 NVIDIA H100"
    artifact: str             # the file the runner executes
    details: dict[str, Any] = field(default_factory=dict)


def onnx_io(folder: ArtifactFolder, precision: str) -> tuple[TensorSpec, TensorSpec]:
    """The input and output specs a precision's ONNX file records in the folder's manifest."""
    graph = folder.graph(precision)
    return graph.inputs[0], graph.outputs[0]


@runtime_checkable
class Runner(Protocol):
    info: RunnerInfo
    inputs: TensorSpec
    outputs: TensorSpec

    @property
    def active(self) -> bool: ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


class Backend(Protocol):
    name: str
    precisions: tuple[str, ...]

    def available(self) -> tuple[bool, str]: ...

    def compile(self, folder: ArtifactFolder | str | Path, precision: str, *, threads: int | None = None,
                check_finite: bool = True) -> Runner: ...


@runtime_checkable
class Probing(Protocol):
    """A backend that can return intermediate tensors (per-block drift)."""

    def probe(self, folder: ArtifactFolder | str | Path, precision: str, names: list[str], x: np.ndarray, *,
              threads: int | None = None) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class OpTime:
    """One operator of a profiled runtime graph (after the runtime's own fusions)."""

    node: str        # the runtime's node name (the ONNX node's where the runtime kept it)
    op: str          # the runtime's operator or layer type
    kernel: str      # the implementation, as the runtime names it (OpenVINO's exec type; ORT's provider)
    precision: str   # what it computed in: int8, fp32, bf16, fp16 ("" when the runtime does not say)
    ms: float        # its time in the profile's median run


@dataclass(frozen=True)
class Profile:
    ops: list[OpTime]
    run_ms: float    # the median run's whole inference time
    runs: int
    # what a runtime that renames and fuses nodes says of its graph (empty where it keeps the
    # source graph's names): the source layers each node was made from, and each node's consumers,
    # producers first (so that a node the runtime made itself can be placed by what it feeds)
    names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    consumers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of_median_run(cls, kinds: Mapping[str, tuple[str, str, str]], times: Mapping[str, Any],
                      walls: list[float], names: Mapping[str, tuple[str, ...]] | None = None,
                      consumers: Mapping[str, tuple[str, ...]] | None = None) -> Profile:
        """The operators of the run whose whole time was the median (the lower one for an even
        count), so that the parts add up to one real inference: per-operator medians taken from
        different runs do not (a bimodal runtime summed to more than its median run).
        `times[node][i]` is the node's time in run i (0 where that run did not execute it)."""
        if not walls:
            raise BackendError("the profile holds no run")
        pick = int(np.argsort(walls, kind="stable")[(len(walls) - 1) // 2])
        ops = [OpTime(node, *kinds[node], float(t[pick])) for node, t in times.items()]
        return cls(ops, float(walls[pick]), len(walls), dict(names or {}), dict(consumers or {}))


# The operator name a runner's profile gives a kernel that runs a whole attention (Q·Kᵀ, Softmax,
# ·V) as one, such as OpenVINO's fused Subgraph: its time is mostly the two MatMuls.
ATTENTION = "Attention (MatMul·Softmax·MatMul)"


@runtime_checkable
class GemmLimit(Protocol):
    """A runner that can measure what its runtime's GEMMs reach here (the floor in the report)."""

    def gemm_rate(self, m: int, k: int, n: int, runs: int) -> float:
        """This runtime's multiply-adds per second (GMAC/s) on one [m, k] x [k, n] MatMul in the
        runner's precision and settings: the limit its GEMMs can reach here."""
        ...


@runtime_checkable
class Profiling(GemmLimit, Protocol):
    """A runner whose runtime reports time per operator (ORT's profiler, OpenVINO's counters)."""

    def profile(self, x: np.ndarray, runs: int) -> Profile: ...


def why_not(backend: Backend, precision: str) -> str:
    """Why `backend` will not run `precision` here, "" when it will: no path for the precision
    (the precision table), or the backend unavailable (its SDK or device missing)."""
    if precision not in backend.precisions:
        return f"{backend.name} has no {precision} path"
    ok, why = backend.available()
    return "" if ok else why


def check_precision(backend: str, precision: str) -> None:
    """A precision the backend runs (the one precision table says which)."""
    runs = precisions.run_by(backend)
    if precision not in runs:
        raise BackendError(f"{backend} runs {', '.join(runs)}, not {precision!r}")


def check_threads(backend: str, threads: int | None) -> None:
    """`threads=` is a positive count, or None for the SDK's own default."""
    if threads is not None and threads < 1:
        raise BackendError(f"{backend}: threads={threads}; use 1 or more (or None for its default)")


State = Literal["ready", "active", "closed"]


class RunnerBase:
    """Lifecycle and input checks; subclasses implement `_activate`, `_deactivate` and `_run`."""

    info: RunnerInfo

    def __init__(self, info: RunnerInfo, inputs: TensorSpec, outputs: TensorSpec, *,
                 check_finite: bool = True) -> None:
        self.info = info
        self.inputs = inputs
        self.outputs = outputs
        self.check_finite = check_finite
        self._state: State = "ready"
        # Calls from several threads are serialized: one inference request (OpenVINO), one
        # session run or one execution context at a time, in call order.
        self._calls = threading.Lock()

    @property
    def active(self) -> bool:
        return self._state == "active"

    def activate(self) -> None:
        if self._state != "active":
            self._activate()
            self._state = "active"

    def deactivate(self) -> None:
        with self._calls:  # never free what a call in another thread is using
            if self._state == "active":
                self._deactivate()
            self._state = "closed"

    def __enter__(self) -> RunnerBase:
        self.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.deactivate()

    def _activate(self) -> None:
        """Create what the runner holds (sessions, compiled models, device memory)."""

    def _deactivate(self) -> None:
        """Free what the runner holds."""

    def check_input(self, x: np.ndarray) -> np.ndarray:
        name = self.info.backend
        if not isinstance(x, np.ndarray):
            hint = "; pass tensor.numpy()" if type(x).__module__.startswith("torch") else ""
            raise BackendError(f"{name}: input must be a numpy.ndarray, got {type(x).__module__}."
                               f"{type(x).__name__}{hint}")
        want = self.inputs.shape
        text = f"{self.inputs.dtype}[{', '.join(map(str, want))}]"
        if x.ndim != len(want) or x.shape[0] < 1 or tuple(x.shape[1:]) != tuple(want[1:]):
            raise BackendError(f"{name}: input must be {text}, got shape {tuple(x.shape)}")
        fixed = self.inputs.fixed_batch
        if fixed is not None and x.shape[0] != fixed:
            raise BackendError(f"{name}: {self.info.artifact} was exported for batch {fixed}, "
                               f"got {x.shape[0]}")
        if x.dtype != np.dtype(self.inputs.dtype):
            raise BackendError(f"{name}: input must be {text}, got dtype {x.dtype}")
        if self.check_finite:
            finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            if not finite.all():
                rows = np.flatnonzero(~finite).tolist()
                raise BackendError(f"{name}: input rows {rows[:8]}{' ...' if len(rows) > 8 else ''} "
                                   "hold NaN or Inf (check the preprocessing; pass check_finite=False "
                                   "to run them anyway)")
        return np.ascontiguousarray(x)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self.check_input(x)
        with self._calls:
            if self._state == "closed":
                raise BackendError(f"{self.info.backend}: runner used after it was closed (outside its "
                                   "`with` block); enter it again or compile a new one")
            self.activate()  # first call outside `with`: resources are created now
            return np.asarray(self._run(x), dtype=np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


BACKEND_MODULES = {
    "torch": "cvt_export.backends.torch",
    "ort": "cvt_export.backends.ort",
    "openvino": "cvt_export.backends.openvino",
    "tensorrt": "cvt_export.backends.tensorrt",
}
ALIASES = {"trt": "tensorrt", "onnxruntime": "ort", "ov": "openvino", "pytorch": "torch"}


def backend_name(name: str) -> str:
    """The backend's own name for a name or alias the user wrote; nothing is imported."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BACKEND_MODULES:
        raise BackendError(f"unknown backend {name!r}; use one of {', '.join(BACKEND_MODULES)} "
                           f"(or {', '.join(ALIASES)})")
    return key


def get_backend(name: str) -> Backend:
    module = importlib.import_module(BACKEND_MODULES[backend_name(name)])  # no SDK at module level
    backend: Backend = module.BACKEND
    return backend


TUNED = ("ort", "openvino")  # the backends `cvt-export tune` drives (TensorRT reads the same mixed file)


def tuned_name(name: str) -> str:
    """The backend `tune` drives for `--backend name`, refused when tune does not drive it; nothing
    is imported, so the command line refuses a wrong name before the toolchain loads."""
    key = backend_name(name)
    if key not in TUNED:
        raise BackendError(f"--backend {name}: tune drives {', '.join(TUNED)} here "
                           "(TensorRT reads the same model.mixed.onnx)")
    return key


def all_backends() -> list[Backend]:
    return [get_backend(name) for name in BACKEND_MODULES]


WARM_S, TIMED_S = 0.3, 0.5


def timed_median_ms(call: Any, runs: int) -> float:
    """The median wall time of `call()` over at least `runs` calls and TIMED_S seconds, after
    untimed calls for WARM_S seconds (at least two). A GEMM limit is a millisecond a call: two
    warm-up calls left the first of six back-to-back measurements 20% low (715 vs 851-902
    GMAC/s for OpenVINO INT8), the cores not yet at speed."""
    from cvt_export.clock import time_calls

    times = time_calls(call, warmup=2, warm_seconds=WARM_S, iters=None, seconds=TIMED_S, min_iters=runs)
    return float(np.median(times)) * 1000
