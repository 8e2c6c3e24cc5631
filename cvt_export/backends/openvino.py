"""OpenVINO: IR files made from the ONNX artifacts, compiled for the CPU with an explicit precision.

OpenVINO runs an FP32 model in BF16 by default on CPUs that have BF16 units (this project's
CI machine among them), so the inference precision hint is always set, and the runner reports
what the plugin says it runs.

IR per precision, in `<artifacts>/openvino/` and recorded in the manifest (sha256 + source):
- fp32: `ov.convert_model(model.onnx)`; bf16 runs this IR with the bf16 hint.
- fp16: the same with FP16-compressed weights (`save_model(compress_to_fp16=True)`); the CPU
  computes in whatever the f16 hint resolves to (reported).
- int8: the Q/DQ ONNX converted as it is (default: it measured better), or
  `--int8-source nncf`: NNCF's post-training quantization (`ModelType.TRANSFORMER`) of the
  FP32 model on the export's own calibration images.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cvt_export import artifacts, calibration, precisions
from cvt_export.artifacts import IR_KEY as IR_DIR
from cvt_export.artifacts import ArtifactFolder, as_folder
from cvt_export.backends import (
    ATTENTION,
    BackendError,
    BackendUnavailable,
    Profile,
    RunnerBase,
    RunnerInfo,
    check_precision,
    check_threads,
    kernel_precision,
    onnx_io,
    timed_median_ms,
)
from cvt_export.imageset import Pixels
from cvt_export.machine import cpu_name, int8_dot_exact, isa
from cvt_export.precisions import run_by
from cvt_export.quiet import quiet_loggers
from cvt_export.records import IrEntry
from cvt_export.runtime import OUTPUT_NAME
from cvt_ref.errors import first_line
from cvt_ref.source import sha256_file

log = logging.getLogger(__name__)

# The inference-precision hint of each precision: its float type in OpenVINO's spelling (a quantized
# file's float parts run in f32)
HINTS = {name: {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[row.dtype]
         for name, row in precisions.TABLE.items()}
Int8Source = Literal["nncf", "qdq"]
# "per-batch": a model compiled for each input shape the runner meets (about 0.6 s each for cvt-13;
# the PER_BATCH_MODELS most recently used are kept); "dynamic": one model for every batch size
Shapes = Literal["per-batch", "dynamic"]
SHAPES: tuple[Shapes, ...] = ("per-batch", "dynamic")
PER_BATCH_MODELS = 8
INT8_SOURCES: tuple[Int8Source, ...] = ("nncf", "qdq")
# Measured on cvt-13 (docs/design.md, reports/int8-policy-cvt-13.md): the Q/DQ file reaches cosine
# 0.9993 on held-out photos, NNCF's PTQ at best 0.9945 (0.976 with ModelType.TRANSFORMER), at
# the same speed.
DEFAULT_INT8_SOURCE: Int8Source = "qdq"
DERIVED_HINT = ("the OpenVINO IR is made beside the ONNX files; copy the folder somewhere writable, "
                "or run `cvt-export openvino` once where it is writable")


def ir_name(precision: str, int8_source: Int8Source = DEFAULT_INT8_SOURCE) -> str:
    ir = precisions.reads(precision)  # a calibrated file's IR may come from NNCF too: named by its source
    return f"model.{ir}-{int8_source}.xml" if precisions.get(ir).calibrated else f"model.{ir}.xml"


def _calibration_images(folder: ArtifactFolder) -> Pixels:
    """The same images the ONNX INT8 export calibrated on (checked by content hash)."""
    info = folder.calibration
    if not info:
        raise BackendError(f"{folder.path}: no calibration set recorded; run "
                           f"`{folder.export_command(['int8'])}` first")
    source = None if info.source in (None, "bundled photos") else Path(info.source)
    calib, _ = calibration.calibration_set(source, info.asked)
    if calib.sha256 != info.sha256:
        raise BackendError(f"calibration images in {info.source} changed since the ONNX export; "
                           "re-run the INT8 export")
    return calib.load(folder.variant)


def source_precision(precision: str, int8_source: Int8Source = DEFAULT_INT8_SOURCE) -> str:
    """The precision whose ONNX file an IR of `precision` is converted from (FP16 and BF16 IRs
    come from the FP32 file: OpenVINO compresses or infers in the lower precision itself)."""
    ir = precisions.get(precisions.reads(precision))
    if ir.quantized and not (ir.calibrated and int8_source == "nncf"):
        return ir.name  # its own Q/DQ file
    return precisions.REFERENCE  # float IRs, and NNCF's INT8, are made from the FP32 file


def make_ir(folder: ArtifactFolder | Path, precision: str, int8_source: Int8Source = DEFAULT_INT8_SOURCE
            ) -> Path:
    """Write (or rewrite) one IR from the ONNX artifacts and record it in the manifest."""
    import openvino as ov

    folder = as_folder(folder)
    ir = precisions.reads(precision)
    onnx_precision = source_precision(precision, int8_source)
    onnx_path = folder.onnx(onnx_precision)
    name = ir_name(precision, int8_source)
    artifacts.check_writable(folder.path, "artifact folder", DERIVED_HINT)
    with folder.lock(), artifacts.staging(folder.path) as staged:
        try:
            model = ov.convert_model(str(onnx_path))
        except Exception as e:  # the frontend raises its own types for files it cannot read
            raise BackendError(f"openvino: cannot convert {onnx_path}: {first_line(e)}") from None
        made = IrEntry(made_from=folder.sha256(onnx_precision), onnx=onnx_path.name, openvino=ov.__version__)
        if precisions.get(ir).calibrated and int8_source == "nncf":
            try:
                import nncf
            except ImportError:
                raise BackendError("openvino: NNCF is not installed: pip install 'cvt-export[openvino]' "
                                   "(or use --int8-source qdq)") from None

            images = _calibration_images(folder)
            with quiet_loggers("nncf"):
                model = nncf.quantize(model, nncf.Dataset(images.each(1)),
                                      model_type=nncf.ModelType.TRANSFORMER, subset_size=len(images))
            calib = folder.calibration
            made = replace(made, nncf=nncf.__version__, calibration=calib.sha256 if calib else None)
        ov.save_model(model, str(staged / name), compress_to_fp16=precisions.get(ir).dtype == "float16")
        bin_name = name.replace(".xml", ".bin")
        folder.file(IR_DIR).mkdir(exist_ok=True)
        for f in (bin_name, name):  # xml last: it is what readers look for
            os.replace(staged / f, folder.file(f"{IR_DIR}/{f}"))
        folder.record_ir(name, replace(made, sha256={f: sha256_file(folder.file(f"{IR_DIR}/{f}"))
                                                     for f in (name, bin_name)}))
    return folder.file(f"{IR_DIR}/{name}")


def ir_stale(folder: ArtifactFolder | Path, precision: str, int8_source: Int8Source = DEFAULT_INT8_SOURCE
             ) -> str | None:
    """Why the recorded IR for a precision cannot be used as it is (None: it can): missing,
    truncated, made from another ONNX file (a re-export) or by another OpenVINO version."""
    import openvino as ov

    folder = as_folder(folder)
    entry = folder.ir(ir_name(precision, int8_source))
    if entry is None:
        return "not made yet"
    source = folder.recorded_sha256(entry.onnx)
    fresh = all(folder.file(f"{IR_DIR}/{f}").is_file() and sha256_file(folder.file(f"{IR_DIR}/{f}")) == digest
                for f, digest in entry.sha256.items())
    if not fresh:
        return "missing, truncated or changed"
    if source is None or entry.made_from != source:
        return "made from another export of its ONNX source"
    if entry.openvino != ov.__version__:
        return "made by another OpenVINO version"
    return None


def ir_file(folder: ArtifactFolder | Path, precision: str, int8_source: Int8Source = DEFAULT_INT8_SOURCE
            ) -> Path:
    """The IR for a precision: verified against the manifest; made or remade when it is not."""
    folder = as_folder(folder)
    if precisions.get(precision).tuned:
        folder.onnx(precision, check_hash=False)  # a mix made from another INT8 file is refused here
    why = ir_stale(folder, precision, int8_source)
    path = folder.file(f"{IR_DIR}/{ir_name(precision, int8_source)}")
    if why is None:
        return path
    if why != "not made yet":
        log.warning("%s: %s; rebuilding it from the ONNX artifact", path, why)
    return make_ir(folder, precision, int8_source)


class OpenVinoRunner(RunnerBase):
    def __init__(self, path: Path, config: dict[str, Any], info: RunnerInfo, folder: ArtifactFolder,
                 precision: str, *, check_finite: bool, shapes: Shapes = "per-batch") -> None:
        super().__init__(info, *onnx_io(folder, precision), check_finite=check_finite)
        self.path, self.config, self.shapes = path, config, shapes
        self.compiled: Any = None
        self.request: Any = None
        # input shape -> request of a model compiled for it, the most recently used last
        self.per_batch: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def _compile(self, shape: tuple[int, ...] | None = None, extra: dict[str, Any] | None = None) -> Any:
        """The IR compiled with this runner's configuration; for one input shape when given."""
        import openvino as ov

        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
            if shape is not None:
                model.reshape(list(shape))
            return core.compile_model(model, "CPU", {**self.config, **(extra or {})})
        except RuntimeError as e:
            raise BackendError(f"openvino: cannot compile {self.path}: {first_line(e)}") from None

    def _request_for(self, x: np.ndarray) -> Any:
        """The request that runs x: a model compiled for x's shape (OpenVINO plans static shapes
        better: cvt-13 INT8 0.80x the time at batch 1 and 0.87x at batch 8 on a 2-core AVX-512
        VNNI EPYC), made on the first call with that shape. At most PER_BATCH_MODELS are kept,
        the least recently used dropped, so every batch runs on a model made for it."""
        if self.shapes == "dynamic":
            return self.request
        shape = tuple(x.shape)
        if shape in self.per_batch:
            self.per_batch.move_to_end(shape)
        else:
            self.per_batch[shape] = self._compile(shape).create_infer_request()
            if len(self.per_batch) > PER_BATCH_MODELS:
                self.per_batch.popitem(last=False)
        return self.per_batch[shape]

    def _activate(self) -> None:
        self.compiled = self._compile()
        self.request = self.compiled.create_infer_request()
        hint = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        runs = hint.replace("<Type: '", "").rstrip("'>")
        executed = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(runs, runs)
        if self.info.precision in precisions.QUANTIZED:
            executed = f"int8 (quantized layers) + {executed}"
        self.info.executed = executed
        threads = self.compiled.get_property("INFERENCE_NUM_THREADS")
        self.info.device = f"CPU: {cpu_name()} ({threads} threads)"

    def _deactivate(self) -> None:
        self.per_batch.clear()
        self.request = None
        self.compiled = None

    def profile(self, x: np.ndarray, runs: int) -> Profile:
        """OpenVINO's performance counters on a model compiled like this runner's (same IR and
        configuration, PERF_COUNT on): two untimed runs, then `runs` counted ones; each executed
        layer's time in the median run, its exec type (which names the kernel and the precision it
        ran in)."""
        import time

        import openvino as ov

        x = self.check_input(x)
        compiled = self._compile(None if self.shapes == "dynamic" else tuple(x.shape), {"PERF_COUNT": True})
        request = compiled.create_infer_request()
        names, consumers, attention = runtime_graph(compiled, ov.Core().read_model(str(self.path)))
        for _ in range(2):
            request.infer({0: x})
        times: dict[str, np.ndarray] = {}
        kind: dict[str, tuple[str, str, str]] = {}
        walls = []
        for run in range(runs):
            start = time.perf_counter()
            request.infer({0: x})
            walls.append((time.perf_counter() - start) * 1000)
            for info in request.profiling_info:
                if str(info.status).endswith("EXECUTED") and not str(info.status).endswith("NOT_EXECUTED"):
                    ms = info.real_time.total_seconds() * 1000
                    times.setdefault(info.node_name, np.zeros(runs))[run] += ms
                    op = ATTENTION if info.node_name in attention else info.node_type
                    kind[info.node_name] = (op, info.exec_type, exec_precision(info.exec_type))
        return Profile.of_median_run(kind, times, walls, names, consumers)

    def gemm_rate(self, m: int, k: int, n: int, runs: int) -> float:
        import tempfile

        import openvino as ov

        from cvt_export.derive import gemm_model

        with tempfile.TemporaryDirectory(prefix="cvt-ov-gemm-") as tmp:
            path = Path(tmp) / "gemm.onnx"
            path.write_bytes(gemm_model(m, k, n, self.info.precision))
            request = ov.Core().compile_model(str(path), "CPU", self.config).create_infer_request()
        x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        # the GEMM, not copies of its operands: the input is read where it is and the output
        # left in the request's memory (copying them took a third of the time of the INT8 GEMM)
        ms = timed_median_ms(lambda: request.infer({0: x}, share_inputs=True, share_outputs=True), runs)
        return m * k * n / ms / 1e6

    def _run(self, x: np.ndarray) -> np.ndarray:
        request = self._request_for(x)
        request.infer({0: x})
        # The output tensor's memory belongs to the request and is reused by the next call.
        return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)


