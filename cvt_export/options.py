"""What an export and an INT8 build are asked for: the option types, their defaults and checks.

Light on purpose (no torch, no onnx at import): the command line reads its defaults from here
and parses its options before any of the toolchain loads, so `--help` and a refused option
answer in about a second instead of the four that importing torch takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cvt_ref.errors import CvtError

MIN_OPSET = 17          # LayerNormalization is one node from 17 on
DEFAULT_OPSET = 20      # Gelu is one node from 20 on
MAX_BATCH = 4096


class ExportError(CvtError):
    """An export that failed, or whose file does not compute what the reference computes."""


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    batch: int | None = None  # None: dynamic batch axis
    image_size: int | None = None  # None: the variant's

    def check(self) -> None:
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= self.opset <= newest:
            raise ExportError(f"--opset {self.opset}: use {MIN_OPSET}..{newest} "
                              "(LayerNormalization needs 17)")
        if self.batch is not None and not 1 <= self.batch <= MAX_BATCH:
            raise ExportError(f"--batch {self.batch}: use 'dynamic' or 1..{MAX_BATCH}")
        if self.image_size is not None and not (64 <= self.image_size <= 2048 and self.image_size % 16 == 0):
            raise ExportError(f"--image-size {self.image_size}: use a multiple of 16 in 64..2048")


CalibMethod = Literal["minmax", "entropy", "percentile"]
CALIB_METHODS: tuple[CalibMethod, ...] = ("minmax", "entropy", "percentile")
SMOOTH_CHOICES: tuple[float | None, ...] = (None, 0.25, 0.5, 0.75)  # `--smooth auto` picks among these


def smooth_label(strength: float | None) -> str:
    return "off" if strength is None else f"{strength:g}"


@dataclass(frozen=True)
class Int8Options:
    """Calibration method and Q/DQ placement; the defaults are the measured CvT policy."""

    method: CalibMethod = "minmax"
    percentile: float = 99.999        # for method="percentile"
    quantize_outputs: bool = False    # ORT's default places Q/DQ on Conv/MatMul outputs too
    depthwise: bool = False           # quantize the BatchNorm-folded depthwise q/k/v convs
    attention: bool = True            # quantize q·kᵀ and attn·v (MatMuls of two activations)
    smooth: float | None = 0.5        # SmoothQuant migration strength (cvt_export.smoothing); None: off
    keep: tuple[str, ...] = ()        # graph nodes left in float (tune's per-block choices)

    @property
    def policy(self) -> str:
        return (f"outputs={int(self.quantize_outputs)},depthwise={int(self.depthwise)},"
                f"attention={int(self.attention)},smooth={self.smooth}")
