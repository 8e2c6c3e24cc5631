"""One benchmark run: the same preprocessed inputs through every backend × precision × batch.

The reference is PyTorch FP32 eager from the artifact folder's own manifest (so it is the
model the files were exported from); it is always run, timed and used as the speed-up base.
Everything a runner produces is compared with it by the pure functions in `metrics`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

import cvt_ref
from cvt_export import (
    artifacts,
    build,
    calibration,
    imageset,
    machine,
    metrics,
    precisions,
    probes,
    records,
    validate,
)
from cvt_export.artifacts import ArtifactFolder
from cvt_export.backends import (
    BACKEND_MODULES,
    BackendError,
    BackendUnavailable,
    GemmLimit,
    Probing,
    get_backend,
    why_not,
)
from cvt_export.harness import profile, timing
from cvt_export.records import BenchReport, BenchSettings, Fidelity, LatencyStats, RoleFidelity, RoleSize, Row
from cvt_export.reference import reference_model
from cvt_export.runtime import OUTPUT_NAME
from cvt_ref.errors import CvtError
from cvt_ref.preprocess import list_images, preprocess_array
from cvt_ref.source import sha256_file

log = logging.getLogger(__name__)

PRECISIONS = precisions.NAMES  # the opt-in ones (mixed, int8dyn): when made, or asked for by name
BASELINE = ("torch", "fp32")


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
    golden: bool = False  # the regression gate's golden inputs instead of the evaluation set
    warmup: int = 3
    iters: int | None = None
    seconds: float = 2.0
    threads: int | None = None
    strict: bool = False  # a backend asked for alone must run: its absence is an error

    @property
    def named(self) -> bool:
        """A --precision list was given (the default holds every precision, opt-in ones and ones a
        backend has no path for included)."""
        return self.precisions != PRECISIONS

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
        if not 0 < self.seconds <= 3600 or self.warmup < 0:  # NaN fails it too
            raise BenchError("--seconds must be in (0, 3600] and --warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"--threads {self.threads}: use 1 or more (leave it out for each "
                             "backend's default)")
        for name in self.backends:
            get_backend(name)  # unknown names fail here, before any work
        if self.dataset is not None and self.dataset.is_dir():  # before an export, not after it
            n = len(list_images(self.dataset))
            check_in_memory(self.dataset, min(n, self.limit or n))

    def settings(self, drift_images: int) -> BenchSettings:
        """What the report says the run was asked for."""
        asked: dict[str, Any] = {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v
                                 for f in fields(self)}  # the record has a field for each of them
        return BenchSettings(**asked, drift_images=drift_images)


@dataclass
class Inputs:
    names: list[str]
    images: np.ndarray          # float32[N,3,H,W], through the reference preprocessing
    labels: np.ndarray | None   # int[N] when the dataset's class folders name the model's classes
    source: str
    sha256: str
    accuracy_note: str = ""     # why there are no labels, when a dataset was given
    paths: list[Path] = field(default_factory=list)
    items: list[imageset.Item] = field(default_factory=list)


def class_index(labels: list[str]) -> dict[str, int]:
    """Folder name -> class index: the model's own label names (case-insensitive), then, for
    ImageNet-1k heads, WordNet synsets; a plain number is taken as the index itself."""
    index = {name.lower(): i for i, name in enumerate(labels)}
    if len(labels) == 1000:
        index.update({s.lower(): i for i, s in enumerate(cvt_ref.imagenet_synsets())})
    index.update({str(i): i for i in range(len(labels))})
    return index


IN_MEMORY = 2000  # the most inputs `cvt-bench --dataset` holds (about 1.2 GB at 224 px)


def check_in_memory(dataset: Path, n: int) -> None:
    if n > IN_MEMORY:
        raise BenchError(
            f"--dataset {dataset}: {n} images; the benchmark holds its inputs in memory (0.6 MB each "
            f"at 224 px), so it takes at most {IN_MEMORY}: pass --limit {IN_MEMORY} for latency and "
            f"fidelity on a sample, and `cvt-bench accuracy --dataset {dataset}` for accuracy on "
            "every image (streamed)")


def folder_labels(paths: list[Path], dataset: Path, variant: cvt_ref.Variant,
                  labels: list[str] | None = None) -> tuple[np.ndarray | None, str]:
    """int[N] labels from an ImageFolder layout (folders named after the model's labels, synsets
    or class indices), or None and why not."""
    index = class_index(labels or cvt_ref.class_names(variant.num_classes))
    folders = [p.parent.name if p.parent != dataset else None for p in paths]
    unknown = sorted({f for f in folders if f is not None and f.lower() not in index})
    if None in folders:
        return None, "accuracy skipped: some images are not in class folders (ImageFolder layout)"
    if unknown:
        return None, (f"accuracy skipped: class folders {', '.join(unknown[:3])}"
                      f"{' ...' if len(unknown) > 3 else ''} are not the model's labels, synsets or "
                      f"class indices 0..{variant.num_classes - 1}")
    return np.asarray([index[f.lower()] for f in folders if f is not None], dtype=np.int64), ""


def load_inputs(dataset: Path | None, limit: int | None, variant: cvt_ref.Variant,
                labels: list[str] | None = None, *, golden: bool = False) -> Inputs:
    """The bundled evaluation set (17 photographs in `imageset.VIEWS` views each), an image
    folder (ImageFolder layout, folders named after the model's classes, gives labels and
    accuracy), or, `golden`, the regression gate's golden inputs (the 11 photographs of
    cvt_ref/data/photos, one view each)."""
    if golden:
        items, source = imageset.file_items(cvt_ref.bundled_photos()), "golden photos"
    elif dataset is None:
        items, source = imageset.bundled_items(), "the bundled evaluation set"
    else:
        if not dataset.is_dir():
            raise BenchError(f"--dataset {dataset}: no such folder")
        paths, source = list_images(dataset), str(dataset)
        if not paths:
            raise BenchError(f"--dataset {dataset}: holds no images")
        chosen = calibration.spread(paths, limit) if limit else paths
        check_in_memory(dataset, len(chosen))
        items = imageset.file_items(chosen)
    if limit and dataset is None:
        items = calibration.spread(items, limit)
    found_labels, note = None, ""
    if dataset is not None:
        found_labels, note = folder_labels([it.path for it in items], dataset, variant, labels)
    images = np.stack([preprocess_array(it.image(), variant) for it in items])  # one decoded image at a time
    digest = hashlib.sha256(images.tobytes()).hexdigest()
    names = [str(it.path.relative_to(dataset)) if dataset else it.name for it in items]
    return Inputs(names, images, found_labels, source, digest, note, [it.path for it in items], items)


def judge(precision: str, reference: np.ndarray, logits: np.ndarray, names: list[str],
          roles: Roles | None = None) -> Fidelity:
    """Fidelity against the reference, and whether it is within the precision's bounds; with
    `roles`, also the fidelity per role: `selection` (what decides), `confirmation` (what the
    report states) and `held_out` (both, every input not used for calibration)."""

    def on(*wanted: str) -> RoleFidelity | None:
        rows = roles.rows(*wanted) if roles is not None else []
        return RoleFidelity.of(metrics.fidelity(reference[rows], logits[rows]), len(rows)) if rows else None

    return replace(metrics.judged(precision, metrics.full_fidelity(reference, logits, names)),
                   held_out=on("selection", "confirmation"), selection=on("selection"),
                   confirmation=on("confirmation"))


@dataclass(frozen=True)
class Roles:
    """Which rows of the inputs play which role against a folder's INT8 calibration."""

    of: list[str]                 # per row: calibration | selection | confirmation
    sizes: dict[str, RoleSize]
    note: str

    def rows(self, *wanted: str) -> list[int]:
        return [i for i, r in enumerate(self.of) if r in wanted]


