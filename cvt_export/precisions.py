"""The one precision table: each precision's ONNX file, what makes it, which backends run it, and
which file they read. A leaf (it imports only the
project's error type); every CLI parses precisions here,
so the case and spelling rules are the same everywhere. The fidelity bounds per precision are
`metrics.BOUNDS` (a leaf too), keyed by the same names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cvt_ref.errors import CvtError


class PrecisionError(CvtError):
    """A precision name that is not in the table, or not one the command takes."""


@dataclass(frozen=True)
class Precision:
    name: str
    reads: str            # the precision whose ONNX file it runs (bf16 -> fp32's file)
    file: str | None      # its own ONNX file in an artifact folder (None: it reads another's)
    made_by: str          # what writes that file: "export" | "tune" | "" (no file of its own)
    backends: tuple[str, ...]
    note: str = ""

    @property
    def quantized(self) -> bool:
        """INT8 Q/DQ in its file (int8, and tune's mix of INT8 and float blocks)."""
        return self.reads in ("int8", "mixed")


TABLE: Mapping[str, Precision] = {p.name: p for p in (
    Precision("fp32", "fp32", "model.onnx", "export", ("torch", "ort", "openvino", "tensorrt")),
    Precision("fp16", "fp16", "model.fp16.onnx", "export", ("torch", "ort", "openvino", "tensorrt"),
              "OpenVINO on a CPU without FP16 units runs it in BF16, or FP32 without either "
              "(the runner reports what ran)"),
    Precision("bf16", "fp32", None, "", ("torch", "openvino"),
              "the FP32 file with a BF16 inference hint; needs BF16 units"),
    Precision("int8", "int8", "model.int8.onnx", "export", ("ort", "openvino", "tensorrt"),
              "Q/DQ on Conv/MatMul/Gemm, float elsewhere; OpenVINO needs VNNI or AMX"),
    Precision("mixed", "mixed", "model.mixed.onnx", "tune", ("ort", "openvino", "tensorrt"),
              "INT8 except the blocks `cvt-export tune` kept in float"),
)}
NAMES: tuple[str, ...] = tuple(TABLE)
EXPORTED: tuple[str, ...] = tuple(n for n, p in TABLE.items() if p.made_by == "export")
FILES: Mapping[str, str] = {n: p.file for n, p in TABLE.items() if p.file}
QUANTIZED: tuple[str, ...] = tuple(n for n, p in TABLE.items() if p.quantized)


def get(name: str) -> Precision:
    try:
        return TABLE[name]
    except KeyError:
        raise PrecisionError(f"precision {name!r}: use {', '.join(NAMES)}") from None


def reads(name: str) -> str:
    """The precision whose ONNX file a precision runs."""
    return get(name).reads


def run_by(backend: str) -> tuple[str, ...]:
    """The precisions a backend runs, in table order."""
    return tuple(n for n, p in TABLE.items() if backend in p.backends)


def floats_of(backend: str) -> tuple[str, ...]:
    """The float precisions a backend runs (what an INT8 mix is weighed against)."""
    return tuple(p for p in run_by(backend) if p not in QUANTIZED)


def parse(text: str, allowed: Iterable[str] = NAMES, option: str = "--precision") -> tuple[str, ...]:
    """A comma-separated list, case-insensitive, in table order; PrecisionError names what it takes."""
    allowed = tuple(allowed)
    wanted = [p.strip().lower() for p in str(text).split(",") if p.strip()]
    bad = [p for p in wanted if p not in allowed]
    if bad or not wanted:
        raise PrecisionError(f"{option} {text!r}: use a comma-separated list of {', '.join(allowed)}")
    return tuple(p for p in NAMES if p in wanted)


def parse_one(text: str, allowed: Iterable[str] = NAMES, option: str = "--precision") -> str:
    allowed = tuple(allowed)
    got = parse(text, allowed, option)
    if len(got) != 1:
        raise PrecisionError(f"{option} {text!r}: one of {', '.join(allowed)}")
    return got[0]
