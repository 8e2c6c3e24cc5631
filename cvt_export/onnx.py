"""Reference CvT -> checked, simplified, self-describing FP32 ONNX, validated against PyTorch.

Exporter: `torch.onnx.export(..., dynamo=True)`. It is PyTorch's maintained exporter (the
TorchScript one is deprecated), it takes the batch axis as a declared `Dim` rather than
tracing a concrete size, and at opset >= 20 it writes LayerNorm as one LayerNormalization
node and GELU as one Gelu node, which every backend here runs as a fused kernel.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import cvt_ref
from cvt_ref.errors import CvtError, first_line
from cvt_ref.model import CvT
from cvt_ref.variants import Variant

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
MIN_OPSET = 17          # LayerNormalization is one node from 17 on
DEFAULT_OPSET = 20      # Gelu is one node from 20 on
FP32_TOLERANCE = 1e-4   # max-abs logits vs PyTorch; above it the export is refused
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to a side file (protobuf's 2 GiB cap)
MAX_BATCH = 4096


class ExportError(CvtError):
    """An export that failed, or whose file does not compute what the reference computes."""


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    batch: int | None = None  # None: dynamic batch axis
    image_size: int | None = None  # None: the variant's

    def check(self) -> None:
        if not MIN_OPSET <= self.opset <= onnx.defs.onnx_opset_version():
            raise ExportError(f"--opset {self.opset}: use {MIN_OPSET}..{onnx.defs.onnx_opset_version()} "
                              "(LayerNormalization needs 17)")
        if self.batch is not None and not 1 <= self.batch <= MAX_BATCH:
            raise ExportError(f"--batch {self.batch}: use 'dynamic' or 1..{MAX_BATCH}")
        if self.image_size is not None and not (64 <= self.image_size <= 2048 and self.image_size % 16 == 0):
            raise ExportError(f"--image-size {self.image_size}: use a multiple of 16 in 64..2048")


def sized_variant(variant: Variant, image_size: int | None) -> Variant:
    """The variant evaluated at another resolution (CvT has no position embedding to resize)."""
    return variant if image_size in (None, variant.image_size) else replace(variant, image_size=image_size)


def tool_versions() -> dict[str, str]:
    names = ("torch", "onnx", "onnxscript", "onnxslim", "onnxruntime", "onnxconverter-common")
    return {n: version(n) for n in names}


def metadata(model: CvT, variant: Variant, precision: str) -> dict[str, str]:
    """Everything a consumer needs to feed the file and read its output, without this package."""
    source = model.weights
    names = cvt_ref.class_names(variant.num_classes, source.id2label if source else None)
    return {
        "cvt.variant": variant.name,
        "cvt.precision": precision,
        "cvt.weights": source.spec if source else "unknown",
        "cvt.weights_sha256": (source.sha256 or "") if source else "",
        "cvt.activation": model.activation,
        "cvt.image_size": str(variant.image_size),
        "cvt.preprocess": json.dumps({
            "resize": variant.resize_size, "crop": variant.crop, "interpolation": "bicubic",
            "scale": 1 / 255, "mean": list(variant.mean), "std": list(variant.std), "layout": "NCHW RGB"}),
        "cvt.labels": json.dumps(names),
        "cvt.tools": json.dumps(tool_versions()),
    }


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise these loggers to ERROR for a while: the libraries' advice is not for our users."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _quiet_export(model: torch.nn.Module, example: torch.Tensor, opts: ExportOptions) -> onnx.ModelProto:
    dynamic = None
    if opts.batch is None:
        dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}
    # The exporter reports progress with print(), warnings and logging; the CLI owns the terminal.
    sink = io.StringIO()
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(sink), \
            quiet_loggers("torch.onnx", "onnxscript", "torch._dynamo", "torch.export"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opts.opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic, optimize=True, verbose=False)
    if program is None:  # pragma: no cover - only with f= given
        raise ExportError("torch.onnx.export returned nothing")
    log.debug("exporter output: %s", sink.getvalue())
    return program.model_proto


def simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal by onnxslim (a maintained tool, not our surgery)."""
    import onnxslim

    slim = onnxslim.slim(proto)
    if not isinstance(slim, onnx.ModelProto):  # pragma: no cover
        raise ExportError("onnxslim returned no model")
    return slim


