"""One export job: reference model -> FP32 / FP16 / INT8 ONNX files + manifest, in one folder.

Order matters for users: every input is checked (variant, weights, options, calibration
folder, the folder's writability and its previous source) before the minute of exporting
starts; files are made in a private staging folder and validated there; only then are they
renamed into place, with the manifest written last. A folder whose manifest already describes
the same source keeps the files that still verify, so asking for INT8 after FP32 does not
export again. A folder holding an export of another model is only replaced with `force`.

Each artifact is one function (`make_fp32`, `make_fp16`, `make_int8`, `make_int8dyn`) returning its manifest
entry and the files it staged; `reusable` is the rule for keeping an old file, and
`manifest_for` assembles the manifest.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

import cvt_ref
from cvt_export import (
    artifacts,
    calibration,
    derive,
    imageset,
    metrics,
    precisions,
    probes,
    records,
    validate,
)
from cvt_export.artifacts import ArtifactFolder
from cvt_export.exporter import ExportOptions, export_fp32, graph_summary, tool_versions
from cvt_export.options import DEFAULT_OPSET
from cvt_export.records import (
    Calibration,
    ExportSettings,
    ExportSource,
    FileEntry,
    GraphSummary,
    HeldFidelity,
    IrEntry,
    Manifest,
    Outliers,
    Policy,
    Preprocess,
    SmoothSearch,
    Validation,
    Weights,
)
from cvt_export.runtime import ort_session, run_logits
from cvt_export.smoothing import migrated_file, smoothed
from cvt_ref.model import CvT
from cvt_ref.source import Activation, sha256_file
from cvt_ref.variants import Variant

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = precisions.DEFAULT_EXPORT
FILES = artifacts.ONNX_FILES


@dataclass(frozen=True)
class BuildRequest:
    variant: str
    weights: str = "random"
    activation: Activation | None = None
    options: ExportOptions = field(default_factory=ExportOptions)
    precisions: tuple[str, ...] = ("fp32",)
    calib: Path | None = None
    calib_size: int | None = None
    int8: derive.Int8Options = field(default_factory=derive.Int8Options)
    force: bool = False  # replace an export of another source in the same folder
    outliers: int = 0    # cvt_ref's function-preserving outlier stress (channels per site)
    outlier_seed: int = 0
    # INT8: SmoothQuant strengths to choose from on the selection images (None in it: off);
    # empty: `int8.smooth` as given. `cvt-export onnx` asks for derive.SMOOTH_CHOICES by default.
    smooth_search: tuple[float | None, ...] = ()


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest | None = None
    made: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    calibrated: bool | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Made:
    """One artifact made in staging: its manifest entry, the staged files, a fidelity warning."""

    name: str
    entry: FileEntry
    files: list[str]
    warning: str | None = None
    calibrated: bool | None = None


@dataclass(frozen=True)
class Job:
    """What every artifact step reads: the model, its variant, the images and their reference logits."""

    model: CvT
    variant: Variant
    opts: ExportOptions
    photos: list[Path]
    images: np.ndarray
    ref: np.ndarray
    staged: Path


def request_from_folder(folder: ArtifactFolder, wanted: tuple[str, ...]) -> BuildRequest:
    """A request that re-makes (or adds to) a folder from its own recorded source and settings."""
    source = folder.source
    calib = folder.calibration or Calibration()
    opts = ExportOptions(opset=source.opset or DEFAULT_OPSET,
                         batch=None if source.batch == "dynamic" else int(source.batch),
                         image_size=source.image_size)
    stress = source.outliers
    return BuildRequest(folder.variant_name, source.weights,
                        activation=source.activation,
                        options=opts, precisions=wanted,
                        outliers=stress.channels if stress else 0, outlier_seed=stress.seed if stress else 0,
                        calib=None if calib.source in (None, "bundled photos") else Path(str(calib.source)),
                        calib_size=calib.asked)


def file_entry(folder: Path, files: list[str], prec: str, **made: Any) -> FileEntry:
    """A file's manifest entry: its hash, size, external data and graph, and `made` (FileEntry's
    other fields: what it was made from, how, its fidelity)."""
    name, data_files = files[0], files[1:]
    return FileEntry(precision=prec, sha256=sha256_file(folder / name),
                     bytes=sum((folder / f).stat().st_size for f in files),
                     data_files={f: sha256_file(folder / f) for f in data_files},
                     graph=records.parse(GraphSummary, graph_summary(folder / name), name), **made)


def source_of(model: CvT, variant: Variant, opts: ExportOptions) -> ExportSource:
    assert model.weights is not None
    spec = model.outliers
    outliers = None if spec is None else Outliers(channels=spec.channels, seed=spec.seed, low=spec.low,
                                                  high=spec.high, share=spec.share)
    return ExportSource(
        variant=variant.name, image_size=variant.image_size, num_classes=variant.num_classes,
        weights=model.weights.spec, weights_sha256=model.weights.sha256,
        activation=model.activation, opset=opts.opset, outliers=outliers,
        batch=opts.batch if opts.batch is not None else "dynamic",
        tools=tool_versions(), cvt_export=version("cvt-export"))


def reusable(old_entry: FileEntry | None, *, same_source: bool, fp32_sha: str | None = None,
             calib_key: str | None = None, int8_sha: str | None = None) -> bool:
    """Whether an old manifest entry may be kept (before its files are verified by sha256): same
    source; a derived file made from today's FP32 file; INT8 from the same calibration; tune's
    mix re-made from today's INT8 file (same calibration ranges, migration and placement)."""
    if old_entry is None or not same_source:
        return False
    if fp32_sha is not None and old_entry.made_from != fp32_sha:
        return False
    if int8_sha is not None and old_entry.int8_from != int8_sha:
        return False
    if calib_key is None:
        return True
    return old_entry.calibration is not None and old_entry.calibration.key == calib_key


