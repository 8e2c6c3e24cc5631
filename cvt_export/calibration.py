"""Calibration images and the cache of their statistics, keyed by what determines them.

The key hashes the images' bytes and views (not their names), the preprocessing, the FP32 model file,
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
from typing import TypeVar

from cvt_export import artifacts, imageset
from cvt_export.derive import Int8Options
from cvt_ref.errors import CvtError
from cvt_ref.preprocess import IMAGE_SUFFIXES, check_image, list_images
from cvt_ref.source import sha256_file
from cvt_ref.variants import Variant

log = logging.getLogger(__name__)
T = TypeVar("T")


class CalibrationError(CvtError):
    """A calibration folder that is missing, empty, or holds too few readable images."""


def cache_dir() -> Path:
    """`$CVT_EXPORT_CACHE`, else `$XDG_CACHE_HOME/cvt-export`, else `~/.cache/cvt-export`."""
    if env := os.environ.get("CVT_EXPORT_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cvt-export"


def default_calibration_set() -> list[imageset.Item]:
    """The evaluation set's calibration role: every third bundled photograph, as it is (its views
    stay out of selection and confirmation). Not its views: min-max ranges over the 60 views of
    these 6 photographs gave cvt-13 (random:0) INT8 cosine 0.98651 on the other golden photos,
    against 0.99764 from the 6 photographs alone (2026-11-30): more inputs, wider ranges."""
    return [imageset.Item(p, "full", p.name) for p in imageset.default_calibration_sources()]


@dataclass(frozen=True)
class CalibrationSet:
    items: tuple[imageset.Item, ...]
    digests: tuple[str, ...]       # sha256 of each item's file's bytes, same order
    fingerprints: tuple[str, ...]  # decoded-content fingerprint of each distinct file
    distinct: int                  # distinct images (views of one photograph, copies: one)
    source: str                    # the folder, or "bundled photos"
    asked: int | None

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(it.path for it in self.items)

    @property
    def names(self) -> list[str]:
        return [it.name for it in self.items]

    @property
    def sha256(self) -> str:
        views = [it.view for it in self.items]
        if set(views) == {"full"}:  # plain files: the key earlier exports recorded
            return hashlib.sha256("\n".join(self.digests).encode()).hexdigest()
        return hashlib.sha256("\n".join(f"{d} {v}" for d, v in zip(self.digests, views, strict=True))
                              .encode()).hexdigest()

    def load(self, variant: Variant) -> imageset.Pixels:
        """The images through the reference preprocessing, decoded a batch at a time when read."""
        return imageset.Pixels(self.items, variant)

    def few_warning(self) -> str | None:
        """Said in the export's output and recorded in the manifest when there are too few."""
        if self.distinct >= imageset.MIN_CALIBRATION:
            return None
        return (f"calibration: INT8 ranges from {self.distinct} distinct images ({len(self.items)} "
                f"inputs) of {self.source}, fewer than {imageset.MIN_CALIBRATION}; a real "
                f"calibration set is a few hundred images like the ones you will serve "
                f"(~{imageset.RECOMMENDED_CALIBRATION}, NNCF's default): pass --calib DIR")


def spread(paths: list[T], n: int) -> list[T]:
    """n items evenly spaced over the sorted list, so a subset covers every class folder."""
    if n >= len(paths):
        return paths
    return [paths[int(i * len(paths) / n)] for i in range(n)]


def calibration_set(folder: Path | None, size: int | None = None) -> tuple[CalibrationSet, str | None]:
    """The images to calibrate on, and a warning when there are fewer than asked."""
    if size is not None and size < 1:
        raise CalibrationError(f"--calib-size {size}: must be at least 1")
    items: list[imageset.Item] = []
    paths: list[Path] = []
    if folder is None:
        items, source = default_calibration_set(), "bundled photos"
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
    have = len(items) if folder is None else len(paths)
    if size is not None and size > have:
        warning = f"calibration: {size} images asked, {source} has {have}; calibrating on {have}"
    if folder is None:
        chosen = spread(items, size or len(items))
    else:
        paths = spread(paths, size or len(paths))
        for path in paths:  # an unreadable image or a decompression bomb is refused before the export
            check_image(path)
        chosen = imageset.file_items(paths)
    digests = {p: sha256_file(p) for p in dict.fromkeys(it.path for it in chosen)}
    calib = CalibrationSet(tuple(chosen), tuple(digests[it.path] for it in chosen),
                           tuple(imageset.source_fingerprints(chosen)),
                           len({it.group for it in chosen}), source, size)
    return calib, warning


def cache_key(calib: CalibrationSet, variant: Variant, model_sha256: str, opts: Int8Options) -> str:
    parts = {
        "images": calib.sha256, "model": model_sha256, "method": opts.method, "policy": opts.policy,
        "percentile": opts.percentile if opts.method == "percentile" else None,
        "preprocess": [variant.image_size, variant.resize_size, variant.crop, variant.mean, variant.std],
        "onnxruntime": version("onnxruntime"), "schema": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def request_key(calib: CalibrationSet, variant: Variant, model_sha256: str, opts: Int8Options,
                smooth_search: tuple[float | None, ...]) -> str:
    """What an INT8 export was asked for (its reuse key): the cache key, or, when the migration
    strength is chosen among `smooth_search`, the key of the search itself."""
    key = cache_key(calib, variant, model_sha256, opts)
    if not smooth_search:
        return key
    return hashlib.sha256(f"{key} smooth-search {list(smooth_search)}".encode()).hexdigest()[:32]


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
