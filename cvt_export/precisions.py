"""The one precision table: each precision's ONNX file, what makes it, which backends run it, and
which file they read. A leaf (it imports only the
project's error type); every CLI parses precisions here,
so the case and spelling rules are the same everywhere. The fidelity bounds per precision are
`metrics.BOUNDS` (a leaf too), keyed by the same names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cvt_ref.errors import CvtError


class PrecisionError(CvtError):
    """A precision name that is not in the table, or not one the command takes."""


@dataclass(frozen=True)
class Precision:
    name: str
    reads: str            # the precision whose ONNX file it runs (bf16 -> fp32's file)
    file: str | None      # its own ONNX file in an artifact folder (None: it reads another's, with a hint)
    made_by: str          # what writes that file: "export" | "tune" | "" (no file of its own)
    backends: tuple[str, ...]
    note: str = ""
    dtype: str = "float32"  # the float type its float math runs in (torch's dtype name; FP16 modes)
    quantized: bool = False  # INT8 Q/DQ in its file
    needs: str = ""       # the CPU capability it needs, as OpenVINO names it ("BF16")
    exact: bool = False   # the reference's own math: held to max-abs, the others to cosine
    dynamic: bool = False  # activation scales computed per batch at run time: no calibration, and an
    #                        image's answer depends on the other images of its batch
    opt_in: bool = False  # made only when asked for by name; cvt-bench runs it by default once made
    # Its pass/fail bounds against PyTorch FP32 on the same images (max_abs a maximum, the others
    # minima): export refuses an FP32 file and warns for the others outside them, cvt-bench flags a
    # row outside them, the regression gate never lets a tolerance fall below them.
    bounds: Mapping[str, float] = field(kw_only=True)

    @property
    def calibrated(self) -> bool:
        """Its INT8 ranges come from the export's calibration images (not from another file)."""
        return self.quantized and self.made_by == "export" and not self.dynamic

    @property
    def tuned(self) -> bool:
        """Made by `cvt-export tune` from the other files: optional, and checked against them."""
        return self.made_by == "tune"


# Bounds: BF16 has three fewer mantissa bits than FP16. INT8's top-1 bound allows one flip in ten:
# random weights give near-flat logits whose top-1 flips under any quantization (trained heads agree
# far better). Tune's mix is held to at least INT8's (tune adds the user's budget). Dynamic INT8
# measured 0.99962-0.99967 on cvt-13 (docs/int8-and-tune.md); its batch dependence is held to the
# same cosine (cvt_export/harness/recommend.py).
TABLE: Mapping[str, Precision] = {p.name: p for p in (
    Precision("fp32", "fp32", "model.onnx", "export", ("torch", "ort", "openvino", "tensorrt"), exact=True,
              bounds={"max_abs": 1e-4, "top1_agreement": 1.0}),
    Precision("fp16", "fp16", "model.fp16.onnx", "export", ("torch", "ort", "openvino", "tensorrt"),
              "OpenVINO on a CPU without FP16 units runs it in BF16, or FP32 without either "
              "(the runner reports what ran)", dtype="float16",
              bounds={"cosine_min": 0.9999, "top1_agreement": 1.0}),
    Precision("bf16", "fp32", None, "", ("torch", "openvino"),
              "the FP32 file with a BF16 inference hint; needs BF16 units", dtype="bfloat16", needs="BF16",
              bounds={"cosine_min": 0.999, "top1_agreement": 1.0}),
    Precision("int8", "int8", "model.int8.onnx", "export", ("ort", "openvino", "tensorrt"),
              "Q/DQ on Conv/MatMul/Gemm, float elsewhere; OpenVINO needs VNNI or AMX", quantized=True,
              bounds={"cosine_min": 0.995, "top1_agreement": 0.9}),
    Precision("mixed", "mixed", "model.mixed.onnx", "tune", ("ort", "openvino", "tensorrt"),
              "INT8 except the blocks `cvt-export tune` kept in float", quantized=True, opt_in=True,
              bounds={"cosine_min": 0.995, "top1_agreement": 0.9}),
    Precision("int8dyn", "int8dyn", "model.int8dyn.onnx", "export", ("ort",),
              "dynamic INT8: weights INT8 per channel, activations quantized per batch at run time "
              "(no calibration; an image's answer depends on its batch-mates); TensorRT needs static "
              "scales, OpenVINO decomposes the run-time quantization (docs/int8-and-tune.md)",
              quantized=True, dynamic=True, opt_in=True, bounds={"cosine_min": 0.998, "top1_agreement": 0.9}),
)}
NAMES: tuple[str, ...] = tuple(TABLE)
EXPORTED: tuple[str, ...] = tuple(n for n, p in TABLE.items() if p.made_by == "export")
DEFAULT_EXPORT: tuple[str, ...] = tuple(n for n in EXPORTED if not TABLE[n].opt_in)
FILES: Mapping[str, str] = {n: p.file for n, p in TABLE.items() if p.file}
QUANTIZED: tuple[str, ...] = tuple(n for n, p in TABLE.items() if p.quantized)
# The roles other modules name: the reference's precision, the calibrated INT8 file, tune's mix.
REFERENCE: str = next(n for n, p in TABLE.items() if p.exact)
CALIBRATED: str = next(n for n, p in TABLE.items() if p.calibrated)
TUNED: str = next(n for n, p in TABLE.items() if p.tuned)


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


def kernel_precision(type_name: str) -> str:
    """A runtime's element-type spelling (ORT's "int8"/"float", OpenVINO's "I8"/"FP32"/"bf16")
    as the precision name of this table; "" for one it does not know."""
    t = type_name.lower()
    if t in ("int8", "uint8", "i8", "u8"):
        return "int8"
    return {"float": "fp32", "float32": "fp32", "fp32": "fp32", "f32": "fp32", "bf16": "bf16",
            "bfloat16": "bf16", "float16": "fp16", "fp16": "fp16", "f16": "fp16"}.get(t, "")