def make_fp32(job: Job, step: Callable[[str], None]) -> Made:
    name = FILES["fp32"]
    step(f"exporting {job.variant.name} to ONNX (opset {job.opts.opset})")
    files = export_fp32(job.model, job.variant, job.staged / name, job.opts)
    step("validating on ONNX Runtime against PyTorch")
    validation = validate.validate_fp32(job.staged / name, job.images, job.ref, job.opts.batch)
    step("locating block outputs in the graph (probe points for drift reports)")
    located = probes.locate(job.staged / name, job.model, job.images[:1])
    return Made(name, file_entry(job.staged, files, "fp32", validation=validation, probes=located), files)


def make_fp16(job: Job, fp32_path: Path, fp32_sha: str, step: Callable[[str], None]) -> Made:
    name = FILES["fp16"]
    step("converting to FP16 (LayerNorm, Softmax, classifier kept FP32)")
    derived = derive.to_fp16(fp32_path, job.staged / name)
    policy = Policy(fp32_ops=derive.FP32_OPS_IN_FP16, fp32_nodes="classifier", io="float32")
    validation, warning = _measured(job, name, "fp16", f"{len(job.images)} bundled photos")
    return Made(name, file_entry(job.staged, derived.files, "fp16", made_from=fp32_sha, policy=policy,
                                 validation=validation), derived.files, warning)


def _measured(job: Job, name: str, prec: str, note: str, rows: list[int] | None = None
              ) -> tuple[Validation, str | None]:
    """A staged file's fidelity against the reference on the job's photos (`rows`: all of them)."""
    rows = list(range(len(job.images))) if rows is None else rows
    return validate.measure(job.staged / name, prec, job.images, job.ref, rows, note)


