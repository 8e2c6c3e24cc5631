"""PyTorch: the reference in FP32, and the paths a user would compare against.

The model comes from the artifact folder's manifest (variant, weights, activation, image size,
classes), so the reference the harness compares with is the one the ONNX files were exported
from; a weights file whose sha256 differs from the manifest's is refused.
- fp32: eager, as in `cvt_ref` (BatchNorm kept, exactly the reference).
- bf16: the model cast to bfloat16 (CPU with BF16 support, or CUDA).
- fp16: CUDA only.
- `compile=True`: `torch.compile` (inductor) on any of them.
`threads=` applies to this runner's calls only: torch's process-wide thread count is restored
after each call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cvt_export.artifacts import ArtifactFolder, as_folder
from cvt_export.backends import (
    BackendError,
    BackendUnavailable,
    RunnerBase,
    RunnerInfo,
    TensorSpec,
    check_precision,
    check_threads,
    timed_median_ms,
)
from cvt_export.machine import cpu_name
from cvt_export.precisions import get as precision_of
from cvt_export.precisions import run_by
from cvt_export.reference import reference_model
from cvt_export.runtime import INPUT_NAME, OUTPUT_NAME


def cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class TorchRunner(RunnerBase):
    def __init__(self, folder: ArtifactFolder, dtype: Any, device: str,
                 compile: bool, threads: int | None, info: RunnerInfo, *, check_finite: bool) -> None:
        variant = folder.variant
        size = variant.image_size
        super().__init__(info, TensorSpec(INPUT_NAME, ("batch", 3, size, size)),
                         TensorSpec(OUTPUT_NAME, ("batch", variant.num_classes)), check_finite=check_finite)
        self.folder = folder
        self.dtype, self.device, self.compile, self.threads = dtype, device, compile, threads
        self.model: Any = None

    def _activate(self) -> None:
        import torch

        module: Any = reference_model(self.folder).to(device=self.device, dtype=self.dtype)
        self.model = torch.compile(module) if self.compile else module

    def _deactivate(self) -> None:
        self.model = None
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        if not self.threads:
            return self._forward(x)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._forward(x)
        finally:
            torch.set_num_threads(before)

    def gemm_rate(self, m: int, k: int, n: int, runs: int) -> float:
        """torch.matmul of an [m, k] and a [k, n] tensor in this runner's dtype, device and threads."""
        import torch

        gen = torch.Generator().manual_seed(1)
        a = torch.randn(m, k, generator=gen).to(self.device, self.dtype)
        b = (torch.randn(k, n, generator=gen) / k ** 0.5).to(self.device, self.dtype)
        c = torch.empty(m, n, device=self.device, dtype=self.dtype)  # the GEMM, not an allocation
        cuda = self.device == "cuda"

        def call() -> None:
            torch.matmul(a, b, out=c)
            if cuda:
                torch.cuda.synchronize()

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                ms = timed_median_ms(call, runs)
        finally:
            torch.set_num_threads(before)
        return m * k * n / ms / 1e6

    def _forward(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(x).to(self.device, self.dtype))
            return out.float().cpu().numpy()


class TorchBackend:
    name = "torch"
    precisions = run_by("torch")

    def available(self) -> tuple[bool, str]:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        bf16 = "CPU BF16 supported" if cpu_has_bf16() else "no CPU BF16"
        return True, f"torch {torch.__version__}; {gpu}; {bf16}"

    def compile(self, folder: ArtifactFolder | str | Path, precision: str, *, threads: int | None = None,
                check_finite: bool = True, device: str = "cpu", compile: bool = False) -> TorchRunner:
        """`device`: cpu or cuda; `compile`: run through torch.compile (inductor)."""
        import torch

        check_precision(self.name, precision)
        if device not in ("cpu", "cuda"):
            raise BackendError(f"torch: unknown device {device!r}; use cpu or cuda")
        check_threads(self.name, threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("torch: no CUDA device here (torch.cuda.is_available() is False)")
        dtype = getattr(torch, precision_of(precision).dtype)
        if dtype == torch.float16 and device != "cuda":
            raise BackendUnavailable(f"torch: {precision} runs on CUDA only; use bf16 on the CPU")
        if dtype == torch.bfloat16 and device == "cpu" and not cpu_has_bf16():
            raise BackendUnavailable("torch: this CPU has no BF16 support in oneDNN")
        folder = as_folder(folder)
        where = (f"cuda:0 {torch.cuda.get_device_name(0)}" if device == "cuda"
                 else f"CPU: {cpu_name()} ({threads or torch.get_num_threads()} threads)")
        info = RunnerInfo(backend=self.name, precision=precision,
                          executed=f"{precision} ({'torch.compile' if compile else 'eager'})",
                          device=where, artifact=f"{folder.weights_spec} ({folder.variant_name})",
                          details={"torch": torch.__version__, "compile": compile})
        return TorchRunner(folder, dtype, device, compile, threads, info, check_finite=check_finite)


BACKEND = TorchBackend()