def runtime_graph(compiled: Any, model: Any
                  ) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]], set[str]]:
    """The compiled graph as its profile needs it, in one walk: the source layers each node was
    made from (with and without OpenVINO's suffixes such as "/WithoutBiases"), each node's
    consumers in execution order, and the nodes that are a whole attention fused into one kernel
    (`Subgraph` nodes whose source layers in `model`, the IR as read, hold a MatMul and a Softmax)."""
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ops()}
    names: dict[str, tuple[str, ...]] = {}
    consumers: dict[str, tuple[str, ...]] = {}
    attention: set[str] = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        node = op.get_friendly_name()
        info = op.get_rt_info()
        layers = info["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in info else []
        names[node] = tuple(dict.fromkeys(n for layer in layers if layer
                                          for n in (layer, layer.split("/")[0])))
        consumers[node] = tuple(dict.fromkeys(t.get_node().get_friendly_name() for out in op.outputs()
                                              for t in out.get_target_inputs()))
        if (str(info["layerType"].astype(str)) == "Subgraph"
                and {"MatMul", "Softmax"} <= {source_type(layer, types) for layer in layers}):
            attention.add(node)
    return names, consumers, attention


def source_type(layer: str, types: dict[str, str]) -> str | None:
    """The operator type of a source layer a compiled node names: the IR's, or for a layer
    OpenVINO's own transformations made (in float IRs the attention's MatMul and Softmax are
    rebuilt as "MatMul_9948", "Softmax_9952") the type its generated name starts with."""
    if layer in types:
        return types[layer]
    made = re.fullmatch(r"([A-Za-z]+)_\d+", layer)
    return made.group(1) if made else None


def exec_precision(exec_type: str) -> str:
    """The precision in an OpenVINO exec type ("brgemm_avx512_amx_I8", "jit_avx2_FP32", "ref_any_bf16")."""
    return kernel_precision(exec_type.rsplit("_", 1)[-1]) if "_" in exec_type else ""


def _config(precision: str, hint: str, threads: int | None) -> dict[str, Any]:
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": hint.upper()}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoBackend:
    name = "openvino"
    precisions = run_by("openvino")

    def probe(self, folder: ArtifactFolder | str | Path, precision: str, names: list[str], x: np.ndarray, *,
              threads: int | None = None, int8_source: Int8Source = DEFAULT_INT8_SOURCE
              ) -> dict[str, np.ndarray]:
        """The named intermediate tensors (those OpenVINO kept) and the logits, as float32."""
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(ir_file(as_folder(folder), precision, int8_source)))
        kept = []
        for name in names:
            try:
                model.add_outputs([name])
                kept.append(name)
            except RuntimeError:  # fused away by the frontend: that point cannot be observed
                log.info("openvino: tensor %s not in the IR", name)
        compiled = core.compile_model(model, "CPU", _config(precision, "latency", threads))
        result = compiled.create_infer_request().infer({0: x})
        by_name = {}
        for port, value in result.items():
            for n in port.get_names():
                by_name[n] = np.array(value, dtype=np.float32, copy=True)
        out = {n: by_name[n] for n in kept if n in by_name}
        out[OUTPUT_NAME] = np.array(result[compiled.output(0)], dtype=np.float32, copy=True)
        return out

    def available(self) -> tuple[bool, str]:
        try:
            import openvino as ov
        except ImportError:
            return False, "OpenVINO is not installed: pip install 'cvt-export[openvino]'"
        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return True, f"openvino {ov.__version__}; CPU capabilities {', '.join(caps)}"

    def compile(self, folder: ArtifactFolder | str | Path, precision: str, *, threads: int | None = None,
                check_finite: bool = True, hint: str = "latency",
                int8_source: Int8Source = DEFAULT_INT8_SOURCE, shapes: Shapes = "per-batch"
                ) -> OpenVinoRunner:
        """`hint`: OpenVINO's performance hint, latency or throughput; `int8_source`: qdq (the Q/DQ
        ONNX file) or nncf (NNCF's PTQ of the FP32 IR on the export's calibration images);
        `shapes`: per-batch (a model compiled for each batch size met, the faster) or dynamic
        (one model: no compile on a new batch size, as a server with dynamic batching wants)."""
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"openvino: {why}")
        import openvino as ov

        check_precision(self.name, precision)
        folder = as_folder(folder)
        if hint not in ("latency", "throughput"):
            raise BackendError(f"openvino: performance hint {hint!r}; use latency or throughput")
        if shapes not in SHAPES:
            raise BackendError(f"openvino: shapes {shapes!r}; use {', '.join(SHAPES)}")
        if int8_source not in INT8_SOURCES:
            raise BackendError(f"openvino: int8 source {int8_source!r}; use {', '.join(INT8_SOURCES)}")
        check_threads(self.name, threads)
        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        needs = precisions.get(precision).needs
        if needs and needs not in caps:
            raise BackendUnavailable(f"openvino: this CPU has no {needs} support (capabilities: "
                                     f"{', '.join(caps)})")
        if precision in precisions.QUANTIZED and not int8_dot_exact():
            raise BackendUnavailable(
                f"openvino: {precision} needs a CPU with VNNI or AMX (this one has {', '.join(isa())}): "
                "without them OpenVINO's INT8 kernels sum u8·s8 pairs in 16 bits and saturate (cvt-13 "
                "INT8 measured cosine 0.964 on an AVX2-only CPU); run INT8 on ort here, which avoids it")
        path = ir_file(folder, precision, int8_source)
        info = RunnerInfo(
            backend=self.name, precision=precision, executed=precision,
            device=f"CPU: {cpu_name()}", artifact=str(path),
            details={"openvino": ov.__version__, "hint": hint, "capabilities": list(caps), "shapes": shapes,
                     "int8_source": int8_source if precisions.get(precision).calibrated else None})
        return OpenVinoRunner(path, _config(precision, hint, threads), info, folder,
                              precisions.REFERENCE if precisions.get(precision).calibrated
                              and int8_source == "nncf" else precision,
                              check_finite=check_finite, shapes=shapes)


BACKEND = OpenVinoBackend()