def save(proto: onnx.ModelProto, path: Path) -> list[str]:
    """Write the model (weights to `<name>.data` when large); returns the files written."""
    big = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    if big:
        data = path.name + ".data"
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [path.name, data]
    onnx.save_model(proto, path)
    return [path.name]


def check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path.name}: the ONNX checker refused the exported graph: "
                          f"{first_line(e)}") from None


def export_fp32(model: CvT, variant: Variant, path: Path, opts: ExportOptions) -> list[str]:
    """Export (BatchNorm folded), infer shapes, simplify, stamp metadata, check; returns files."""
    opts.check()
    folded = copy.deepcopy(model).eval().fold_batchnorm()
    example = torch.zeros(opts.batch or 2, 3, variant.image_size, variant.image_size)
    try:
        proto = _quiet_export(folded, example, opts)
    except Exception as e:  # the exporter raises many types; the user can only report it
        raise ExportError(f"torch.onnx.export failed for {variant.name}: "
                          f"{type(e).__name__}: {first_line(e, 300)}") from e
    proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    proto = simplify(proto)
    proto.producer_name = "cvt-export"
    proto.doc_string = f"CvT {variant.name} exported by cvt-export (see metadata_props)"
    onnx.helper.set_model_props(proto, metadata(model, variant, "fp32"))
    files = save(proto, path)
    check(path)
    return files


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_ort(session: Any, batch: np.ndarray) -> np.ndarray:
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0], dtype=np.float32)


def reference_logits(model: CvT, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(batch)).numpy()


def validation_batches(n: int, fixed: int | None) -> list[slice]:
    """Row ranges to validate on: batch 1 twice and one larger batch (or the fixed size)."""
    if fixed is not None:
        return [slice(0, fixed)]
    return [slice(0, 1), slice(1, 2), slice(0, min(n, 8))]


def validate_fp32(path: Path, images: np.ndarray, ref: np.ndarray, batch: int | None) -> dict[str, float]:
    """Max-abs logits error of the file on ONNX Runtime vs the reference logits `ref` of `images`,
    per batch size."""
    if batch is not None and len(images) < batch:  # repeat rows; np.resize repeats both alike
        images = np.resize(images, (batch, *images.shape[1:]))
        ref = np.resize(ref, (batch, *ref.shape[1:]))
    session = ort_session(path)
    errors: dict[str, float] = {}
    for rows in validation_batches(len(images), batch):
        got = run_ort(session, images[rows])
        key = f"batch{rows.stop - rows.start}"
        errors[key] = max(errors.get(key, 0.0), float(np.abs(got - ref[rows]).max()))
    worst = max(errors.values())
    if not np.isfinite(worst) or worst > FP32_TOLERANCE:
        raise ExportError(f"{path.name} on ONNX Runtime differs from PyTorch by max-abs {worst:.3g} "
                          f"(> {FP32_TOLERANCE:g}); the export is not kept")
    return errors


def _dims(t: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]


def graph_summary(path: Path) -> dict[str, Any]:
    """Signature of a file for the manifest: IO, opset, op histogram, sizes."""
    proto = onnx.load(str(path), load_external_data=False)

    def io(values: Sequence[onnx.ValueInfoProto]) -> list[dict[str, Any]]:
        return [{"name": v.name, "shape": _dims(v),
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                for v in values]

    ops = Counter(n.op_type for n in proto.graph.node)
    return {
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": io(proto.graph.input), "outputs": io(proto.graph.output),
        "nodes": len(proto.graph.node), "ops": dict(sorted(ops.items())),
        "initializers": len(proto.graph.initializer),
        "parameters": int(sum(int(np.prod(t.dims)) for t in proto.graph.initializer)),
    }

