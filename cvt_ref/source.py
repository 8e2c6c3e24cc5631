"""Where a model's weights came from: a small leaf (no torch) that the model, the weight
loaders, manifests and reports all refer to."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Activation = Literal["gelu", "quick_gelu"]


@dataclass(frozen=True)
class WeightsSource:
    """What was loaded, for manifests and reports."""

    spec: str                 # what the user passed
    kind: str                 # random | transformers | original | native
    activation: Activation    # the activation the checkpoint was trained with
    sha256: str | None = None  # of the weights file; None for random
    path: Path | None = None
    id2label: Mapping[int, str] | None = field(default=None, repr=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
