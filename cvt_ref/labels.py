"""ImageNet-1k class names: the checkpoint's id2label when it has one, else the bundled list."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path

_TSV = Path(__file__).parent / "data" / "imagenet1k.tsv"


@cache
def _bundled() -> tuple[tuple[str, str], ...]:
    rows = [line.split("\t", 1) for line in _TSV.read_text().splitlines() if line]
    return tuple((wnid, name) for wnid, name in rows)


def imagenet_synsets() -> list[str]:
    """WordNet ids (n01440764...) in class-index order: ImageFolder layouts use them."""
    return [wnid for wnid, _ in _bundled()]


def imagenet_labels() -> list[str]:
    return [name for _, name in _bundled()]


def class_names(num_classes: int, id2label: Mapping[int, str] | None = None) -> list[str]:
    if id2label and len(id2label) == num_classes:
        return [id2label[i] for i in range(num_classes)]
    if num_classes == 1000:
        return imagenet_labels()
    return [f"class {i}" for i in range(num_classes)]
