"""One benchmark run: the same preprocessed inputs through every backend × precision × batch.

The reference is PyTorch FP32 eager from the artifact folder's own manifest (so it is the
model the files were exported from); it is always run, timed and used as the speed-up base.
Everything a runner produces is compared with it by the pure functions in `metrics`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

import cvt_ref
from cvt_export import artifacts, build, probes
from cvt_export.backends import BACKEND_MODULES, BackendError, get_backend
from cvt_export.backends.ort import cpu_name
from cvt_export.harness import metrics, timing
from cvt_ref.errors import CvtError
from cvt_ref.preprocess import list_images

log = logging.getLogger(__name__)

REPORT_SCHEMA = "cvt-bench/1"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
BASELINE = ("torch", "fp32")
# What "matches the reference" means per precision (the export issue's bounds; BF16 has three
# fewer mantissa bits than FP16). A result outside them is flagged in every output.
BOUNDS: dict[str, dict[str, float]] = {
    "fp32": {"max_abs": 1e-4},
    "fp16": {"cosine_min": 0.9999, "top1_agreement": 1.0},
    "bf16": {"cosine_min": 0.999, "top1_agreement": 1.0},
    "int8": {"cosine_min": 0.995},
}


def within_bounds(precision: str, fid: dict[str, Any]) -> list[str]:
    """The bounds a fidelity summary breaks (empty: it passes)."""
    broken = []
    for key, bound in BOUNDS[precision].items():
        value = fid[key]
        if (value > bound) if key == "max_abs" else (value < bound):
            broken.append(f"{key} {value:.6g} {'>' if key == 'max_abs' else '<'} {bound:g}")
    return broken


class BenchError(CvtError):
    """Bad benchmark input: an empty dataset, a batch size of 0, an unknown backend..."""


@dataclass(frozen=True)
class BenchConfig:
    backends: tuple[str, ...] = tuple(BACKEND_MODULES)
    precisions: tuple[str, ...] = PRECISIONS
    batches: tuple[int, ...] = (1, 8)
    variant: str = "cvt-13"
    weights: str | None = None  # None: the artifact folder's own, else random
    artifacts: Path | None = None
    dataset: Path | None = None
    limit: int | None = None
    warmup: int = 3
    iters: int | None = None
    seconds: float = 2.0
    threads: int | None = None
    strict: bool = False  # a backend asked for alone must run: its absence is an error

    def check(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise BenchError(f"--batch {','.join(map(str, self.batches))}: batch sizes must be >= 1")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise BenchError(f"--precision {','.join(self.precisions)}: use {', '.join(PRECISIONS)}")
        if self.limit is not None and self.limit < 1:
            raise BenchError(f"--limit {self.limit}: must be >= 1")
        if self.iters is not None and self.iters < 1:
            raise BenchError(f"--iters {self.iters}: must be >= 1")
        if self.seconds <= 0 or self.warmup < 0:
            raise BenchError("--seconds must be > 0 and --warmup >= 0")
        for name in self.backends:
            get_backend(name)  # unknown names fail here, before any work


@dataclass
class Inputs:
    names: list[str]
    images: np.ndarray          # float32[N,3,H,W], through the reference preprocessing
    labels: np.ndarray | None   # int[N] when the dataset has class folders
    source: str
    sha256: str


def _label_of(folder_name: str, synsets: dict[str, int]) -> int | None:
    if folder_name in synsets:
        return synsets[folder_name]
    if folder_name.isdigit() and int(folder_name) < 1000:
        return int(folder_name)
    return None


def load_inputs(dataset: Path | None, limit: int | None, variant: cvt_ref.Variant) -> Inputs:
    """Bundled photographs, or an image folder (ImageFolder layout gives labels)."""
    if dataset is None:
        paths, source = cvt_ref.bundled_photos(), "bundled photos"
    else:
        if not dataset.is_dir():
            raise BenchError(f"--dataset {dataset}: no such folder")
        paths, source = list_images(dataset), str(dataset)
        if not paths:
            raise BenchError(f"--dataset {dataset}: holds no images")
    paths = paths[:limit] if limit else paths
    labels = None
    if dataset is not None:
        synsets = {s: i for i, s in enumerate(cvt_ref.imagenet_synsets())}
        found = [_label_of(p.parent.name, synsets) if p.parent != dataset else None for p in paths]
        if all(label is not None for label in found):
            labels = np.asarray(found, dtype=np.int64)
    images = cvt_ref.preprocess_batch(list(paths), variant).numpy()
    digest = hashlib.sha256(images.tobytes()).hexdigest()
    names = [str(p.relative_to(dataset)) if dataset else p.name for p in paths]
    return Inputs(names, images, labels, source, digest)


def machine() -> dict[str, Any]:
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                          "amx_bf16", "amx_int8", "amx_tile", "avx_vnni")
                flags = [f for f in wanted if f in have]
                break
    except OSError:
        pass
    libs = {}
    for name in ("torch", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "tensorrt", "numpy"):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "isa": flags, "os": platform.platform(),
            "python": sys.version.split()[0], "libraries": libs}


@dataclass
class Result:
    backend: str
    precision: str
    status: str = "ok"                 # ok | skipped | error
    reason: str = ""
    executed: str = ""
    device: str = ""
    artifact: str = ""
    first_inference_s: float | None = None
    peak_rss_mb: float | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, float] | None = None
    batch_consistency_max_abs: float | None = None
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    drift: list[dict[str, Any]] = field(default_factory=list)
    drift_located: str | None = None


def judge(result: Result, reference: np.ndarray, logits: np.ndarray, names: list[str]) -> None:
    """Fidelity against the reference, and whether it is within the precision's bounds."""
    result.fidelity = metrics.full_fidelity(reference, logits, names)
    broken = within_bounds(result.precision, result.fidelity)
    result.fidelity.update({"bounds": BOUNDS[result.precision], "pass": not broken, "broken": broken})


