"""TensorRT: a strongly-typed engine per ONNX artifact, cached, with device buffers from torch.

Precision comes from the ONNX file, not from builder flags (ARCHITECTURE.md): FP32 from
`model.onnx`, FP16 from `model.fp16.onnx` (LayerNorm/Softmax/classifier already FP32 in it),
INT8 from the Q/DQ `model.int8.onnx`. The network is created strongly typed, which TensorRT
10 offers as a flag and TensorRT 11 makes the only mode (it has no FP16/INT8 builder flags).

Engines are cached in `<artifacts>/tensorrt/`, keyed by the ONNX file's sha256, the build
options, the GPU's name and compute capability and the TensorRT version; a sidecar JSON
records the key and the engine's sha256, so a stale, foreign or truncated engine is rebuilt,
never loaded. The timing cache persists per GPU and TensorRT version.

TensorRT cannot be installed where this project is developed (its wheels download from
NVIDIA's index at install time); this file is type-checked against `tensorrt-stubs` in CI and
its tests skip without TensorRT and a GPU. Users install it with `pip install tensorrt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tensorrt as trt

import numpy as np

from cvt_export import artifacts, records
from cvt_export.artifacts import ArtifactFolder, as_folder
from cvt_export.backends import (
    BackendError,
    BackendUnavailable,
    RunnerBase,
    RunnerInfo,
    check_precision,
    onnx_io,
)
from cvt_export.precisions import run_by
from cvt_export.records import EngineProfile, EngineRecord
from cvt_export.runtime import INPUT_NAME, OUTPUT_NAME
from cvt_ref.source import sha256_file

log = logging.getLogger(__name__)

ENGINE_DIR = "tensorrt"
INSTALL = "pip install tensorrt (with an NVIDIA driver and a CUDA GPU)"


DEFAULT_OPT_BATCH = 8


@dataclass(frozen=True)
class BuildOptions:
    min_batch: int = 1
    opt_batch: int = DEFAULT_OPT_BATCH
    max_batch: int = 32
    workspace_gib: float | None = None  # None: TensorRT's default (the device's memory)

    @classmethod
    def up_to(cls, max_batch: int, opt_batch: int | None = None, min_batch: int = 1,
              workspace_gib: float | None = None) -> BuildOptions:
        """A profile up to `max_batch`, tuned for `opt_batch` (default: 8, or max_batch if smaller)."""
        opt = min(DEFAULT_OPT_BATCH, max_batch) if opt_batch is None else opt_batch
        return cls(min_batch, opt, max_batch, workspace_gib)

    def check(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise BackendError(f"tensorrt: need 1 <= --min-batch ({self.min_batch}) <= --opt-batch "
                               f"({self.opt_batch}) <= --max-batch ({self.max_batch})")
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise BackendError(f"tensorrt: --workspace {self.workspace_gib} GiB must be positive")


def _require_trt() -> str:
    """TensorRT's version, or a BackendError that says how to install it.

    Functions below import `tensorrt` themselves after this check, so that mypy checks every
    attribute they use against the stubs (a module passed around as a value would be Any).
    """
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(f"tensorrt: TensorRT is not installed: {INSTALL}") from None
    return str(tensorrt.__version__)


def _gpu() -> tuple[str, str]:
    """(name, compute capability) of CUDA device 0, or a BackendError that says what is missing."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        raise BackendUnavailable("tensorrt: the runner needs torch with CUDA for device buffers") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("tensorrt: no CUDA GPU visible (torch.cuda.is_available() is False); "
                           "TensorRT needs an NVIDIA GPU and driver")
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def _logger() -> trt.ILogger:
    """Route TensorRT's messages to logging (the CLI owns the terminal)."""
    import tensorrt as trt

    class Bridge(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            level = {trt.ILogger.INTERNAL_ERROR: logging.ERROR, trt.ILogger.ERROR: logging.ERROR,
                     trt.ILogger.WARNING: logging.WARNING}.get(severity, logging.DEBUG)
            log.log(level, "TensorRT: %s", msg)

    return Bridge()


def engine_key(onnx_sha: str, opts: BuildOptions, gpu: tuple[str, str], trt_version: str) -> str:
    blob = json.dumps({"onnx": onnx_sha, "build": asdict(opts), "gpu": gpu, "tensorrt": trt_version},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_engine(onnx_path: Path, image_size: int, opts: BuildOptions, timing_cache: Path,
                 logger: trt.ILogger) -> bytes:
    """Parse ONNX into a strongly-typed network, one profile over the batch range, serialize."""
    import tensorrt as trt

    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 10; in 11 every network is strongly typed
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0] if errors else "unknown error"
        raise BackendError(f"tensorrt: cannot parse {onnx_path.name}: {first}")
    config = builder.create_builder_config()
    if opts.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    chw = [3, image_size, image_size]
    profile.set_shape(INPUT_NAME, trt.Dims([opts.min_batch, *chw]), trt.Dims([opts.opt_batch, *chw]),
                      trt.Dims([opts.max_batch, *chw]))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"tensorrt: building an engine from {onnx_path.name} failed "
                           "(run with --verbose for TensorRT's log)")
    artifacts.atomic_write(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def engine_file(folder: ArtifactFolder | Path, precision: str, opts: BuildOptions
                ) -> tuple[Path, bytes, EngineRecord]:
    """The cached engine for this artifact and these options, rebuilt when it is not trustworthy."""
    opts.check()
    trt_version = _require_trt()
    gpu = _gpu()
    folder = as_folder(folder)
    onnx_path = folder.onnx(precision)
    onnx_sha = folder.sha256(precision)
    key = engine_key(onnx_sha, opts, gpu, trt_version)
    cache_dir = folder.file(ENGINE_DIR)
    cache_dir.mkdir(exist_ok=True)
    engine_path = cache_dir / f"{onnx_path.stem}.{key}.engine"
    sidecar = engine_path.with_suffix(".json")
    if engine_path.is_file() and sidecar.is_file():
        meta = records.read_sidecar(EngineRecord, sidecar)
        if meta is not None and meta.key == key and meta.sha256 == sha256_file(engine_path):
            return engine_path, engine_path.read_bytes(), meta
        log.warning("%s: does not match its record (truncated or changed); rebuilding", engine_path)
    with folder.lock():
        safe_gpu = "".join(c if c.isalnum() else "-" for c in gpu[0])
        timing = cache_dir / f"timing.{safe_gpu}.sm{gpu[1]}.trt{trt_version}.cache"
        blob = build_engine(onnx_path, folder.image_size, opts, timing, _logger())
        meta = EngineRecord(key=key, onnx=onnx_path.name, onnx_sha256=onnx_sha,
                            build=EngineProfile(**asdict(opts)), gpu=gpu[0], compute_capability=gpu[1],
                            tensorrt=trt_version, sha256=hashlib.sha256(blob).hexdigest())
        artifacts.atomic_write(engine_path, blob)
        artifacts.atomic_write(sidecar, json.dumps(records.as_json(meta), indent=2) + "\n")
    return engine_path, blob, meta


class TensorRTRunner(RunnerBase):
    """Device buffers through torch; input shape set per call; optional CUDA graph per batch."""

    def __init__(self, engine: trt.ICudaEngine, info: RunnerInfo, folder: ArtifactFolder, precision: str,
                 opts: BuildOptions, cuda_graph: bool, *, check_finite: bool) -> None:
        super().__init__(info, *onnx_io(folder, precision), check_finite=check_finite)
        import torch

        self.torch = torch
        self.engine: trt.ICudaEngine | None = engine
        self._context: trt.IExecutionContext | None = None
        self.stream: Any = None
        self.opts = opts
        self.cuda_graph = cuda_graph
        self.graphs: dict[int, tuple[Any, Any, Any]] = {}
        self.num_classes = int(self.outputs.shape[-1])

    def _activate(self) -> None:
        if self.engine is None:
            raise BackendError("tensorrt: the engine was released; compile again")
        self._context = self.engine.create_execution_context()
        self.stream = self.torch.cuda.Stream()  # type: ignore[no-untyped-call]

    @property
    def context(self) -> trt.IExecutionContext:
        if self._context is None:
            raise BackendError("tensorrt: runner used after it was closed")
        return self._context

    def _bind(self, x_dev: Any) -> Any:
        batch = int(x_dev.shape[0])
        out = self.torch.empty((batch, self.num_classes), dtype=self.torch.float32, device="cuda")
        self.context.set_input_shape(INPUT_NAME, tuple(x_dev.shape))
        self.context.set_tensor_address(INPUT_NAME, int(x_dev.data_ptr()))
        self.context.set_tensor_address(OUTPUT_NAME, int(out.data_ptr()))
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        batch = x.shape[0]
        if not self.opts.min_batch <= batch <= self.opts.max_batch:
            raise BackendError(f"tensorrt: batch {batch} is outside the engine's profile "
                               f"[{self.opts.min_batch}, {self.opts.max_batch}]; rebuild with --max-batch")
        host = torch.from_numpy(x)
        with torch.cuda.stream(self.stream):
            if self.cuda_graph:
                if batch not in self.graphs:
                    static_in = host.to("cuda", non_blocking=True)
                    out = self._bind(static_in)
                    self.context.execute_async_v3(self.stream.cuda_stream)  # warm-up outside capture
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        self.context.execute_async_v3(self.stream.cuda_stream)
                    self.graphs[batch] = (graph, static_in, out)
                graph, static_in, out = self.graphs[batch]
                static_in.copy_(host, non_blocking=True)
                graph.replay()
            else:
                x_dev = host.to("cuda", non_blocking=True)
                out = self._bind(x_dev)
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise BackendError("tensorrt: execute_async_v3 failed")
            result = out.cpu()
        self.stream.synchronize()
        return np.asarray(result.numpy(), dtype=np.float32)

    def _deactivate(self) -> None:
        self.graphs.clear()
        self._context = None
        self.stream = None


class TensorRTBackend:
    name = "tensorrt"
    precisions = run_by("tensorrt")

    def available(self) -> tuple[bool, str]:
        try:
            version = _require_trt()
            gpu = _gpu()
        except BackendError as e:
            return False, str(e).removeprefix("tensorrt: ")
        return True, f"TensorRT {version} on {gpu[0]} (sm {gpu[1]})"

    def compile(self, folder: ArtifactFolder | str | Path, precision: str, *, threads: int | None = None,
                check_finite: bool = True, min_batch: int = 1, opt_batch: int = 8, max_batch: int = 32,
                workspace_gib: float | None = None, cuda_graph: bool = False) -> TensorRTRunner:
        """Batch range of the engine's one optimization profile, builder workspace, CUDA graphs per
        batch size; `threads` is accepted for a uniform interface and has no effect on a GPU."""
        check_precision(self.name, precision)
        opts = BuildOptions(min_batch, opt_batch, max_batch, workspace_gib)
        opts.check()
        trt_version = _require_trt()
        gpu = _gpu()
        folder = as_folder(folder)
        path, blob, meta = engine_file(folder, precision, opts)
        import tensorrt as trt

        runtime = trt.Runtime(_logger())
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:  # another TensorRT version, or a damaged file: rebuild once
            path.unlink(missing_ok=True)
            path, blob, meta = engine_file(folder, precision, opts)
            engine = runtime.deserialize_cuda_engine(blob)
            if engine is None:
                raise BackendError(f"tensorrt: cannot deserialize {path} even after rebuilding it")
        info = RunnerInfo(backend=self.name, precision=precision,
                          executed=f"{precision} (strongly typed from {meta.onnx})",
                          device=f"cuda:0 {gpu[0]} (sm {gpu[1]})", artifact=str(path),
                          details={"tensorrt": trt_version, "build": asdict(opts),
                                   "cuda_graph": cuda_graph})
        return TensorRTRunner(engine, info, folder, precision, opts, cuda_graph,
                              check_finite=check_finite)


BACKEND = TensorRTBackend()
