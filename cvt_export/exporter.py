"""Reference CvT -> checked, simplified, self-describing FP32 ONNX (`validate` then measures it).

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
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import cvt_ref
from cvt_export.options import MAX_BATCH as MAX_BATCH
from cvt_export.options import ExportError as ExportError
from cvt_export.options import ExportOptions as ExportOptions
from cvt_export.quiet import quiet_loggers
from cvt_export.runtime import INPUT_NAME, OUTPUT_NAME
from cvt_ref.errors import first_line
from cvt_ref.model import CvT
from cvt_ref.variants import Variant

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to a side file (protobuf's 2 GiB cap)


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
        "cvt.num_classes": str(variant.num_classes),
        "cvt.labels": json.dumps(names),
        "cvt.tools": json.dumps(tool_versions()),
    }


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

