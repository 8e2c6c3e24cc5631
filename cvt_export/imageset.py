"""Images by role: calibration, selection and confirmation, never the same image in two.

- **Identity by decoded content.** An image's fingerprint is a 256-bit difference hash of its
  decoded pixels (grey, 17x16, each bit: is a pixel brighter than its left neighbour). A
  re-encoded, re-compressed or resized copy differs in a few bits; two different photographs
  in about half of them. Two images are the same when at most `SAME_BITS` bits differ, so a
  JPEG copy of a calibration image written to another folder is still a calibration image.
- **Groups.** Views of one source (crops, flips, a half-scale copy) share the source's group;
  the images of a user's folder that are copies of one another share one. Roles are given per
  group, so views of one photograph never straddle roles.
- **Roles.** A group any of whose images matches a calibration image is `calibration`; the other
  groups, in a fixed order, alternate `selection` (what tune and the recommendation decide on)
  and `confirmation` (what reports state, and what tune checks its choice on).
- **The bundled evaluation set**: the 17 bundled photographs (`cvt_ref/data/photos`,
  `cvt_ref/data/more-photos`), each in `len(VIEWS)` deterministic views. Its default calibration
  role is every third source in name order; the rest alternate selection and confirmation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cvt_export.records import RoleSize
from cvt_ref.preprocess import load_image, preprocess_array, to_rgb
from cvt_ref.variants import Variant

ROLES = ("calibration", "selection", "confirmation")
SAME_BITS = 48  # of 256: copies measured at <= 40 (JPEG q40, 0.3x), distinct bundled photographs at >= 73
# (name, crop box as fractions (left, top, right, bottom), scale) per view; each also mirrored
_BASE_VIEWS = (("full", (0.0, 0.0, 1.0, 1.0), 1.0), ("half", (0.0, 0.0, 1.0, 1.0), 0.5),
               ("center80", (0.1, 0.1, 0.9, 0.9), 1.0), ("topleft70", (0.0, 0.0, 0.7, 0.7), 1.0),
               ("bottomright70", (0.3, 0.3, 1.0, 1.0), 1.0))
VIEWS = tuple(name if not flip else f"{name}-flip" for flip in (False, True) for name, _, _ in _BASE_VIEWS)
MIN_CALIBRATION = 32       # fewer distinct calibration images than this: warned, in output and manifest
RECOMMENDED_CALIBRATION = 300  # NNCF's default subset size; what a real calibration set looks like


def fingerprint(image: Image.Image) -> str:
    grey = to_rgb(image).convert("L").resize((17, 16), Image.Resampling.BOX)
    a = np.asarray(grey, dtype=np.int16)
    return np.packbits(a[:, 1:] > a[:, :-1]).tobytes().hex()


def distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def matches(fp: str, known: Iterable[str]) -> bool:
    return any(distance(fp, k) <= SAME_BITS for k in known)


@dataclass(frozen=True)
class Item:
    """One input: a file, or a view of a file. `group` is what roles are given by."""

    path: Path
    view: str = "full"
    group: str = ""

    @property
    def name(self) -> str:
        return self.path.name if self.view == "full" else f"{self.path.name}#{self.view}"

    def image(self) -> Image.Image:
        return view_of(load_image(self.path), self.view)


def view_of(image: Image.Image, view: str) -> Image.Image:
    base, flip = (view[:-5], True) if view.endswith("-flip") else (view, False)
    spec = {name: (box, scale) for name, box, scale in _BASE_VIEWS}
    if base not in spec:
        raise ValueError(f"unknown view {view!r}: use {', '.join(VIEWS)}")
    (left, top, right, bottom), scale = spec[base]
    w, h = image.size
    out = image.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))
    if scale != 1.0:
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))),
                         Image.Resampling.LANCZOS)
    return ImageOps.mirror(out) if flip else out


def bundled_sources() -> list[Path]:
    """The evaluation set's sources: every bundled photograph, sorted by file name."""
    from cvt_ref.preprocess import bundled_photos, more_photos

    return sorted([*bundled_photos(), *more_photos()], key=lambda p: p.name)