def roles(inputs: Inputs, folder: ArtifactFolder) -> Roles:
    """The inputs' roles: calibration images (recognised by decoded content, or, for folders
    exported before fingerprints were recorded, by file content or name), then the other groups
    alternating selection and confirmation."""
    used = folder.calibration_images
    of = imageset.roles(inputs.items, used.fingerprints)
    if not used.fingerprints and (used.digests or used.source == inputs.source):
        digests = set(used.digests)
        old = {i for i, it in enumerate(inputs.items)
               if (digests and sha256_file(it.path) in digests)
               or (not digests and it.path.name in used.files)}
        groups = {inputs.items[i].group for i in old}
        rest = [it.group for it in inputs.items if it.group not in groups]
        order = {g: ("selection", "confirmation")[k % 2] for k, g in enumerate(sorted(set(rest)))}
        of = ["calibration" if it.group in groups else order[it.group] for it in inputs.items]
    sizes = imageset.sizes(of, inputs.items)
    note = ", ".join(f"{r} {sizes[r].inputs} ({sizes[r].sources} images)" for r in imageset.ROLES)
    return Roles(of, sizes, f"{inputs.source}: {note}")


def run_all(runner: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner(images[i:i + batch]) for i in range(0, len(images), batch)])


def bench_one(backend: str, precision: str, folder: ArtifactFolder, inputs: Inputs, cfg: BenchConfig,
              reference: np.ndarray | None, roles: Roles | None = None, macs: profile.Work | None = None
              ) -> tuple[Row, np.ndarray | None]:
    """One row. `macs`: the model's multiply-adds per image; with them, a runner that can
    measure its runtime's GEMM limit does so after its timings, and the row says how far each
    batch's median is from that floor."""
    b = get_backend(backend)
    why = why_not(b, precision)
    if why:
        return Row(backend, precision, status="skipped", reason=why), None
    timing.reset_peak_rss()
    t0 = time.perf_counter()
    latency: dict[str, LatencyStats] = {}
    floor = None
    try:  # the backend is here: a failure to load, compile or run the artifact is an error
        with b.compile(folder, precision, threads=cfg.threads) as runner:
            runner(inputs.images[:cfg.batches[0]])
            first = time.perf_counter() - t0
            info = runner.info
            largest = max(cfg.batches)
            logits = run_all(runner, inputs.images, largest)
            head = inputs.images[:largest]
            alone = np.concatenate([runner(head[i:i + 1]) for i in range(len(head))])
            for batch in cfg.batches:
                x = np.resize(inputs.images, (batch, *inputs.images.shape[1:]))
                latency[str(batch)] = timing.measure(runner, x, warmup=cfg.warmup, iters=cfg.iters,
                                                     seconds=cfg.seconds)
            if macs and isinstance(runner, GemmLimit):
                floor = profile.gemm_floor(runner, macs, latency)
    except BackendError as e:  # BackendUnavailable: the SDK, device or hardware feature is not here
        status = "skipped" if isinstance(e, BackendUnavailable) else "error"
        return Row(backend, precision, status=status, reason=str(e)), None
    return Row(
        backend, precision, executed=info.executed, device=info.device, artifact=info.artifact,
        first_inference_s=first, peak_rss_mb=timing.peak_rss_mb(),
        fidelity=None if reference is None else judge(precision, reference, logits, inputs.names, roles),
        accuracy=None if inputs.labels is None else metrics.accuracy(logits, inputs.labels),
        batch_consistency_max_abs=metrics.max_abs(alone, logits[:len(head)]),
        batch_consistency_cosine_min=float(metrics.cosine(alone, logits[:len(head)]).min()),
        latency=latency, floor=floor), logits