def make_int8dyn(job: Job, fp32_path: Path, fp32_sha: str, step: Callable[[str], None]) -> Made:
    import onnx

    name = FILES["int8dyn"]
    step("quantizing to dynamic INT8 (MatMul weights INT8 per channel, activations per batch at run time)")
    derived = derive.to_int8_dynamic(fp32_path, job.staged / name)
    header = onnx.load(str(job.staged / name), load_external_data=False)
    policy = Policy(quantized_ops=derive.DYNAMIC_OPS, weights="int8 symmetric per-channel",
                    activations="uint8 per-tensor, range of each batch at run time",
                    fp32="Convs, attention MatMuls, LayerNorm, Softmax, GELU, residual Adds, classifier",
                    dynamic_matmuls=derive.dynamic_nodes(header))
    validation, warning = _measured(job, name, "int8dyn",
                                    f"{len(job.images)} bundled photos (no calibration images)")
    return Made(name, file_entry(job.staged, derived.files, "int8dyn", made_from=fp32_sha, policy=policy,
                                 validation=validation), derived.files, warning)


def validation_rows(photos: list[Path], calib: calibration.CalibrationSet) -> tuple[list[int], str]:
    """The bundled photos an export validates INT8 on: those that are not calibration images (by
    decoded content; all of them, said so, when every one was)."""
    items = imageset.file_items(photos)
    rows = [i for i, r in enumerate(imageset.roles(items, calib.fingerprints)) if r != "calibration"]
    if rows:
        return rows, f"{len(rows)} bundled photos not used for calibration"
    return list(range(len(photos))), f"{len(photos)} bundled photos, all used for calibration"


def int8_source(model: CvT, variant: Variant, export_opts: ExportOptions, fp32_path: Path,
                pixels: imageset.Pixels | None, opts: derive.Int8Options, where: Path,
                step: Callable[[str], None]) -> tuple[Path, dict[str, Any] | None]:
    """The FP32 file Q/DQ is placed on: the export itself, or (SmoothQuant on) the export of the
    migrated model (same function, flatter activations), written to `where`."""
    if opts.smooth is None:
        return fp32_path, None
    assert pixels is not None  # the caller says which strength (once: the search says it itself)
    smooth_model, summary = smoothed(model, pixels, opts.smooth)
    src = where / ".model.smoothed.onnx"
    if not migrated_file(fp32_path, model, smooth_model, src, pixels.head(2)):
        step("FP32 export of the migrated model")
        export_fp32(smooth_model, variant, src, export_opts)
    return src, summary


def int8_options(policy: Policy) -> derive.Int8Options:
    """The options an INT8 file was made with, as its policy records them (the defaults for what
    a folder of an earlier version does not record; no migration unless recorded)."""
    given = {k: getattr(policy, k) for k in ("method", "percentile", "quantize_outputs", "depthwise",
                                              "attention") if getattr(policy, k) is not None}
    return derive.Int8Options(**given, smooth=policy.smooth)


class Int8Remaker:
    """Re-makes a folder's INT8 file with some nodes left in float (`cvt-export tune`): same
    model, calibration images, cached ranges and migration as the export recorded, so the only
    difference between candidates is where Q/DQ sits. `model`: the folder's PyTorch model, its
    weights already checked against the manifest. Use as a context manager; `scratch` holds the
    smoothed FP32 file meanwhile."""

    def __init__(self, folder: ArtifactFolder, model: CvT, scratch: Path) -> None:
        entry = folder.entry("int8")  # an ArtifactError that says how to make it
        self.folder, self.model, self.scratch = folder, model, scratch
        if entry.policy is None or entry.calibration is None:
            raise artifacts.ArtifactError(f"{folder.path}: its INT8 entry records no calibration or policy; "
                                          f"re-export it: `{folder.export_command(['int8'])}`")
        self.opts = int8_options(entry.policy)
        self.info = entry.calibration
        self.src = folder.onnx("fp32")
        self.pixels: imageset.Pixels | None = None
        self.cache: Path | None = None  # the calibration ranges, once entered

    def __enter__(self) -> Int8Remaker:
        req = request_from_folder(self.folder, ("int8",))
        calib, _ = calibration.calibration_set(req.calib, req.calib_size)
        if calib.sha256 != self.info.sha256:
            raise calibration.CalibrationError(
                f"calibration images in {self.info.source} changed since the INT8 export; re-export")
        variant = self.model.variant
        self.pixels = calib.load(variant)
        self.cache, _ = calibration.usable_cache(str(self.info.cache_key), self.scratch)
        self.src, _ = int8_source(self.model, variant, req.options, self.src, self.pixels, self.opts,
                                  self.scratch, lambda s: None)
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.scratch.glob(".model.smoothed.onnx*"):
            f.unlink()

    def make(self, keep: tuple[str, ...], dst: Path) -> list[str]:
        """Write the Q/DQ file with `keep` nodes unquantized; returns its files."""
        from dataclasses import replace

        assert self.cache is not None, "use Int8Remaker as a context manager"
        return derive.to_int8(self.src, dst, self.pixels, replace(self.opts, keep=keep), self.cache).files


