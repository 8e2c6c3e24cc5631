"""ONNX Runtime: the CPU EP with every graph optimization (CUDA / TensorRT EPs when installed).

The session's optimized graph is saved beside the artifacts (`ort/<file>.<ep>.opt.onnx`) so
a user can open what really runs; a sidecar records the sha256 of the file it was made from
and its own, so a re-export or a truncated copy makes it be written again. Threads: ORT's
default is one per physical core; pass `threads=` to pin it for comparable runs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cvt_export import artifacts, records
from cvt_export.artifacts import ArtifactFolder, as_folder
from cvt_export.backends import (
    BackendError,
    BackendUnavailable,
    Profile,
    RunnerBase,
    RunnerInfo,
    check_precision,
    check_threads,
    kernel_precision,
    onnx_io,
    timed_median_ms,
)
from cvt_export.machine import cpu_name
from cvt_export.precisions import get as precision_of
from cvt_export.precisions import run_by
from cvt_export.records import OptimizedGraph
from cvt_export.runtime import CPU, INPUT_NAME, OUTPUT_NAME, ort_session
from cvt_ref.errors import first_line
from cvt_ref.source import sha256_file

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": CPU, "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
OPT_DIR = "ort"


def optimized_copy(folder: ArtifactFolder, path: Path, device: str, source_sha: str
                   ) -> tuple[Path, Path | None]:
    """(where the optimized graph lives, where ORT should write it now or None if it is current)."""
    saved = folder.file(f"{OPT_DIR}/{path.stem}.{device}.opt.onnx")
    meta = records.read_sidecar(OptimizedGraph, saved.with_suffix(".json"))
    if (meta is not None and meta.made_from == source_sha and saved.is_file()
            and sha256_file(saved) == meta.sha256):
        return saved, None
    try:
        saved.parent.mkdir(exist_ok=True)
        artifacts.check_writable(saved.parent, "optimized-graph folder")
    except (OSError, artifacts.ArtifactError):
        log.warning("ort: %s is not writable; the optimized graph is not saved", saved.parent)
        return saved, None
    return saved, saved.with_name(f".{saved.name}.{os.getpid()}.tmp")


class OrtRunner(RunnerBase):
    def __init__(self, path: Path, provider: str, threads: int | None, info: RunnerInfo,
                 folder: ArtifactFolder, precision: str, *, check_finite: bool,
                 save: tuple[Path, Path | None],
                 source_sha: str) -> None:
        super().__init__(info, *onnx_io(folder, precision), check_finite=check_finite)
        self.path, self.provider, self.threads = path, provider, threads
        self.save, self.source_sha = save, source_sha
        self.session: Any = None

    def _activate(self) -> None:
        saved, tmp = self.save
        try:
            self.session = self._session(tmp)
        except BackendError:
            if tmp is None:
                raise
            # the saved graph is a cache: when writing it fails (a full disk makes ORT say
            # "Protobuf serialization failed"), the model runs without it
            tmp.unlink(missing_ok=True)
            log.warning("ort: the optimized graph could not be saved in %s; running without it", saved.parent)
            self.save, tmp = (saved, None), None
            self.session = self._session(None)
        if tmp is not None and tmp.exists():
            os.replace(tmp, saved)
            record = OptimizedGraph(made_from=self.source_sha, sha256=sha256_file(saved))
            artifacts.atomic_write(saved.with_suffix(".json"),
                                   json.dumps(records.as_json(record), indent=1) + "\n")
            self.save = (saved, None)
        used = self.threads or self.session.get_session_options().intra_op_num_threads or os.cpu_count()
        self.info.details["threads"] = used
        self.info.device = f"{self.info.device.rsplit(' (', 1)[0]} ({used} threads)"

    def _session(self, optimized_path: Path | None) -> Any:
        try:
            return ort_session(self.path, provider=self.provider, threads=self.threads,
                               optimized_path=optimized_path)
        except Exception as e:  # ORT raises its own types for bad files
            raise BackendError(f"ort: cannot load {self.path}: {first_line(e)}") from None

    def _deactivate(self) -> None:
        self.session = None

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def profile(self, x: np.ndarray, runs: int) -> Profile:
        """ORT's own profiler on a session like this runner's (same file, provider, threads):
        two untimed runs, then `runs` profiled ones; each node's kernel time in the median run."""
        import tempfile

        x = self.check_input(x)
        with tempfile.TemporaryDirectory(prefix="cvt-ort-profile-") as tmp:
            session = ort_session(self.path, provider=self.provider, threads=self.threads,
                                  profile_prefix=Path(tmp) / "ort")
            for _ in range(2 + runs):
                session.run([OUTPUT_NAME], {INPUT_NAME: x})
            events = json.loads(Path(session.end_profiling()).read_text())
        return ort_profile(events, skip=2)

    def gemm_rate(self, m: int, k: int, n: int, runs: int) -> float:
        import onnxruntime as ort

        from cvt_export.derive import gemm_model

        session = ort_session(gemm_model(m, k, n, self.info.precision),
                              provider=self.provider, threads=self.threads)
        x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        # the GEMM, not copies: both operands bound once on the provider's device, the output reused
        device = "cpu" if self.provider == CPU else "cuda"
        binding = session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(x, device, 0))
        binding.bind_ortvalue_output(OUTPUT_NAME, ort.OrtValue.ortvalue_from_numpy(
            np.empty((m, n), np.float32), device, 0))
        ms = timed_median_ms(lambda: session.run_with_iobinding(binding), runs)
        return m * k * n / ms / 1e6