DRIFT_IMAGES = 4


def stage_drift(row: Row, folder: ArtifactFolder, located: dict[str, str], x: np.ndarray,
                ref_points: dict[str, np.ndarray], ref_logits: np.ndarray, threads: int | None) -> Row:
    """Each block's output on the backend vs the reference's; where the error grows most."""
    backend = get_backend(row.backend)
    if not isinstance(backend, Probing) or not located:
        return row
    got = backend.probe(folder, row.precision, list(located.values()), x, threads=threads)
    pairs = [(key, ref_points[key], got[tensor]) for key, tensor in located.items() if tensor in got]
    pairs.append((OUTPUT_NAME, ref_logits, got[OUTPUT_NAME]))
    drifts = tuple(metrics.drift(key, ref, out) for key, ref, out in pairs)
    return replace(row, drift=drifts,
                   drift_located=metrics.largest_growth([d.point for d in drifts], [d.error for d in drifts]))


def needed_onnx(cfg: BenchConfig) -> tuple[str, ...]:
    """The ONNX precisions the requested runs read (bf16 runs the FP32 file)."""
    wanted = {"fp32"}
    for backend in cfg.backends:
        name = get_backend(backend).name
        wanted |= {precisions.reads(p) for p in cfg.precisions if name in precisions.get(p).backends
                   and name != "torch" and (not precisions.get(p).opt_in or _made_when_asked(cfg, p))}
    return tuple(p for p in precisions.EXPORTED if p in wanted)