def _run_all(runner: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner(images[i:i + batch]) for i in range(0, len(images), batch)])


def bench_one(backend: str, precision: str, folder: Path, inputs: Inputs, cfg: BenchConfig,
              reference: np.ndarray | None) -> tuple[Result, np.ndarray | None]:
    result = Result(backend, precision)
    b = get_backend(backend)
    if precision not in b.precisions:
        result.status, result.reason = "skipped", f"{b.name} has no {precision} path"
        return result, None
    ok, why = b.available()
    if not ok:
        result.status, result.reason = "skipped", why
        return result, None
    timing.reset_peak_rss()
    t0 = time.perf_counter()
    try:
        runner = b.compile(folder, precision, threads=cfg.threads)
    except BackendError as e:
        result.status, result.reason = "skipped", str(e)
        return result, None
    with runner:
        runner(inputs.images[:cfg.batches[0]])
        result.first_inference_s = time.perf_counter() - t0
        info = runner.info
        result.executed, result.device, result.artifact = info.executed, info.device, info.artifact
        largest = max(cfg.batches)
        logits = _run_all(runner, inputs.images, largest)
        head = inputs.images[:largest]
        alone = np.concatenate([runner(head[i:i + 1]) for i in range(len(head))])
        result.batch_consistency_max_abs = metrics.max_abs(alone, logits[:len(head)])
        for batch in cfg.batches:
            x = np.resize(inputs.images, (batch, *inputs.images.shape[1:]))
            result.latency[str(batch)] = timing.measure(runner, x, warmup=cfg.warmup, iters=cfg.iters,
                                                        seconds=cfg.seconds)
    result.peak_rss_mb = timing.peak_rss_mb()
    if reference is not None:
        judge(result, reference, logits, inputs.names)
    if inputs.labels is not None:
        result.accuracy = metrics.accuracy(logits, inputs.labels)
    return result, logits


DRIFT_IMAGES = 4


def stage_drift(result: Result, folder: Path, located: dict[str, str], x: np.ndarray,
                ref_points: dict[str, np.ndarray], ref_logits: np.ndarray, threads: int | None) -> None:
    """Each block's output on the backend vs the reference's; where the error grows most."""
    backend = get_backend(result.backend)
    if not hasattr(backend, "probe") or not located:
        return
    got = backend.probe(folder, result.precision, list(located.values()), x, threads=threads)
    pairs = [(key, ref_points[key], got[tensor]) for key, tensor in located.items() if tensor in got]
    pairs.append(("logits", ref_logits, got["logits"]))
    drifts = [metrics.drift(ref, out) for _, ref, out in pairs]
    result.drift = [{"point": key, **d} for (key, _, _), d in zip(pairs, drifts, strict=True)]
    result.drift_located = metrics.largest_growth([key for key, _, _ in pairs], [d["error"] for d in drifts])