SMOOTH_TIE = 0.05  # relative difference in 1 - cosine below which two strengths are one


def selection_images(calib: calibration.CalibrationSet, variant: Variant) -> tuple[np.ndarray, str]:
    """The bundled evaluation set's selection images against this calibration set."""
    items = imageset.bundled_items()
    roles = imageset.roles(items, calib.fingerprints)
    chosen = [it for it, r in zip(items, roles, strict=True) if r == "selection"]
    sizes = imageset.sizes(roles, items)["selection"]
    note = (f"the bundled evaluation set's selection images ({sizes.inputs} inputs of "
            f"{sizes.sources} photographs)")
    return cvt_ref.preprocess_batch([it.image() for it in chosen], variant).numpy(), note


def choose_smoothing(job: Job, fp32_path: Path, fp32_sha: str, calib: calibration.CalibrationSet,
                     opts: derive.Int8Options, choices: tuple[float | None, ...],
                     step: Callable[[str], None]) -> tuple[derive.Int8Options, SmoothSearch]:
    """Each SmoothQuant strength in `choices` (None: off) makes an INT8 file from the same
    calibration images, measured on the selection images; the least worst-image error wins, and
    strengths within SMOOTH_TIE of it are tied: the weakest migration among them is chosen (a
    transform must earn its place). Returns the options and the record."""
    import shutil
    from dataclasses import replace

    images, note = selection_images(calib, job.variant)
    ref = validate.reference_logits(job.model, images)
    pixels = calib.load(job.variant)
    figures: dict[str, HeldFidelity] = {}
    for strength in choices:
        label = derive.smooth_label(strength)
        step(f"INT8 migration strength {label}: a candidate on the selection images")
        trial = replace(opts, smooth=strength)
        where = job.staged / f".smooth-{label}"
        where.mkdir()
        try:
            cache, _ = calibration.usable_cache(calibration.cache_key(calib, job.variant, fp32_sha, trial),
                                                where)
            src, _ = int8_source(job.model, job.variant, job.opts, fp32_path, pixels, trial, where, step)
            derive.to_int8(src, where / FILES["int8"], pixels, trial, cache)
            logits = run_logits(ort_session(where / FILES["int8"]), images)
            figures[label] = metrics.fidelity(ref, logits)
        finally:
            shutil.rmtree(where, ignore_errors=True)
    error = {c: 1.0 - figures[derive.smooth_label(c)].cosine_min for c in choices}
    least = min(error.values())
    tied = [c for c in choices if error[c] <= least * (1 + SMOOTH_TIE)]
    best = min(tied, key=lambda c: -1.0 if c is None else c)  # the weakest migration among the tied
    how = (f"worst-image cosine on the selection images; strengths within {100 * SMOOTH_TIE:g}% of the "
           "least error (1 - cosine) are tied, and the weakest migration (off first) among them wins")
    return replace(opts, smooth=best), SmoothSearch(chosen=derive.smooth_label(best), on=note, by=how,
                                                    tied=tuple(derive.smooth_label(c) for c in tied),
                                                    candidates=figures)


