"""The one recipe for an ONNX Runtime session: export validation, probes, calibration checks and
the ORT backend all open files through here, so they agree on logging, threads and graph
optimization (and a change of recipe is made once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
CPU = "CPUExecutionProvider"
Optimization = Literal["all", "none"]


def ort_session(model: Path | bytes, *, provider: str = CPU, threads: int | None = None,
                optimization: Optimization = "all", optimized_path: Path | None = None) -> Any:
    """An InferenceSession on `provider` (ORT's own warnings silenced: the caller reports).

    `threads` pins the intra-op pool (and one inter-op thread) for comparable runs; `optimization
    = "none"` keeps every graph tensor as exported (probes read them by name); `optimized_path`
    makes ORT write the graph it really runs there."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimization == "all"
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=[provider])


def run_logits(session: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], dtype=np.float32)
