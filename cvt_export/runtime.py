"""The one recipe for an ONNX Runtime session: export validation, probes, calibration checks and
the ORT backend all open files through here, so they agree on logging, threads and graph
optimization (and a change of recipe is made once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from cvt_export import machine

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
CPU = "CPUExecutionProvider"
Optimization = Literal["all", "none"]


def ort_session(model: Path | bytes, *, provider: str = CPU, threads: int | None = None,
                optimization: Optimization = "all", optimized_path: Path | None = None,
                profile_prefix: Path | None = None) -> Any:
    """An InferenceSession on `provider` (ORT's own warnings silenced: the caller reports).

    `threads` pins the intra-op pool (and one inter-op thread) for comparable runs; `optimization
    = "none"` keeps every graph tensor as exported (probes read them by name); `optimized_path`
    makes ORT write the graph it really runs there; `profile_prefix` turns ORT's profiler on, its
    trace written under that prefix (read it with `session.end_profiling()`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # On x86 CPUs without VNNI, ORT's u8·s8 INT8 kernels sum pairs in 16 bits and saturate
    # (cvt-13 INT8: cosine 0.975 instead of 0.9965 on an AVX2-only EPYC); this makes ORT use
    # u8·u8 there. Not where VNNI/AMX exist: their u8·s8 sums are exact, and the flag would force
    # the slower u8·u8 kernels there too (367 vs 826 GMAC/s on a 2-core AVX-512 VNNI EPYC).
    if not machine.int8_dot_exact():
        so.add_session_config_entry("session.x64quantprecision", "1")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimization == "all"
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=[provider])


def run_logits(session: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], dtype=np.float32)
