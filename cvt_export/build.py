"""One export job: reference model -> FP32 / FP16 / INT8 ONNX files + manifest, in one folder.

Order matters for users: every input is checked (variant, weights, options, calibration
folder) before the minute of exporting starts; files are made in a private staging folder and
validated there; only then are they renamed into place, with the manifest written last.
A folder whose manifest already describes the same source keeps the files that still verify,
so asking for INT8 after FP32 does not export again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import cvt_ref
from cvt_export import artifacts, calibration, precision, probes
from cvt_export import onnx as onnx_export
from cvt_export.artifacts import Precision
from cvt_export.harness.metrics import fidelity
from cvt_ref.errors import CvtError
from cvt_ref.model import Activation
from cvt_ref.weights import sha256_file

log = logging.getLogger(__name__)

PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")
FILES = artifacts.ONNX_FILES
# Below these the export is kept but the CLI warns (the acceptance bounds).
TARGETS = {"fp16": 0.9999, "int8": 0.995}


@dataclass(frozen=True)
class BuildRequest:
    variant: str
    weights: str = "random"
    activation: Activation | None = None
    options: onnx_export.ExportOptions = field(default_factory=onnx_export.ExportOptions)
    precisions: tuple[Precision, ...] = ("fp32",)
    calib: Path | None = None
    calib_size: int | None = None
    int8: precision.Int8Options = field(default_factory=precision.Int8Options)


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    made: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    calibrated: bool | None = None
    warnings: list[str] = field(default_factory=list)


def parse_precisions(text: str) -> tuple[Precision, ...]:
    wanted = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in wanted if p not in PRECISIONS]
    if bad or not wanted:
        raise CvtError(f"--precision {text!r}: use a comma-separated list of {', '.join(PRECISIONS)}")
    return tuple(p for p in PRECISIONS if p in wanted)


def _file_entry(out: Path, name: str, prec: Precision, data_files: list[str]) -> dict[str, Any]:
    return {
        "precision": prec,
        "sha256": sha256_file(out / name),
        "bytes": sum((out / f).stat().st_size for f in [name, *data_files]),
        "data_files": {f: sha256_file(out / f) for f in data_files},
        "graph": onnx_export.graph_summary(out / name),
    }


def build(req: BuildRequest, out: Path, step: Callable[[str], None] = lambda s: None) -> BuildResult:
    """Make the requested artifacts in `out`; raises CvtError subclasses for anything users cause."""
    opts = req.options
    opts.check()
    variant = onnx_export.sized_variant(cvt_ref.get_variant(req.variant), opts.image_size)
    calib, calib_warning = (calibration.calibration_set(req.calib, req.calib_size)
                            if "int8" in req.precisions else (None, None))
    artifacts.prepare_folder(out)
    step(f"loading {req.weights}")
    model = cvt_ref.create_model(cvt_ref.get_variant(req.variant), req.weights, activation=req.activation)
    assert model.weights is not None
    source = {
        "variant": variant.name, "image_size": variant.image_size,
        "weights": model.weights.spec, "weights_sha256": model.weights.sha256,
        "activation": model.activation, "opset": opts.opset,
        "batch": opts.batch if opts.batch is not None else "dynamic",
        "tools": onnx_export.tool_versions(), "cvt_export": version("cvt-export"),
    }
    result = BuildResult(out=out, manifest={})
    if calib_warning:
        result.warnings.append(calib_warning)

    photos = cvt_ref.bundled_photos()
    images = cvt_ref.preprocess_batch(list(photos), variant).numpy()
    ref = onnx_export.reference_logits(model, images)

    with artifacts.locked(out), artifacts.staging(out) as staged:
        old = artifacts.read_manifest(out)
        same_source = old is not None and old.get("source") == source
        files: dict[str, Any] = {}
        moved: list[str] = []

        def keep(name: str, extra_ok: bool = True) -> bool:
            if same_source and extra_ok and old is not None and artifacts.verify(out, old, name):
                files[name] = old["files"][name]
                return True
            return False

        fp32 = FILES["fp32"]
        if keep(fp32):
            result.reused.append(fp32)
            fp32_path = out / fp32
        else:
            step(f"exporting {variant.name} to ONNX (opset {opts.opset})")
            written = onnx_export.export_fp32(model, variant, staged / fp32, opts)
            step("validating on ONNX Runtime against PyTorch")
            errors = onnx_export.validate_fp32(staged / fp32, images, ref, opts.batch)
            files[fp32] = {**_file_entry(staged, fp32, "fp32", written[1:]),
                           "validation": {"backend": "onnxruntime-cpu", "images": len(images),
                                          "max_abs": errors, "tolerance": onnx_export.FP32_TOLERANCE}}
            step("locating block outputs in the graph (probe points for drift reports)")
            files[fp32]["probes"] = probes.locate(staged / fp32, model, images[:1])
            moved += written
            fp32_path = staged / fp32
        fp32_sha = files[fp32]["sha256"]

        def measure(name: str, prec: Precision, path: Path, rows: list[int], note: str) -> dict[str, Any]:
            got = onnx_export.run_ort(onnx_export.ort_session(path), images[rows])
            fid: dict[str, Any] = {"backend": "onnxruntime-cpu", **fidelity(ref[rows], got),
                                   "images": len(rows), "on": note}
            if fid["cosine_min"] < TARGETS[prec] or fid["top1_agreement"] < 1.0:
                result.warnings.append(
                    f"{name}: cosine {fid['cosine_min']:.5f} (target {TARGETS[prec]}), top-1 agreement "
                    f"{100 * fid['top1_agreement']:.0f}% vs the FP32 reference on {note}")
            return fid

        if "fp16" in req.precisions:
            name = FILES["fp16"]
            if keep(name, old is not None and old["files"].get(name, {}).get("from") == fp32_sha):
                result.reused.append(name)
            else:
                step("converting to FP16 (LayerNorm, Softmax, classifier kept FP32)")
                written = precision.to_fp16(fp32_path, staged / name)
                files[name] = {**_file_entry(staged, name, "fp16", written[1:]), "from": fp32_sha,
                               "policy": {"fp32_ops": list(precision.FP32_OPS_IN_FP16),
                                          "fp32_nodes": "classifier", "io": "float32"}}
                files[name]["validation"] = measure(name, "fp16", staged / name, list(range(len(images))),
                                                  f"{len(images)} bundled photos")
                moved += written

        calib_info = None
        if "int8" in req.precisions:
            assert calib is not None
            name = FILES["int8"]
            key = calibration.cache_key(calib, variant, fp32_sha, req.int8)
            calib_info = {"source": calib.source, "images": len(calib.paths), "asked": calib.asked,
                          "sha256": calib.sha256, "method": req.int8.method, "cache_key": key,
                          "files": [p.name for p in calib.paths]}
            prior = old["files"].get(name, {}) if old is not None else {}
            same_calib = prior.get("calibration", {}).get("cache_key") == key
            if keep(name, prior.get("from") == fp32_sha and same_calib):
                result.reused.append(name)
            else:
                cache = calibration.cache_path(key)
                step("calibrating INT8" if not cache.is_file() else "INT8 from cached calibration")
                pixels = calib.load(variant) if not cache.is_file() else None
                result.calibrated = precision.to_int8(fp32_path, staged / name, pixels, req.int8, cache)
                written = [name] + ([f"{name}.data"] if (staged / f"{name}.data").exists() else [])
                digests = set(calib.digests)
                rows = [i for i, p in enumerate(photos) if sha256_file(p) not in digests]
                note = f"{len(rows)} bundled photos not used for calibration"
                if not rows:
                    rows = list(range(len(images)))
                    note = f"{len(images)} bundled photos, all used for calibration"
                files[name] = {**_file_entry(staged, name, "int8", written[1:]), "from": fp32_sha,
                               "calibration": calib_info,
                               "policy": {"quantized_ops": list(precision.QUANTIZED_OPS),
                                          **asdict(req.int8),
                                          "fp32": "LayerNorm, Softmax, GELU, residual Adds, classifier",
                                          "activations": "int8 symmetric per-tensor",
                                          "weights": "int8 symmetric per-channel", "bias": "float32",
                                          "quantized_inputs_of": precision.quantized_nodes(
                                              _load_header(staged / name))}}
                files[name]["validation"] = measure(name, "int8", staged / name, rows, note)
                moved += written

        result.made = [n for n in moved if n in FILES.values()]
        for name in set(FILES.values()) - set(files):  # other precisions made earlier from this model
            if old is not None and old["files"].get(name, {}).get("from") == fp32_sha and keep(name):
                result.reused.append(name)
        # Files of another source, or that no longer verify, must not outlive the manifest.
        if old is not None:
            for stale in set(old.get("files", {})) - set(files):
                for f in [stale, *old["files"][stale].get("data_files", {})]:
                    (out / f).unlink(missing_ok=True)
        manifest = {
            "schema": artifacts.MANIFEST_SCHEMA,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": source,
            "variant": variant.name,
            "weights": {"spec": model.weights.spec, "kind": model.weights.kind,
                        "sha256": model.weights.sha256, "activation": model.activation},
            "export": {"exporter": "torch.onnx.export(dynamo=True)", **asdict(opts),
                       "batchnorm": "folded into the depthwise convs"},
            "preprocess": {"image_size": variant.image_size, "resize": variant.resize_size,
                           "crop": variant.crop, "interpolation": "bicubic",
                           "mean": list(variant.mean), "std": list(variant.std)},
            "calibration": files.get(FILES["int8"], {}).get("calibration"),
            "files": {n: files[n] for n in FILES.values() if n in files},
        }
        made_from = {entry["sha256"] for entry in files.values()}
        derived = {name: entry for name, entry in (old or {}).get("openvino", {}).items()
                   if same_source and entry.get("from") in made_from}
        if derived:  # OpenVINO IRs made from files that are still here stay valid
            manifest["openvino"] = derived
        artifacts.commit(out, staged, moved, manifest)
        result.manifest = manifest
    return result


def _load_header(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False)

