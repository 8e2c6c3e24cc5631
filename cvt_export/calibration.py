"""Calibration images and the cache of their statistics, keyed by what determines them.

The key hashes the images' bytes (not their names), the preprocessing, the FP32 model file,
the method and the quantizer's version: change any of them and calibration runs again;
change none and a second export reuses the ranges without reading a pixel through the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

import cvt_ref
from cvt_export import artifacts
from cvt_export.precision import Int8Options
from cvt_ref.errors import CvtError
from cvt_ref.preprocess import IMAGE_SUFFIXES, check_image, list_images
from cvt_ref.source import sha256_file
from cvt_ref.variants import Variant

log = logging.getLogger(__name__)


class CalibrationError(CvtError):
    """A calibration folder that is missing, empty, or holds too few readable images."""


def cache_dir() -> Path:
    """`$CVT_EXPORT_CACHE`, else `$XDG_CACHE_HOME/cvt-export`, else `~/.cache/cvt-export`."""
    if env := os.environ.get("CVT_EXPORT_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cvt-export"


def default_calibration_set() -> list[Path]:
    """Every other bundled photograph (the rest stay held out to measure INT8 fidelity)."""
    return cvt_ref.bundled_photos()[0::2]


@dataclass(frozen=True)
class CalibrationSet:
    paths: tuple[Path, ...]
    digests: tuple[str, ...]  # sha256 of each file's bytes, same order
    source: str               # the folder, or "bundled photos"
    asked: int | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.digests).encode()).hexdigest()

    def load(self, variant: Variant) -> np.ndarray:
        """The images through the reference preprocessing, [N, 3, H, W] float32."""
        return cvt_ref.preprocess_batch(list(self.paths), variant).numpy()


def spread(paths: list[Path], n: int) -> list[Path]:
    """n paths evenly spaced over the sorted list, so a subset covers every class folder."""
    if n >= len(paths):
        return paths
    return [paths[int(i * len(paths) / n)] for i in range(n)]


def calibration_set(folder: Path | None, size: int | None = None) -> tuple[CalibrationSet, str | None]:
    """The images to calibrate on, and a warning when there are fewer than asked."""
    if size is not None and size < 1:
        raise CalibrationError(f"--calib-size {size}: must be at least 1")
    if folder is None:
        paths, source = default_calibration_set(), "bundled photos"
    else:
        if not folder.exists():
            raise CalibrationError(f"--calib {folder}: no such folder")
        if not folder.is_dir():
            raise CalibrationError(f"--calib {folder}: is a file; give a folder of images")
        paths, source = list_images(folder), str(folder)
        if not paths:
            raise CalibrationError(f"--calib {folder}: holds no images "
                                   f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    warning = None
    if size is not None and size > len(paths):
        warning = (f"calibration: {size} images asked, {source} has {len(paths)}; "
                   f"calibrating on {len(paths)}")
    chosen = spread(paths, size or len(paths))
    for path in chosen:  # an unreadable image or a decompression bomb is refused before the export
        check_image(path)
    return CalibrationSet(tuple(chosen), tuple(sha256_file(p) for p in chosen), source, size), warning


def unused_rows(paths: list[Path], digests: list[str] | tuple[str, ...]) -> list[int]:
    """Indices of the files whose content (sha256) is not among the calibration images'."""
    used = set(digests)
    return [i for i, p in enumerate(paths) if sha256_file(p) not in used]


def cache_key(calib: CalibrationSet, variant: Variant, model_sha256: str, opts: Int8Options) -> str:
    parts = {
        "images": calib.sha256, "model": model_sha256, "method": opts.method, "policy": opts.policy,
        "percentile": opts.percentile if opts.method == "percentile" else None,
        "preprocess": [variant.image_size, variant.resize_size, variant.crop, variant.mean, variant.std],
        "onnxruntime": version("onnxruntime"), "schema": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_dir() / "calibration" / f"{key}.json"


def usable_cache(key: str, fallback: Path) -> tuple[Path, str | None]:
    """The cache file for `key`, or, when the cache folder cannot be written (a path that is a
    file, a read-only disk), a private file under `fallback` and a warning: a cache is an
    optimisation, never a reason to fail an export."""
    path = cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.check_writable(path.parent, "calibration cache")
        return path, None
    except (OSError, artifacts.ArtifactError) as e:
        private = fallback / ".calibration" / f"{key}.json"
        private.parent.mkdir(parents=True, exist_ok=True)
        why = e.strerror if isinstance(e, OSError) else "cannot write there"
        return private, (f"calibration cache {cache_dir()} is not writable ({why}); "
                         "calibrated without caching (set CVT_EXPORT_CACHE to a writable folder)")