def make_int8(job: Job, fp32_path: Path, fp32_sha: str, calib: calibration.CalibrationSet,
              opts: derive.Int8Options, info: Calibration, step: Callable[[str], None],
              search: SmoothSearch | None = None) -> Made:
    name = FILES["int8"]
    cache, cache_warning = calibration.usable_cache(str(info.cache_key), job.staged)
    step(f"calibrating INT8 (its ranges kept in {cache} for the next export of this model)"
         if not cache.is_file() else
         f"INT8 from the calibration ranges an earlier export of this model and these images kept in "
         f"{cache} (delete it, or set CVT_EXPORT_CACHE elsewhere, to calibrate again)")
    pixels = calib.load(job.variant) if not cache.is_file() or opts.smooth is not None else None
    if opts.smooth is not None:
        step(f"SmoothQuant migration (strength {opts.smooth})")
    src, smoothing = int8_source(job.model, job.variant, job.opts, fp32_path, pixels, opts, job.staged, step)
    derived = derive.to_int8(src, job.staged / name, pixels, opts, cache, progress=step)
    if src != fp32_path:
        for f in src.parent.glob(src.name + "*"):
            f.unlink()
    import onnx

    header = onnx.load(str(job.staged / name), load_external_data=False)
    policy = Policy(quantized_ops=derive.QUANTIZED_OPS, method=opts.method, percentile=opts.percentile,
                    quantize_outputs=opts.quantize_outputs, depthwise=opts.depthwise,
                    attention=opts.attention,
                    smooth=opts.smooth, keep=opts.keep, smoothing=smoothing,
                    fp32="LayerNorm, Softmax, GELU, residual Adds, classifier",
                    activations="int8 symmetric per-tensor", weights="int8 symmetric per-channel",
                    bias="float32", quantized_inputs_of=derive.quantized_nodes(header), smooth_search=search)
    rows, note = validation_rows(job.photos, calib)
    validation, warning = _measured(job, name, "int8", note, rows)
    warning = "; ".join(w for w in (cache_warning, warning) if w) or None
    entry = file_entry(job.staged, derived.files, "int8", made_from=fp32_sha, calibration=info, policy=policy,
                       validation=validation)
    return Made(name, entry, derived.files, warning, derived.calibrated)


def manifest_for(source: ExportSource, model: CvT, variant: Variant, opts: ExportOptions,
                 files: dict[str, FileEntry], derived: dict[str, IrEntry]) -> Manifest:
    assert model.weights is not None
    int8 = files.get(FILES["int8"])
    return Manifest(
        schema=artifacts.MANIFEST_SCHEMA, created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source=source, variant=variant.name,
        weights=Weights(model.weights.spec, model.weights.kind, model.weights.sha256, model.activation),
        labels=tuple(cvt_ref.class_names(variant.num_classes, model.weights.id2label)),
        export=ExportSettings(exporter="torch.onnx.export(dynamo=True)", opset=opts.opset, batch=opts.batch,
                              image_size=opts.image_size, batchnorm="folded into the depthwise convs"),
        preprocess=Preprocess(image_size=variant.image_size, resize=variant.resize_size, crop=variant.crop,
                              interpolation="bicubic", mean=tuple(variant.mean), std=tuple(variant.std)),
        calibration=int8.calibration if int8 else None,
        files={n: files[n] for n in FILES.values() if n in files},
        irs=derived or None)  # OpenVINO IRs made from files that are still here stay valid


