"""FP16 and INT8 ONNX files derived from the FP32 export, each with a written precision policy.

FP16 (onnxconverter-common's `convert_float_to_float16`): weights and activations FP16, graph
inputs/outputs FP32. LayerNormalization and Softmax run in FP32 (Casts around them; LayerNorm
after attention overflows in FP16), and so does the classifier Gemm. Every tensor's type is
fixed in the file, so TensorRT can build it as a strongly-typed network.

Dynamic INT8 (`to_int8_dynamic`): ONNX Runtime's `quantize_dynamic`, activation scales per batch
at run time, no calibration.

INT8 (ONNX Runtime's `quantize_static`, QDQ format), the CvT policy measured on this project
(docs/design.md, "INT8 policy"): Q/DQ only on the inputs of the patch-embedding Convs and of every
MatMul (q/k/v/out projections, MLP, and both attention MatMuls); symmetric INT8 activations
and per-channel symmetric INT8 weights (zero points 0, as TensorRT's explicit quantization
requires); biases stay FP32; no Q/DQ on outputs, so LayerNorm, Softmax, GELU, the residual
Adds, the BatchNorm-folded depthwise projections and the classifier stay FP32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cvt_export import precisions
from cvt_export.exporter import ExportError, save
from cvt_export.imageset import Pixels
from cvt_export.options import CALIB_METHODS as CALIB_METHODS
from cvt_export.options import SMOOTH_CHOICES as SMOOTH_CHOICES
from cvt_export.options import Int8Options as Int8Options
from cvt_export.options import smooth_label as smooth_label
from cvt_export.quiet import quiet_loggers
from cvt_export.runtime import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "MatMul")
FP32_OPS_IN_FP16 = ("LayerNormalization", "Softmax")
# One image per calibration step, statistics merged after every step (ORT's
# CalibStridedMinMax, which despite its name serves every method): otherwise ORT keeps every
# intermediate tensor of every image until the end (over 24 GB for CvT-W24 at 384).
# (CalibMaxIntermediateOutputs would be the obvious option, but ORT 1.32 discards the data
# instead of merging it.)
CALIB_BATCH = 1


@dataclass(frozen=True)
class Derived:
    """A precision file made from the FP32 one: the files written (the .onnx first, then any
    external data) and, for INT8, whether it calibrated now (False: cached ranges served)."""

    files: list[str]
    calibrated: bool | None = None


def classifier_nodes(proto: onnx.ModelProto) -> list[str]:
    """The node(s) producing the logits: the classifier stays FP32 in every policy."""
    return [n.name for n in proto.graph.node if OUTPUT_NAME in n.output]


def depthwise_convs(proto: onnx.ModelProto) -> list[str]:
    return [n.name for n in proto.graph.node if n.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in n.attribute)]


def attention_matmuls(proto: onnx.ModelProto) -> list[str]:
    """MatMuls with no weight input: q·kᵀ and attn·v."""
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node
            if n.op_type == "MatMul" and not any(i in weights for i in n.input)]


def excluded_nodes(proto: onnx.ModelProto, opts: Int8Options) -> list[str]:
    return ([] if opts.depthwise else depthwise_convs(proto)) + \
        ([] if opts.attention else attention_matmuls(proto)) + classifier_nodes(proto) + list(opts.keep)


def to_fp16(src: Path, dst: Path) -> Derived:
    from onnxconverter_common import float16

    proto = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "number truncated to 1e-07": tiny weights flush, as FP16 must
        half = float16.convert_float_to_float16(
            proto, keep_io_types=True, op_block_list=list(FP32_OPS_IN_FP16),
            node_block_list=classifier_nodes(proto))
    _keep_fp32_outputs(half, proto)
    _set_precision(half, "fp16")
    return Derived(save(half, dst))


def _keep_fp32_outputs(half: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Undo the converter's trailing Cast-to-FP16 after a blocked (FP32) output node.

    onnxconverter-common 1.14-1.16 ignores keep_io_types for a graph output produced by a node
    in node_block_list: it appends Cast(to=FLOAT16) and declares the output FP16. Here the
    classifier is that node, so its FP32 result is wired straight to the output again.
    """
    wanted = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    for out in half.graph.output:
        if out.type.tensor_type.elem_type == wanted[out.name]:
            continue
        cast = next(n for n in half.graph.node if out.name in n.output)
        if cast.op_type != "Cast":
            raise ExportError(f"FP16 conversion left output {out.name} as FP16 and no Cast to undo")
        source = cast.input[0]
        half.graph.node.remove(cast)
        for n in half.graph.node:
            n.output[:] = [out.name if o == source else o for o in n.output]
            n.input[:] = [out.name if i == source else i for i in n.input]
        out.type.tensor_type.elem_type = wanted[out.name]


