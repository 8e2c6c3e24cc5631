"""Fidelity of a backend's logits against the reference's: pure numpy, always in float64.

float64 on purpose: a float32 dot product of two 1000-long logit rows can be off by 1e-4,
which is the size of the effects these metrics exist to see.
"""

from __future__ import annotations

import numpy as np


def _rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def cosine(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity."""
    a, b = _rows(ref), _rows(got)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, np.finfo(np.float64).tiny)


def max_abs(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(_rows(ref) - _rows(got)).max())


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    return float((_rows(ref).argmax(1) == _rows(got).argmax(1)).mean())


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """The summary the export records per artifact: worst-row cosine, max-abs, top-1 agreement."""
    return {"cosine_min": float(cosine(ref, got).min()), "max_abs": max_abs(ref, got),
            "top1_agreement": top1_agreement(ref, got)}