def build(req: BuildRequest, out: Path, step: Callable[[str], None] = lambda s: None) -> BuildResult:
    """Make the requested artifacts in `out`; raises CvtError subclasses for anything users cause
    (an error of the disk is an OSError, which the command line says in one line). An `--out` made
    here and left empty by a failure goes again."""
    opts = req.options
    opts.check()
    cvt_ref.get_variant(req.variant)
    calib, calib_warning = (calibration.calibration_set(req.calib, req.calib_size)
                            if any(precisions.get(p).calibrated for p in req.precisions) else (None, None))
    existed = artifacts.exists(out, "--out")
    artifacts.prepare_folder(out)
    try:
        return _build(req, out, step, calib, calib_warning)
    except BaseException:
        if not existed:  # nothing of ours may be left behind for a failed run
            artifacts.remove_if_empty(out)
        raise


def _build(req: BuildRequest, out: Path, step: Callable[[str], None],
           calib: calibration.CalibrationSet | None, calib_warning: str | None) -> BuildResult:
    opts = req.options
    artifacts.check_writable(out, "--out")
    step(f"loading {req.weights}")
    model = cvt_ref.create_model(req.variant, req.weights, activation=req.activation,
                                 outliers=req.outliers, outlier_seed=req.outlier_seed)
    variant = model.variant.at_size(opts.image_size)
    source = source_of(model, variant, opts)
    _refuse_other_source(ArtifactFolder.existing(out), out, source, req.force)  # before the minute of work
    result = BuildResult(out=out)
    result.warnings += [w for w in (calib_warning, calib.few_warning() if calib else None) if w]

    photos = cvt_ref.bundled_photos()
    images = cvt_ref.preprocess_batch(list(photos), variant).numpy()
    ref = validate.reference_logits(model, images)

    with artifacts.locked(out), artifacts.staging(out) as staged:
        old = ArtifactFolder.existing(out)  # again, under the lock: what another writer left
        _refuse_other_source(old, out, source, req.force)
        made = _Assembly(old, old is not None and old.source == source, result)  # tool versions too
        job = Job(model, variant, opts, photos, images, ref, staged)
        fp32 = FILES[precisions.REFERENCE]
        if not made.kept(precisions.REFERENCE):
            made.add(make_fp32(job, step))
        fp32_path = (staged if fp32 in result.made else out) / fp32
        fp32_sha = made.files[fp32].sha256
        for prec in precisions.EXPORTED:  # in table order; each derived file from the FP32 one
            maker = _MAKERS.get(prec)
            if maker is not None and prec in req.precisions:
                maker(_From(req, job, made, calib, fp32_path, fp32_sha, step))
        made.keep_the_rest(out, fp32_sha)
        made.remove_stale(out)
        made_from = {entry.sha256 for entry in made.files.values()}
        derived = {name: entry for name, entry in (old.irs() if old is not None else {}).items()
                   if made.same_source and entry.made_from in made_from}
        manifest = manifest_for(source, model, variant, opts, made.files, derived)
        artifacts.commit(out, staged, made.moved, manifest)
        result.manifest = manifest
    return result


@dataclass
class _Assembly:
    """What the new manifest lists, decided one precision at a time: files kept from the folder's
    previous export (when their rule holds and they verify) and files made in staging."""

    old: ArtifactFolder | None
    same_source: bool
    result: BuildResult
    files: dict[str, FileEntry] = field(default_factory=dict)
    moved: list[str] = field(default_factory=list)

    def kept(self, prec: str, **rule: Any) -> bool:
        old = self.old
        entry = old.entry(prec) if old is not None and old.has(prec) else None
        if entry is not None and reusable(entry, same_source=self.same_source, **rule) and old is not None \
                and old.verify(prec):
            self.files[FILES[prec]] = entry
            self.result.reused.append(FILES[prec])
            return True
        return False

    def add(self, made: Made) -> None:
        self.files[made.name] = made.entry
        self.moved.extend(made.files)
        self.result.made.append(made.name)
        if made.warning:
            self.result.warnings.append(made.warning)

    def keep_the_rest(self, out: Path, fp32_sha: str) -> None:
        """Other precisions made earlier from this model stay; tune's mix only while the INT8
        file it was made from does."""
        for prec in set(precisions.EXPORTED) - {p for p in precisions.FILES if FILES[p] in self.files}:
            self.kept(prec, fp32_sha=fp32_sha)
        if FILES["int8"] in self.files:
            mixed_kept = self.kept("mixed", fp32_sha=fp32_sha, int8_sha=self.files[FILES["int8"]].sha256)
            if not mixed_kept and self.old is not None and self.old.has("mixed"):
                self.result.warnings.append(f"{FILES['mixed']} removed: it was made from another INT8 file; "
                                            f"re-run `cvt-export tune --artifacts {out}`")

    def remove_stale(self, out: Path) -> None:
        """Files of another source, or that no longer verify, must not outlive the manifest: it
        goes first, so a folder killed half-way never verifies with them missing."""
        old = self.old
        stale = [] if old is None else [f for p in precisions.FILES
                                        if old.has(p) and FILES[p] not in self.files
                                        for f in old.file_names(p)]
        if stale:
            assert old is not None
            artifacts.withdraw(out)
            for f in stale:
                old.file(f).unlink(missing_ok=True)