def _set_precision(proto: onnx.ModelProto, precision: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == "cvt.precision":
            prop.value = precision


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over preprocessed images, with ranges."""

    def __init__(self, images: np.ndarray | Pixels, progress: Callable[[str], None] | None = None) -> None:
        self.pixels = Pixels.of(images)
        self.current: Iterator[np.ndarray] = self.pixels.batches(CALIB_BATCH)
        self.progress = progress
        self.images = len(self.pixels)
        self.count = -(-self.images // CALIB_BATCH)
        self.served = 0

    def __len__(self) -> int:
        return self.count

    def set_range(self, start_index: int, end_index: int) -> None:
        self.current = self.pixels.batches(CALIB_BATCH, start_index, end_index)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.current, None)
        if batch is None:
            return None
        self.served += 1
        if self.progress is not None:  # the count starts again if ORT reads the images a second time
            k, total = (self.served - 1) % self.count + 1, self.count
            self.progress(f"calibrating INT8 on {self.images} images ({k}/{total})")
        return {INPUT_NAME: batch}


def _ort_method(opts: Int8Options) -> tuple[Any, dict[str, Any]]:
    from onnxruntime.quantization import CalibrationMethod

    if opts.method == "minmax":
        return CalibrationMethod.MinMax, {}
    if opts.method == "entropy":
        return CalibrationMethod.Entropy, {}
    return CalibrationMethod.Percentile, {"CalibPercentile": opts.percentile}


def to_int8(src: Path, dst: Path, images: np.ndarray | Pixels | None, opts: Int8Options, cache: Path,
            *, tensorrt_rules: bool = True, progress: Callable[[str], None] | None = None) -> Derived:
    """Write the Q/DQ file (its `calibrated`: False when the cached ranges served).

    `tensorrt_rules=False` keeps a file that breaks TensorRT's rules (for measuring placements);
    `progress` hears "calibrating INT8 on N images (k/N)" as each image goes through.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    proto = onnx.load(str(src), load_external_data=False)
    hit = cache.is_file()
    if not hit and images is None:
        raise ExportError("INT8 needs calibration images and none are cached")
    method, calib_extra = _ort_method(opts)
    tmp_cache = cache if hit else cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    cache.parent.mkdir(parents=True, exist_ok=True)
    # ORT's quantizer logs its advice through the root logger and prints histogram progress.
    with quiet_loggers(""), contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(src), str(dst), None if hit else _Reader(images, progress),  # type: ignore[arg-type]
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=excluded_nodes(proto, opts),
            per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=method,
            calibration_cache_path=str(tmp_cache),
            use_external_data_format=src.with_name(src.name + ".data").exists(),
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True,
                "OpTypesToExcludeOutputQuantization": [] if opts.quantize_outputs else list(QUANTIZED_OPS),
                "QuantizeBias": False,
                "CalibStridedMinMax": 1,
                **calib_extra,
            })
    if not hit:
        os.replace(tmp_cache, cache)
    out = onnx.load(str(dst), load_external_data=False)
    _set_precision(out, "int8")
    problems = tensorrt_qdq_problems(out) if tensorrt_rules else []
    if problems:
        raise ExportError(f"{dst.name}: Q/DQ placement TensorRT would refuse: {problems[0]}")
    onnx.save_model(out, str(dst))  # re-save only the header; external data stays as written
    data = dst.with_name(dst.name + ".data")
    return Derived([dst.name, *([data.name] if data.exists() else [])], calibrated=not hit)