def prepare_artifacts(cfg: BenchConfig, step: Callable[[str], None]) -> ArtifactFolder:
    """Reuse the given folder if it has what is needed, else export (cached) into it."""
    path = cfg.artifacts or Path("artifacts") / cfg.variant
    wanted = needed_onnx(cfg)
    folder = ArtifactFolder.existing(path)
    if cfg.artifacts is not None and folder is None and path.is_dir() and any(path.iterdir()):
        raise BenchError(f"--artifacts {path}: not a finished export (no valid manifest.json); "
                         f"re-run `cvt-export onnx --out {path}`")
    if folder is not None and folder.variant_name != cfg.variant:
        raise BenchError(f"{path} holds {folder.variant_name} artifacts, not {cfg.variant}; "
                         f"pass --variant {folder.variant_name} or another --artifacts folder")
    weights = cfg.weights or (folder.weights_spec if folder else "random")
    same = folder is not None and folder.weights_spec == weights
    if folder is not None and same and all(folder.has(p) for p in wanted):
        for p in wanted:
            folder.onnx(p)  # verifies hashes: a corrupt file is refused here
        return folder
    if folder is not None and same:  # add the missing precisions with the folder's own export settings
        # (only those: the files it has stay as they are, so adding a file that needs no calibration
        # never needs the calibration images again)
        missing = tuple(p for p in wanted if p == precisions.REFERENCE or not folder.has(p))
        req = build.request_from_folder(folder, missing)
    else:
        req = build.BuildRequest(cfg.variant, weights, precisions=wanted)
    build.build(req, path, step=step)
    return ArtifactFolder.open(path)


def _derived_files_writable(cfg: BenchConfig, folder: ArtifactFolder) -> None:
    """OpenVINO IRs are made beside the ONNX files on first use: on a read-only folder without
    current IRs, say so before anything runs (not after the other backends' minutes)."""
    if "openvino" not in {get_backend(b).name for b in cfg.backends}:
        return
    from cvt_export.backends import openvino as ov

    if not ov.BACKEND.available()[0]:
        return
    try:  # cheap, and the common case: a writable folder can take any IR that must be made
        artifacts.check_writable(folder.path, "--artifacts", ov.DERIVED_HINT)
    except artifacts.ArtifactError:
        if any(ov.ir_stale(folder, p) for p in cfg.precisions if p in ov.BACKEND.precisions):
            raise