def needed_onnx(cfg: BenchConfig) -> tuple[str, ...]:
    """The ONNX precisions the requested runs read (bf16 runs the FP32 file)."""
    wanted = {"fp32"}
    for backend in cfg.backends:
        if get_backend(backend).name in ("ort", "openvino", "tensorrt"):
            wanted |= {p for p in cfg.precisions if p in ("fp16", "int8")}
    return tuple(p for p in ("fp32", "fp16", "int8") if p in wanted)


def prepare_artifacts(cfg: BenchConfig, step: Callable[[str], None]) -> Path:
    """Reuse the given folder if it has what is needed, else export (cached) into it."""
    folder = cfg.artifacts or Path("artifacts") / cfg.variant
    wanted = needed_onnx(cfg)
    manifest = artifacts.read_manifest(folder) if folder.is_dir() else None
    if cfg.artifacts is not None and manifest is None and folder.is_dir() and any(folder.iterdir()):
        raise BenchError(f"--artifacts {folder}: not a finished export (no valid manifest.json); "
                         f"re-run `cvt-export onnx --out {folder}`")
    if manifest is not None and manifest["variant"] != cfg.variant:
        raise BenchError(f"{folder} holds {manifest['variant']} artifacts, not {cfg.variant}; "
                         f"pass --variant {manifest['variant']} or another --artifacts folder")
    weights = cfg.weights or (manifest["weights"]["spec"] if manifest else "random")
    same = manifest is not None and manifest["weights"]["spec"] == weights
    if same and manifest and all(artifacts.ONNX_FILES[p] in manifest["files"]  # type: ignore[index]
                                 for p in wanted):
        for p in wanted:
            artifacts.onnx_file(folder, p)  # verifies hashes: a corrupt file is refused here
        return folder
    req = build.BuildRequest(cfg.variant, weights, precisions=wanted)  # type: ignore[arg-type]
    build.build(req, folder, step=step)
    return folder


def run(cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    cfg.check()
    folder = prepare_artifacts(cfg, progress)
    manifest = artifacts.load_manifest(folder)
    variant = cvt_ref.get_variant(manifest["variant"])
    inputs = load_inputs(cfg.dataset, cfg.limit, variant)
    pairs = [(get_backend(b).name, p) for b in cfg.backends for p in cfg.precisions]
    pairs = [BASELINE, *[pair for pair in dict.fromkeys(pairs) if pair != BASELINE]]
    results: list[Result] = []
    reference: np.ndarray | None = None
    probe_x = inputs.images[:DRIFT_IMAGES]
    with get_backend("torch").compile(folder, "fp32") as torch_ref:
        ref_model = torch_ref.model  # type: ignore[attr-defined]
        ref_points = probes.reference_probes(ref_model, probe_x)
        ref_probe_logits = torch_ref(probe_x)
        # Folders exported before probes existed: locate them now (one run, about a second).
        located = manifest["files"]["model.onnx"].get("probes") or probes.locate(
            folder / "model.onnx", ref_model, probe_x[:1])
    for backend, precision in pairs:
        progress(f"{backend} {precision}")
        result, logits = bench_one(backend, precision, folder, inputs, cfg, reference)
        if (backend, precision) == BASELINE:
            if logits is None:
                raise BenchError(f"the PyTorch FP32 reference could not run: {result.reason}")
            reference = logits
            judge(result, reference, logits, inputs.names)
        if result.status == "ok" and (backend, precision) != BASELINE:
            progress(f"{backend} {precision}: per-block drift")
            stage_drift(result, folder, located, probe_x, ref_points, ref_probe_logits, cfg.threads)
        if cfg.strict and result.status != "ok" and len(cfg.backends) == 1:
            raise BenchError(f"{backend} {precision}: {result.reason}")
        results.append(result)
    base = results[0].latency
    for r in results:
        r.speedup = {b: base[b]["median_ms"] / s["median_ms"] for b, s in r.latency.items() if b in base}
    return {
        "schema": REPORT_SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": {"variant": manifest["variant"], "weights": manifest["weights"], "artifacts": str(folder),
                  "onnx_sha256": manifest["files"]["model.onnx"]["sha256"]},
        "inputs": {"source": inputs.source, "images": len(inputs.names),
                   "labelled": inputs.labels is not None, "sha256": inputs.sha256,
                   "image_size": int(inputs.images.shape[-1])},
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                     "drift_images": len(probe_x)},
        "baseline": {"backend": BASELINE[0], "precision": BASELINE[1]},
        "results": [asdict(r) for r in results],
    }