def _const(proto: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in proto.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    for n in proto.graph.node:
        if n.op_type == "Constant" and name in n.output:
            return onnx.numpy_helper.to_array(n.attribute[0].t)
    return None


def tensorrt_qdq_problems(proto: onnx.ModelProto) -> list[str]:
    """Where the file breaks TensorRT's explicit-quantization rules (empty list: none found).

    The rules (TensorRT developer guide, "Explicit Quantization"): INT8 Q/DQ are symmetric, so
    every zero point is 0 and every scale positive and finite; a per-channel scale runs along
    the weights' output-channel axis (0 for Conv weights, the last for MatMul weights); each
    activation QuantizeLinear feeds DequantizeLinear; and every DequantizeLinear reaches, through
    layers TensorRT moves Q/DQ across, only Conv/MatMul/Gemm (or Shape, which reads dimensions),
    so each Q/DQ pair is fused into an INT8 layer rather than left to run in float.
    """
    problems: list[str] = []
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weights = {t.name: t for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = _const(proto, n.input[1])
        zero = _const(proto, n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if scale is None or not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{n.name}: scale not a positive finite constant")
        if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
            problems.append(f"{n.name}: zero point is not int8 0")
        users = consumers.get(n.output[0], [])
        if n.op_type == "QuantizeLinear":
            if not users or any(u.op_type != "DequantizeLinear" for u in users):
                problems.append(f"{n.name}: QuantizeLinear not followed by DequantizeLinear")
            continue
        ends = _compute_consumers(n.output[0], consumers)
        if not ends or not ends <= {"Conv", "MatMul", "Gemm", "Shape"}:
            problems.append(f"{n.name}: DequantizeLinear reaches {sorted(ends)}, not only Conv/MatMul/Gemm")
        if scale is not None and scale.size > 1 and n.input[0] in weights:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            rank = len(weights[n.input[0]].dims)
            want = {u.op_type: (0 if u.op_type == "Conv" else rank - 1) for u in users}
            if any(axis % rank != w for w in want.values()):
                problems.append(f"{n.name}: per-channel axis {axis} is not the output-channel axis")
    return problems


# Layers TensorRT moves Q/DQ across ("commuting" layers in its developer guide).
COMMUTING = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat",
             "MaxPool", "Identity"}


def _compute_consumers(tensor: str, consumers: dict[str, list[onnx.NodeProto]]) -> set[str]:
    """Op types a tensor reaches through commuting layers only."""
    found: set[str] = set()
    for user in consumers.get(tensor, []):
        if user.op_type in COMMUTING:
            for out in user.output:
                found |= _compute_consumers(out, consumers)
        else:
            found.add(user.op_type)
    return found


DYNAMIC_OPS = ("MatMul",)  # the ones with constant weights: q/k/v/out projections and the MLP


def to_int8_dynamic(src: Path, dst: Path) -> Derived:
    """Write the dynamic INT8 file (ONNX Runtime's `quantize_dynamic`): the MatMuls with constant
    weights become DynamicQuantizeLinear + MatMulInteger, weights INT8 per output channel,
    activations UINT8 per tensor with the range of the batch they are in, found at run time. No
    calibration, and so an image's answer depends on the other images of its batch. The patch
    convolutions, the attention MatMuls (no constant side), LayerNorm, Softmax, GELU and the
    classifier Gemm stay FP32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(src), load_external_data=False)
    with quiet_loggers(""), contextlib.redirect_stdout(io.StringIO()):
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(DYNAMIC_OPS), per_channel=True,
                         weight_type=QuantType.QInt8,
                         # the classifier, also under the name ORT gives the MatMul it splits a Gemm into
                         nodes_to_exclude=[f"{n}{tail}" for n in classifier_nodes(proto)
                                           for tail in ("", "_MatMul")],
                         use_external_data_format=src.with_name(src.name + ".data").exists())
    out = onnx.load(str(dst), load_external_data=False)
    _set_precision(out, "int8dyn")
    onnx.save_model(out, str(dst))  # re-save only the header; external data stays as written
    data = dst.with_name(dst.name + ".data")
    return Derived([dst.name, *([data.name] if data.exists() else [])])


def dynamic_nodes(proto: onnx.ModelProto) -> int:
    """How many MatMuls run on INT8 with run-time activation scales."""
    return sum(n.op_type == "MatMulInteger" for n in proto.graph.node)


def quantized_nodes(proto: onnx.ModelProto) -> dict[str, int]:
    """Per op type, how many compute nodes take a dequantized input (what INT8 really covers)."""
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_out for i in n.input):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def gemm_model(m: int, k: int, n: int, precision: str) -> bytes:
    """One [m, k] x [k, n] MatMul as an ONNX model, the way the file a runner of `precision` reads
    holds one: float32 weights (fp32, and bf16, which reads the FP32 file), float16 (fp16), or INT8
    Q/DQ (a per-tensor symmetric activation, per-channel symmetric weights) for every quantized
    file (int8, mixed) — what a runtime's GEMM limit is measured on."""
    from onnx import TensorProto, helper, numpy_helper

    kind = precisions.get(precisions.reads(precision))
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [m, k])]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [m, n])]
    if kind.quantized:
        scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        inits = [numpy_helper.from_array(np.round(w / scale).astype(np.int8), "w_q"),
                 numpy_helper.from_array(scale.astype(np.float32), "w_scale"),
                 numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
                 numpy_helper.from_array(np.array(4.0 / 127, np.float32), "x_scale"),
                 numpy_helper.from_array(np.array(0, np.int8), "x_zero")]
        nodes = [helper.make_node("QuantizeLinear", [INPUT_NAME, "x_scale", "x_zero"], ["x_q"]),
                 helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
                 helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=1),
                 helper.make_node("MatMul", ["x_dq", "w_dq"], [OUTPUT_NAME])]
    elif kind.dtype == "float16":
        inits = [numpy_helper.from_array(w.astype(np.float16), "w")]
        nodes = [helper.make_node("Cast", [INPUT_NAME], ["x16"], to=TensorProto.FLOAT16),
                 helper.make_node("MatMul", ["x16", "w"], ["y16"]),
                 helper.make_node("Cast", ["y16"], [OUTPUT_NAME], to=TensorProto.FLOAT)]
    else:
        inits = [numpy_helper.from_array(w, "w")]
        nodes = [helper.make_node("MatMul", [INPUT_NAME, "w"], [OUTPUT_NAME])]
    graph = helper.make_graph(nodes, "gemm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return bytes(model.SerializeToString())