@dataclass(frozen=True)
class _From:
    """What a derived file is made from: the request, the job, the FP32 file and the calibration."""

    req: BuildRequest
    job: Job
    made: _Assembly
    calib: calibration.CalibrationSet | None
    fp32_path: Path
    fp32_sha: str
    step: Callable[[str], None]


FromFp32 = Callable[[Job, Path, str, Callable[[str], None]], Made]


def _from_fp32(prec: str, make: FromFp32) -> Callable[[_From], None]:
    """The maker of a file derived from the FP32 one alone (FP16, dynamic INT8): kept when made
    from the same FP32 file, else made."""
    def maker(f: _From) -> None:
        if not f.made.kept(prec, fp32_sha=f.fp32_sha):
            f.made.add(make(f.job, f.fp32_path, f.fp32_sha, f.step))

    return maker


def _int8(f: _From) -> None:
    """The INT8 file: kept when calibrated the same way from the same FP32 file, else made (with
    the SmoothQuant strength searched first when asked)."""
    req, job, made, calib, fp32_path, fp32_sha, step = (f.req, f.job, f.made, f.calib, f.fp32_path,
                                                         f.fp32_sha, f.step)
    assert calib is not None
    asked = calibration.request_key(calib, job.variant, fp32_sha, req.int8, req.smooth_search)
    if made.kept("int8", fp32_sha=fp32_sha, calib_key=asked):
        return
    int8_opts, search = req.int8, None
    if req.smooth_search:
        int8_opts, search = choose_smoothing(job, fp32_path, fp32_sha, calib, req.int8, req.smooth_search,
                                             step)
    info = Calibration(source=calib.source, images=len(calib.items), asked=calib.asked, sha256=calib.sha256,
                       method=req.int8.method,
                       cache_key=calibration.cache_key(calib, job.variant, fp32_sha, int8_opts),
                       request_key=asked, files=tuple(calib.names), digests=tuple(calib.digests),
                       fingerprints=tuple(calib.fingerprints), distinct=calib.distinct,
                       minimum=imageset.MIN_CALIBRATION, warning=calib.few_warning())
    int8 = make_int8(job, fp32_path, fp32_sha, calib, int8_opts, info, step, search)
    made.result.calibrated = int8.calibrated
    made.add(int8)


# Each exported precision's maker beyond the FP32 file (precisions.EXPORTED, in table order).
_MAKERS: dict[str, Callable[[_From], None]] = {
    "fp16": _from_fp32("fp16", make_fp16), "int8": _int8, "int8dyn": _from_fp32("int8dyn", make_int8dyn)}


def _refuse_other_source(old: ArtifactFolder | None, out: Path, source: ExportSource, force: bool) -> None:
    if old is None or force:
        return
    changes = old.source.changes(source)
    if changes:
        raise artifacts.ArtifactError(
            f"{out} holds an export of another source ({'; '.join(changes)}); pass --force to "
            "replace it (its files are deleted) or choose another --out")
