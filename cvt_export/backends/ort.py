"""ONNX Runtime: the CPU EP with every graph optimization (CUDA / TensorRT EPs when installed).

The session's optimized graph is saved beside the artifacts (`ort/<file>.<ep>.opt.onnx`) so
a user can open what really runs. Threads: ORT's default is one per physical core; pass
`threads=` to pin it for comparable runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cvt_export import artifacts
from cvt_export.backends import BackendError, RunnerBase, RunnerInfo
from cvt_export.onnx import INPUT_NAME, OUTPUT_NAME
from cvt_ref.errors import first_line

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


class OrtRunner(RunnerBase):
    def __init__(self, session: Any, info: RunnerInfo, image_size: int, fixed: int | None) -> None:
        super().__init__(info, image_size, fixed)
        self.session: Any = session

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def close(self) -> None:
        self.session = None


class OrtBackend:
    name = "ort"
    precisions = ("fp32", "fp16", "int8")

    def probe(self, folder: Path, precision: str, names: list[str], x: np.ndarray,
              threads: int | None = None) -> dict[str, np.ndarray]:
        """The named intermediate tensors (and the logits) for input x, as float32."""
        import onnx
        import onnxruntime as ort

        from cvt_export.probes import with_outputs

        path, _ = artifacts.onnx_file(folder, precision)
        proto = with_outputs(onnx.load(str(path)), names)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        wanted = [*names, OUTPUT_NAME]
        values = session.run(wanted, {INPUT_NAME: x})
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(wanted, values, strict=True)}

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)"
        return True, f"onnxruntime {ort.__version__}; providers {', '.join(ort.get_available_providers())}"

    def compile(self, folder: Path, precision: str, *, device: str = "cpu", threads: int | None = None,
                **options: Any) -> OrtRunner:
        ok, why = self.available()
        if not ok:
            raise BackendError(f"ort: {why}")
        import onnxruntime as ort

        if precision not in self.precisions:
            raise BackendError(f"ort runs {', '.join(self.precisions)}, not {precision!r}")
        provider = PROVIDERS.get(device)
        if provider is None:
            raise BackendError(f"ort: unknown device {device!r}; use {', '.join(PROVIDERS)}")
        if provider not in ort.get_available_providers():
            raise BackendError(f"ort: {provider} is not in this onnxruntime build "
                               f"({ort.get_available_providers()}); install onnxruntime-gpu")
        path, manifest = artifacts.onnx_file(folder, precision)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        saved = folder / "ort" / f"{path.stem}.{device}.opt.onnx"
        if not saved.exists():
            saved.parent.mkdir(exist_ok=True)
            tmp = saved.with_name(f".{saved.name}.{os.getpid()}.tmp")
            so.optimized_model_filepath = str(tmp)
        try:
            session = ort.InferenceSession(str(path), so, providers=[provider])
        except Exception as e:  # ORT raises its own types for bad files
            raise BackendError(f"ort: cannot load {path}: {first_line(e)}") from None
        if so.optimized_model_filepath and Path(so.optimized_model_filepath).exists():
            os.replace(so.optimized_model_filepath, saved)
        fixed = manifest["source"]["batch"]
        threads_used = threads or session.get_session_options().intra_op_num_threads or os.cpu_count()
        executed = precision
        if precision == "fp16" and device == "cpu":
            executed = "fp16 (CPU EP casts to fp32 where it lacks fp16 kernels)"
        info = RunnerInfo(
            backend=self.name, precision=precision, executed=executed,
            device=f"{device}: {cpu_name() if device == 'cpu' else provider} ({threads_used} threads)",
            artifact=str(path),
            details={"onnxruntime": ort.__version__, "provider": provider,
                     "optimized_model": str(saved), "threads": threads_used})
        return OrtRunner(session, info, manifest["source"]["image_size"],
                         None if fixed == "dynamic" else int(fixed))


BACKEND = OrtBackend()
