"""PyTorch: the reference in FP32, and the paths a user would compare against.

The model comes from the artifact folder's manifest (variant, weights, activation), so the
reference the harness compares with is the one the ONNX files were exported from; a weights
file whose sha256 differs from the manifest's is refused.
- fp32: eager, as in `cvt_ref` (BatchNorm kept, exactly the reference).
- bf16: the model cast to bfloat16 (CPU with BF16 support, or CUDA).
- fp16: CUDA only.
- `compile=True`: `torch.compile` (inductor) on any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cvt_export import artifacts
from cvt_export.backends import BackendError, RunnerBase, RunnerInfo
from cvt_export.backends.ort import cpu_name


def cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class TorchRunner(RunnerBase):
    def __init__(self, model: Any, dtype: Any, device: str, info: RunnerInfo, image_size: int) -> None:
        super().__init__(info, image_size)
        self.model: Any = model
        self.dtype = dtype
        self.device = device

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(x).to(self.device, self.dtype))
            return out.float().cpu().numpy()

    def close(self) -> None:
        self.model = None
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()


class TorchBackend:
    name = "torch"
    precisions = ("fp32", "bf16", "fp16")

    def available(self) -> tuple[bool, str]:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        bf16 = "CPU BF16 supported" if cpu_has_bf16() else "no CPU BF16"
        return True, f"torch {torch.__version__}; {gpu}; {bf16}"

    def compile(self, folder: Path, precision: str, *, device: str = "cpu", compile: bool = False,
                threads: int | None = None, **options: Any) -> TorchRunner:
        import torch

        import cvt_ref

        if precision not in self.precisions:
            raise BackendError(f"torch runs {', '.join(self.precisions)}, not {precision!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch: no CUDA device here (torch.cuda.is_available() is False)")
        if precision == "fp16" and device != "cuda":
            raise BackendError("torch: fp16 runs on CUDA only; use bf16 on the CPU")
        if precision == "bf16" and device == "cpu" and not cpu_has_bf16():
            raise BackendError("torch: this CPU has no BF16 support in oneDNN")
        manifest = artifacts.load_manifest(folder)
        weights = manifest["weights"]
        model = cvt_ref.create_model(manifest["variant"], weights["spec"], activation=weights["activation"])
        if model.weights is not None and weights["sha256"] and model.weights.sha256 != weights["sha256"]:
            raise BackendError(f"torch: {weights['spec']} is not the file {folder} was exported from "
                               "(sha256 differs); re-export or pass the original weights")
        if threads:
            torch.set_num_threads(threads)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        module: Any = model.to(device=device, dtype=dtype).eval()
        if compile:
            module = torch.compile(module)
        where = (f"cuda:0 {torch.cuda.get_device_name(0)}" if device == "cuda"
                 else f"CPU: {cpu_name()} ({torch.get_num_threads()} threads)")
        info = RunnerInfo(backend=self.name, precision=precision,
                          executed=f"{precision} ({'torch.compile' if compile else 'eager'})",
                          device=where, artifact=f"{weights['spec']} ({manifest['variant']})",
                          details={"torch": torch.__version__, "compile": compile})
        return TorchRunner(module, dtype, device, info, manifest["source"]["image_size"])


BACKEND = TorchBackend()