class OrtBackend:
    name = "ort"
    precisions = run_by(name)

    def probe(self, folder: ArtifactFolder | str | Path, precision: str, names: list[str], x: np.ndarray, *,
              threads: int | None = None) -> dict[str, np.ndarray]:
        """The named intermediate tensors (and the logits) for input x, as float32."""
        import onnx

        from cvt_export.probes import with_outputs

        path = as_folder(folder).onnx(precision)
        proto = with_outputs(onnx.load(str(path)), names)
        session = ort_session(proto.SerializeToString(), threads=threads)
        wanted = [*names, OUTPUT_NAME]
        values = session.run(wanted, {INPUT_NAME: x})
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(wanted, values, strict=True)}

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)"
        return True, f"onnxruntime {ort.__version__}; providers {', '.join(ort.get_available_providers())}"

    def compile(self, folder: ArtifactFolder | str | Path, precision: str, *, threads: int | None = None,
                check_finite: bool = True, device: str = "cpu") -> OrtRunner:
        """`device`: cpu, cuda or tensorrt (ORT's execution providers; the last two need onnxruntime-gpu)."""
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"ort: {why}")
        import onnxruntime as ort

        check_precision(self.name, precision)
        check_threads(self.name, threads)
        provider = PROVIDERS.get(device)
        if provider is None:
            raise BackendError(f"ort: unknown device {device!r}; use {', '.join(PROVIDERS)}")
        if provider not in ort.get_available_providers():
            raise BackendUnavailable(f"ort: {provider} is not in this onnxruntime build "
                               f"({ort.get_available_providers()}); install onnxruntime-gpu")
        folder = as_folder(folder)
        path = folder.onnx(precision)
        source_sha = folder.sha256(precision)
        save = optimized_copy(folder, path, device, source_sha)
        executed = precision
        if precision_of(precision).dtype == "float16" and device == "cpu":
            executed = f"{precision} (CPU EP casts to fp32 where it lacks fp16 kernels)"
        where = cpu_name() if device == "cpu" else provider
        info = RunnerInfo(
            backend=self.name, precision=precision, executed=executed,
            device=f"{device}: {where} ({threads or 'default'} threads)",
            artifact=str(path),
            details={"onnxruntime": ort.__version__, "provider": provider,
                     "optimized_model": str(save[0]), "threads": threads})
        return OrtRunner(path, provider, threads, info, folder, precision, check_finite=check_finite,
                         save=save,
                         source_sha=source_sha)


BACKEND = OrtBackend()


def ort_profile(events: list[dict[str, Any]], skip: int) -> Profile:
    """ORT's trace events -> each node's kernel time in the median of the runs after the first
    `skip` (a node's events are placed in a run by their start time; a node a run did not execute
    counts 0 ms there)."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[skip:]
    if not runs:
        raise BackendError("ort: the profile holds no model run")
    times: dict[str, np.ndarray] = {}
    kind: dict[str, tuple[str, str, str]] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        run = next((i for i, (a, b) in enumerate(runs) if a <= e["ts"] <= b), None)
        if run is None:
            continue
        node = name[: -len("_kernel_time")]
        args = e.get("args", {})
        inputs = args.get("input_type_shape") or [{}]
        first = next(iter(inputs[0]), "") if isinstance(inputs[0], dict) else ""
        kind[node] = (args.get("op_name", ""), args.get("provider", ""), kernel_precision(first))
        times.setdefault(node, np.zeros(len(runs)))[run] += e["dur"] / 1000
    return Profile.of_median_run(kind, times, [(b - a) / 1000 for a, b in runs])