def bundled_items() -> list[Item]:
    return [Item(p, v, p.name) for p in bundled_sources() for v in VIEWS]


def default_calibration_sources() -> list[Path]:
    return bundled_sources()[0::3]


def file_items(paths: Sequence[Path]) -> list[Item]:
    """A user's files: one item each, copies of one another (by fingerprint) in one group."""
    items: list[Item] = []
    firsts: list[tuple[str, str]] = []  # (fingerprint, group) of each group's first image
    for p in paths:
        fp = fingerprint(load_image(p))
        group = next((g for f, g in firsts if distance(f, fp) <= SAME_BITS), None)
        if group is None:
            group = fp
            firsts.append((fp, group))
        items.append(Item(p, "full", group))
    return items


def source_fingerprints(items: Sequence[Item]) -> list[str]:
    """Fingerprints of the items' decoded files (a view's source, not the view), one per file."""
    seen: dict[Path, str] = {}
    for it in items:
        if it.path not in seen:
            seen[it.path] = fingerprint(load_image(it.path))
    return list(seen.values())


def roles(items: Sequence[Item], calibration: Iterable[str]) -> list[str]:
    """The role of each item, given the calibration images' fingerprints."""
    calibration = list(calibration)
    prints = dict(zip({it.path: None for it in items}, source_fingerprints(items), strict=True))
    calibrated = {it.group for it in items if calibration and matches(prints[it.path], calibration)}
    others = sorted({it.group for it in items} - calibrated)
    role = {g: ("selection", "confirmation")[i % 2] for i, g in enumerate(others)}
    return ["calibration" if it.group in calibrated else role[it.group] for it in items]


def sizes(item_roles: Sequence[str], items: Sequence[Item]) -> dict[str, RoleSize]:
    """Per role: how many inputs and how many distinct groups (photographs)."""
    return {r: RoleSize(inputs=sum(1 for x in item_roles if x == r),
                        sources=len({it.group for it, x in zip(items, item_roles, strict=True) if x == r}))
            for r in ROLES}


def digest(items: Sequence[Item]) -> str:
    """What the items are, for cache keys: each file's bytes and the view."""
    h = hashlib.sha256()
    for it in items:
        h.update(hashlib.sha256(it.path.read_bytes()).digest() + it.view.encode() + b"\n")
    return h.hexdigest()


class Pixels:
    """Calibration inputs as float32[N, 3, H, W], never all in memory: each reader (ONNX Runtime's
    calibration, SmoothQuant's ranges, NNCF) walks them in batches, decoding as it goes, so a
    calibration folder of thousands of images costs one batch of memory. An array can stand in
    for it (`Pixels.of`), as tests do."""

    def __init__(self, items: tuple[Item, ...], variant: Variant | None,
                 array: np.ndarray | None = None) -> None:
        self.items, self.variant, self.array = items, variant, array

    @classmethod
    def of(cls, images: np.ndarray | Pixels) -> Pixels:
        return images if isinstance(images, Pixels) else cls((), None, np.asarray(images))

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.items)

    def slice(self, start: int, stop: int) -> np.ndarray:
        if self.array is not None:
            return self.array[start:stop]
        assert self.variant is not None
        return np.stack([preprocess_array(it.image(), self.variant) for it in self.items[start:stop]])

    def batches(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Batches of `size` inputs from batch index `start` to `stop` (exclusive)."""
        end = len(self) if stop is None else min(len(self), stop * size)
        for i in range(start * size, end, size):
            yield self.slice(i, min(i + size, end))

    def head(self, n: int) -> np.ndarray:
        return self.slice(0, min(n, len(self)))

    def each(self, size: int = 1) -> Batches:
        """Batches as an iterable that starts again each time it is iterated (NNCF walks its
        dataset once per statistics pass)."""
        return Batches(self, size)


@dataclass(frozen=True)
class Batches:
    pixels: Pixels
    size: int

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.pixels.batches(self.size)

    def __len__(self) -> int:
        return -(-len(self.pixels) // self.size)
