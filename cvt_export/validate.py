"""Does an exported file compute what the reference computes? Measured on ONNX Runtime (CPU)
against the PyTorch logits of the same images, judged by the one bounds table in `metrics`.

FP32 outside its bounds is refused (the export is not kept); FP16 and INT8 files are kept and
their figures recorded, with a warning when a bound breaks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cvt_export import metrics, precisions
from cvt_export.exporter import ExportError
from cvt_export.records import Validation
from cvt_export.runtime import ort_session, run_logits
from cvt_ref.model import CvT

BACKEND = "onnxruntime-cpu"  # what validates an exported file


def reference_logits(model: CvT, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(batch)).numpy()


def validation_batches(n: int, fixed: int | None) -> list[slice]:
    """Row ranges to validate on: batch 1 twice and one larger batch (or the fixed size)."""
    if fixed is not None:
        return [slice(0, fixed)]
    return [slice(0, 1), slice(1, 2), slice(0, min(n, 8))]


def validate_fp32(path: Path, images: np.ndarray, ref: np.ndarray, batch: int | None) -> Validation:
    """Max-abs logits error per batch size and top-1 agreement of the file on ONNX Runtime vs
    the reference logits `ref` of `images`; an ExportError when the FP32 bounds break."""
    count = len(images)
    if batch is not None and len(images) < batch:  # repeat rows; np.resize repeats both alike
        images = np.resize(images, (batch, *images.shape[1:]))
        ref = np.resize(ref, (batch, *ref.shape[1:]))
    session = ort_session(path)
    errors: dict[str, float] = {}
    agree: list[float] = []
    for rows in validation_batches(len(images), batch):
        got = run_logits(session, images[rows])
        key = f"batch{rows.stop - rows.start}"
        errors[key] = max(errors.get(key, 0.0), metrics.max_abs(ref[rows], got))
        agree.append(metrics.top1_agreement(ref[rows], got))
    summary = Validation(max_abs=max(errors.values()), top1_agreement=min(agree))
    broken = metrics.within_bounds(precisions.REFERENCE, summary)
    if broken:
        raise ExportError(f"{path.name} on ONNX Runtime differs from PyTorch ({'; '.join(broken)}); "
                          "the export is not kept")
    return Validation(backend=BACKEND, max_abs=errors, top1_agreement=min(agree), images=count,
                      bounds=dict(metrics.BOUNDS[precisions.REFERENCE]))


def measure(path: Path, precision: str, images: np.ndarray, ref: np.ndarray, rows: list[int],
            note: str) -> tuple[Validation, str | None]:
    """Fidelity of a derived file (FP16, INT8) on the given rows, and a warning when it breaks
    its precision's bounds."""
    got = run_logits(ort_session(path), images[rows])
    fid = metrics.fidelity(ref[rows], got)
    broken = metrics.within_bounds(precision, fid)
    warning = (f"{path.name}: outside the {precision} bounds vs the FP32 reference on {note}: "
               + "; ".join(broken)) if broken else None
    return Validation(backend=BACKEND, cosine_min=fid.cosine_min, max_abs=fid.max_abs,
                      top1_agreement=fid.top1_agreement, n=fid.n, cosine_p5=fid.cosine_p5,
                      top1_agreement_ci=fid.top1_agreement_ci, images=len(rows), on=note,
                      bounds=dict(metrics.BOUNDS[precision]), broken=tuple(broken)), warning