def run(cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> BenchReport:
    cfg.check()
    folder = prepare_artifacts(cfg, progress)
    _derived_files_writable(cfg, folder)
    if _only_tuned(cfg.precisions):  # asked for alone: a missing or stale mix is said at once,
        for p in cfg.precisions:  # not after the reference's minutes
            folder.onnx(p, check_hash=False)
    with folder.lock():  # one writer: IRs and optimized graphs may be made beside the files
        return _measure(cfg, folder, progress)


def _asked_for(cfg: BenchConfig, backend: str, precision: str) -> bool:
    """A row the user asked for: one the backend has a path for, or any row of a --precision
    list they gave."""
    return precision in get_backend(backend).precisions or cfg.named


def _made_when_asked(cfg: BenchConfig, precision: str) -> bool:
    """An opt-in precision the export makes (int8dyn) is made for this run when asked for by name
    (not by the default list of every precision)."""
    return cfg.named and precisions.get(precision).made_by == "export"


def _only_tuned(asked: tuple[str, ...]) -> bool:
    """Only precisions `cvt-export tune` makes were asked for (their file is then required)."""
    return bool(asked) and all(precisions.get(p).tuned for p in asked)


def _measure(cfg: BenchConfig, folder: ArtifactFolder, progress: Callable[[str], None]) -> BenchReport:
    inputs = load_inputs(cfg.dataset, cfg.limit, folder.variant, folder.labels, golden=cfg.golden)
    alone = _only_tuned(cfg.precisions)
    pairs = [(get_backend(b).name, p) for b in cfg.backends for p in cfg.precisions  # opt-in: when made
             if not precisions.get(p).opt_in or folder.has(p) or alone or _made_when_asked(cfg, p)]
    pairs = [BASELINE, *[pair for pair in dict.fromkeys(pairs) if pair != BASELINE]]
    results: list[Row] = []
    reference: np.ndarray | None = None
    split = roles(inputs, folder)
    probe_x = inputs.images[:DRIFT_IMAGES]
    ref_model = reference_model(folder)
    ref_points = probes.reference_probes(ref_model, probe_x)
    ref_probe_logits = validate.reference_logits(ref_model, probe_x)
    # Folders exported before probes existed: locate them now (one run, about a second).
    located = folder.probes or probes.locate(folder.onnx("fp32"), ref_model, probe_x[:1])
    macs = profile.work(folder, ref_model)
    del ref_model
    for i, (backend, precision) in enumerate(pairs, 1):
        # "row i of n", not "(i/n)": rows differ tenfold in cost, so no time-left estimate is made
        # from them (it swung between 2x and 4x the real time); a backend not here is not "running"
        why = why_not(get_backend(backend), precision)  # the reason bench_one will give
        progress(f"{'skipping' if why else 'running'} {backend} {precision}{f' ({why})' if why else ''}, "
                 f"row {i} of {len(pairs)}")
        result, logits = bench_one(backend, precision, folder, inputs, cfg, reference, split, macs)
        if (backend, precision) == BASELINE:
            if logits is None:
                raise BenchError(f"the PyTorch FP32 reference could not run: {result.reason}")
            reference = logits
            result = replace(result, fidelity=judge(precision, reference, logits, inputs.names, split))
        if result.status == "ok" and (backend, precision) != BASELINE:
            progress(f"{backend} {precision}: per-block drift, row {i} of {len(pairs)}")
            result = stage_drift(result, folder, located, probe_x, ref_points, ref_probe_logits, cfg.threads)
        if (cfg.strict and result.status != "ok" and len(cfg.backends) == 1
                and _asked_for(cfg, backend, precision)):
            raise BenchError(f"{backend} {precision}: {result.reason}")
        results.append(result)
    base = results[0].latency
    results = [replace(r, speedup={b: base[b].median_ms / s.median_ms for b, s in r.latency.items()
                                   if b in base}) for r in results]
    return BenchReport(
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        machine=machine.describe(),
        model=folder.summary(),
        inputs=records.Inputs(source=inputs.source, images=len(inputs.names),
                              labelled=inputs.labels is not None, accuracy_note=inputs.accuracy_note,
                              sha256=inputs.sha256,
                              held_out_note=split.note, roles=split.sizes,
                              image_size=int(inputs.images.shape[-1])),
        settings=cfg.settings(drift_images=len(probe_x)),
        baseline=records.Baseline(*BASELINE),
        results=tuple(results))
