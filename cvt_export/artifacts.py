"""The artifact folder: files staged privately, validated, then renamed into place; manifest last.

A folder is valid exactly when `manifest.json` exists and every file it lists has the sha256 it
records. The manifest is removed first and written last, so an export that dies half-way leaves
a folder that no reader mistakes for a finished one. One writer at a time: a lock file held with
`flock` (released by the OS even if the writer is killed); a second writer is refused at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import cvt_ref
from cvt_export import precisions
from cvt_export.records import (
    Calibration,
    ExportSource,
    FileEntry,
    GraphSummary,
    IrEntry,
    Manifest,
    ModelSummary,
    NewerRecord,
    RecordError,
    Weights,
)
from cvt_ref.errors import CvtError
from cvt_ref.source import sha256_file
from cvt_ref.variants import Variant

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = Manifest.VERSION
LOCK = ".lock"


class ArtifactError(CvtError):
    """An artifact folder that cannot be written, is busy, or does not hold what it claims."""


def exists(path: Path, option: str) -> bool:
    """`path.exists()` that says a name the file system cannot hold (too long, a file for a
    folder on the way) in one line instead of raising from `stat`."""
    try:
        path.stat()
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            return False  # prepare_folder says it when it tries to make it
        raise ArtifactError(f"{option} {path}: {e.strerror}") from None
    return True


def prepare_folder(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out}: is a file, not a folder; choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    return out


def check_writable(folder: Path, what: str, hint: str = "choose another folder") -> None:
    """Refuse, before any work, a folder this process cannot create files in (permissions, a
    read-only file system). Tried for real: root ignores permission bits, a read-only mount not."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    except OSError as e:
        raise ArtifactError(f"{what} {folder}: cannot write there ({e.strerror}); {hint}") from None
    os.close(fd)
    os.unlink(name)


def remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


# Lock descriptors this process holds. A child forked without exec (OpenVINO's telemetry sends
# from a multiprocessing.Process, which outlives the conversion by seconds) would otherwise share
# the lock's open file description and keep the folder locked after this process let it go.
# The lock is released with LOCK_UN on the description (not by closing alone), and a forked
# child closes its copies as soon as it runs.
_HELD: set[int] = set()


def _drop_inherited_locks() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _blame(e: BaseException, out: Path) -> None:
    """An error of the disk with no file name in it (a library's own write) raised while `out`'s
    lock was held: that folder is what it is about."""
    if isinstance(e, OSError) and e.filename is None and not hasattr(e, "folder"):
        e.folder = out  # type: ignore[attr-defined]


def failed_folder(e: OSError) -> Path | None:
    """The folder `locked` marked on an error raised under it (see `_blame`), if any."""
    folder = getattr(e, "folder", None)
    return folder if isinstance(folder, Path) else None


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the folder's writer lock, or refuse at once if another export holds it. A lock file
    made here goes again when the work under it fails (a full disk, a kill signal handled): a
    failed command leaves no `.lock` in a folder the user made."""
    made = not (out / LOCK).exists()
    try:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only folder: flock works on a read-only descriptor too
        try:
            fd = os.open(out / LOCK, os.O_RDONLY)
        except OSError:  # no lock file and none can be made: nothing can write here either
            try:
                yield
            except BaseException as e:
                _blame(e, out)
                raise
            return
    _HELD.add(fd)
    failed = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            made = False  # another writer's
            raise ArtifactError(f"{out}: another cvt-export command (export, tune, bench, openvino, "
                                "triton, deploy...) is writing this folder; wait for it to finish, or "
                                "use another folder") from None
        yield
    except BaseException as e:
        failed = True
        _blame(e, out)
        raise
    finally:
        if failed and made:  # still held: no other writer can be between the open and this
            with contextlib.suppress(OSError):
                os.unlink(out / LOCK)
        _HELD.discard(fd)
        with contextlib.suppress(OSError):  # unlock the description itself: a child that has not
            fcntl.flock(fd, fcntl.LOCK_UN)   # run its fork hook yet may still share it
        os.close(fd)


@contextlib.contextmanager
def writer(out: Path, option: str) -> Iterator[None]:
    """A folder this command writes (a Triton repository): made if missing, checked writable, its
    writer lock held (another writer is refused at once). When the work fails in a folder made
    here, the folder goes again, so no empty `--out` is left behind."""
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        check_writable(out, option)
        with locked(out):
            yield
    except BaseException:
        if made:
            (out / LOCK).unlink(missing_ok=True)
            remove_if_empty(out)
        raise


SCRATCH_MARK = ".cvt-export-scratch"  # inside every staging folder: what makes it the toolchain's
_MARK_TEXT = "cvt-export staging folder: removed by the next writer of this folder if left behind\n"


def is_marked_scratch(folder: Path) -> bool:
    """A staging folder this toolchain made: a real folder (not a link) holding its mark."""
    mark = folder / SCRATCH_MARK
    try:
        return (folder.is_dir() and not folder.is_symlink() and mark.is_file() and not mark.is_symlink()
                and mark.read_text() == _MARK_TEXT)
    except (OSError, UnicodeDecodeError):
        return False


def mark_scratch(folder: Path) -> None:
    """Make `folder` a staging folder of this toolchain (what lets a later writer remove it)."""
    (folder / SCRATCH_MARK).write_text(_MARK_TEXT)


def remove_stale_scratch(out: Path, prefix: str, also: Callable[[Path], bool] = lambda p: False) -> None:
    """Under `out`'s lock: folders named `prefix`* that carry the mark (or that `also` recognises)
    are a killed writer's and go; an unmarked one goes only if empty (a writer killed before its
    mark), by rmdir, which cannot remove anything else. Nothing goes for its name alone."""
    for stale in out.glob(f"{prefix}*"):
        if is_marked_scratch(stale) or also(stale):
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.is_dir() and not stale.is_symlink():
            remove_if_empty(stale)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A private folder beside the artifacts (same file system, so renames are atomic).

    Call under the lock: another staging folder that carries the mark then belongs to a writer
    that was killed, and goes. Nothing is removed for its name alone: a folder of the user's
    called `.staging-mine` stays (an empty one, which a writer killed before its mark may leave,
    is removed by rmdir, which cannot remove anything else).
    """
    remove_stale_scratch(out, ".staging-")
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        mark_scratch(tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(out: Path, name: str = MANIFEST) -> Manifest | None:
    """A manifest file if it is present and readable JSON with an integer schema; else None. One
    of a newer schema, or malformed, is an ArtifactError that says so."""
    try:
        data = json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("schema"), int):
        return None
    try:
        return Manifest.from_json(data, str(out / name))
    except NewerRecord as e:
        raise ArtifactError(str(e)) from None
    except RecordError as e:
        raise ArtifactError(f"{e}: a damaged manifest; export into another folder, or delete "
                            f"{out / name} to export into this one again") from None


def withdraw(out: Path) -> None:
    """Remove the folder's manifest (under the lock) before its files change: killed half-way, the
    folder is then an unfinished export, never one that verifies with files missing."""
    (out / MANIFEST).unlink(missing_ok=True)


def commit(out: Path, staged: Path, files: list[str], manifest: Manifest) -> None:
    """Move staged files into place and write the manifest last (under the lock)."""
    withdraw(out)
    mode = _file_mode()
    for name in files:
        os.chmod(staged / name, mode)  # onnx writes external data 0600; artifacts are shared
        os.replace(staged / name, out / name)
    _write_manifest(out, manifest)


ONNX_FILES: Mapping[str, str] = precisions.FILES


def inside(root: Path, name: object, what: str) -> Path:
    """`root / name` for a plain relative name that stays inside `root` (symlinks resolved):
    anything absolute, with `..`, or leading out is refused, whoever wrote the record."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ArtifactError(f"{what}: {name!r} is not a plain relative file name; refusing it")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or name.startswith("~"):
        raise ArtifactError(f"{what}: {name!r} points outside the folder; refusing it")
    path = root / rel
    try:
        real, top = path.resolve(), root.resolve()
    except (OSError, RuntimeError):
        raise ArtifactError(f"{what}: {name!r} cannot be resolved (a symlink loop?); refusing it") from None
    if real != top and top not in real.parents:
        raise ArtifactError(f"{what}: {name!r} leads outside the folder (a symlink?); refusing it")
    return path


@dataclass(frozen=True)
class CalibrationImages:
    source: str | None            # "bundled photos" or the --calib folder
    files: tuple[str, ...]        # their file names
    digests: tuple[str, ...]      # sha256 of their files (folders exported before fingerprints)
    fingerprints: tuple[str, ...] = ()  # decoded-content fingerprints (cvt_export.imageset)
    distinct: int | None = None   # distinct images among them


SCRATCH_MANIFEST = ".scratch-manifest.json"  # never `manifest.json`: a scratch folder never opens


def scratch_origin(folder: Path) -> str | None:
    """The artifact folder a scratch folder (tune's) works for, as its manifest names it; None
    when it has no readable scratch manifest. Read as a bare JSON object: a scratch manifest of an
    earlier release may hold nothing else."""
    try:
        data = json.loads((folder / SCRATCH_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    origin = data.get("scratch_of") if isinstance(data, dict) else None
    return origin if isinstance(origin, str) else None


class ArtifactFolder:
    """One export's folder, opened and verified once; every other module takes this object.

    It owns the file names, the manifest (a `records.Manifest`: it hands out records, never the
    file's dictionaries), the entry per precision, the derived files (OpenVINO IRs) and what each
    was made from, the lock (re-entrant within this object, refused at once across processes) and
    every update. Every path it hands out is inside the folder.
    """

    def __init__(self, path: Path, manifest: Manifest, *, manifest_name: str = MANIFEST) -> None:
        self.path = path
        self._m = manifest
        self._manifest_name = manifest_name
        self._lock_depth = 0
        self._check(manifest)

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> ArtifactFolder:
        """A finished export, or an ArtifactError that says what to run."""
        out = Path(path)
        if not out.is_dir():
            raise ArtifactError(f"{out}: no such artifact folder; create it with "
                                f"`cvt-export onnx --out {out}`")
        manifest = _read(out)
        if manifest is None:
            hint = (" (it is tune's scratch, not an artifact folder)" if (out / SCRATCH_MANIFEST).exists()
                    else "")
            raise ArtifactError(f"{out}: no valid {MANIFEST}{hint}; the export did not finish or the folder "
                                f"is not an artifact folder. Re-run `cvt-export onnx --out {out}`")
        return cls(out, manifest)

    @classmethod
    def existing(cls, path: Path) -> ArtifactFolder | None:
        """The folder's export if it has a readable manifest (for a writer deciding what to
        keep); None for a new or unfinished folder; ArtifactError for a manifest that names
        paths outside the folder or is of a newer cvt-export."""
        manifest = _read(path) if path.is_dir() else None
        return None if manifest is None else cls(path, manifest)

    @classmethod
    def is_export(cls, path: Path) -> bool:
        return path.is_dir() and (path / MANIFEST).is_file()

    @classmethod
    def scratch(cls, parent: ArtifactFolder, prefix: str, kept: tuple[str, ...] = ("fp32",)
                ) -> ArtifactFolder:
        """A private working folder inside `parent` (hard links of the `kept` precisions' files)
        whose manifest has another name, so nothing ever opens it as an artifact folder. It carries
        the toolchain's scratch mark; the caller removes it, and under the parent's lock another
        marked one is a killed writer's."""
        where = Path(tempfile.mkdtemp(prefix=prefix, dir=parent.path))
        mark_scratch(where)
        files = {ONNX_FILES[p]: parent.entry(p) for p in kept}
        manifest = replace(parent._m, files=files, irs=None, scratch_of=str(parent.path))
        _write_manifest(where, manifest, SCRATCH_MANIFEST)  # first: marks it ours
        for prec in kept:
            for name in parent.file_names(prec):
                os.link(parent.file(name), where / name)
        return cls(where, manifest, manifest_name=SCRATCH_MANIFEST)

    def reload(self) -> None:
        manifest = _read(self.path, self._manifest_name)
        if manifest is None:
            raise ArtifactError(f"{self.path}: its {MANIFEST} disappeared or was damaged while in use")
        self._check(manifest)
        self._m = manifest

    def _check(self, manifest: Manifest) -> None:
        """Every name the manifest holds stays inside the folder."""
        where = f"{self.path / self._manifest_name}"
        for name, entry in manifest.files.items():
            inside(self.path, name, where)
            for extra in entry.data_files:
                inside(self.path, extra, where)
        for ir in (manifest.irs or {}).values():
            for f in ir.sha256:
                inside(self.path, f"{IR_KEY}/{f}", where)
            inside(self.path, ir.onnx, where)

    # --- what it holds ---------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"ArtifactFolder({str(self.path)!r})"

    @property
    def manifest(self) -> Manifest:
        """The whole manifest: for records that embed it and for listings."""
        return self._m

    @property
    def variant_name(self) -> str:
        return self._m.variant

    @property
    def variant(self) -> Variant:
        """Its registry entry at the exported image size, with the checkpoint's own number of
        classes. Every reader of a folder asks here."""
        source = self._m.source
        try:
            variant = cvt_ref.get_variant(self.variant_name).at_size(source.image_size)
        except CvtError as e:
            raise ArtifactError(f"{self.path / MANIFEST}: {e}") from None
        classes = source.num_classes or len(self._m.labels or ()) or None
        return variant.with_classes(int(classes)) if classes else variant

    @property
    def labels(self) -> list[str]:
        """The model's own class names (a fine-tuned head's, or ImageNet-1k's)."""
        labels = self._m.labels
        return list(labels) if labels else cvt_ref.class_names(self.variant.num_classes)

    @property
    def source(self) -> ExportSource:
        """What was exported (variant, size, classes, weights, activation, stress, opset, batch)."""
        return self._m.source

    @property
    def weights(self) -> Weights:
        return self._m.weights

    @property
    def weights_spec(self) -> str:
        return self._m.weights.spec

    @property
    def image_size(self) -> int:
        return int(self.variant.image_size)

    @property
    def calibration(self) -> Calibration | None:
        """The INT8 calibration record (source, files, content digests, cache key), if any."""
        return self._m.calibration

    @property
    def calibration_images(self) -> CalibrationImages:
        """Which images INT8 calibrated on (empty when there is no INT8 file)."""
        calib = self._m.calibration or Calibration()
        return CalibrationImages(calib.source, calib.files, calib.digests, calib.fingerprints, calib.distinct)

    def has(self, precision: str) -> bool:
        name = ONNX_FILES.get(precisions.reads(precision))
        return name is not None and name in self._m.files

    def entry(self, precision: str) -> FileEntry:
        """The manifest entry of a precision's ONNX file."""
        if not self.has(precision):
            raise self._missing(precision)
        return self._m.files[ONNX_FILES[precisions.reads(precision)]]

    def sha256(self, precision: str) -> str:
        return self.entry(precision).sha256

    def file_names(self, precision: str) -> list[str]:
        """The ONNX file of a precision and its external-data files."""
        return [ONNX_FILES[precisions.reads(precision)], *self.entry(precision).data_files]

    def recorded_sha256(self, name: str) -> str | None:
        """The sha256 the manifest records for one of its ONNX files (None: not listed)."""
        entry = self._m.files.get(name)
        return entry.sha256 if entry else None

    def file(self, name: str) -> Path:
        """A path in the folder for a plain relative name (refused when it would lead out)."""
        return inside(self.path, name, str(self.path))

    @property
    def probes(self) -> dict[str, str]:
        entry = self._m.files.get(ONNX_FILES["fp32"])
        return dict(entry.probes or {}) if entry else {}

    def graph(self, precision: str) -> GraphSummary:
        graph = self.entry(precision).graph
        if graph is None:
            raise ArtifactError(f"{self.path / MANIFEST}: no graph recorded for {precision}; re-export it")
        return graph

    def verify(self, precision: str) -> bool:
        """Whether the precision's files are present with the recorded sha256."""
        if not self.has(precision):
            return False
        entry = self.entry(precision)
        digests = [(ONNX_FILES[precisions.reads(precision)], entry.sha256), *entry.data_files.items()]
        for fname, digest in digests:
            path = self.file(fname)
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    def stale_mix(self) -> str | None:
        """Why the mixed file cannot be used (None: it can): it is keyed by the FP32 file, the
        INT8 file (calibration, migration, placement) it was re-made from."""
        if not self.has("mixed"):
            return None
        made = self.entry("mixed")
        if made.made_from != self.recorded_sha256(ONNX_FILES["fp32"]):
            return "made from another FP32 export"
        if made.int8_from != self.recorded_sha256(ONNX_FILES["int8"]):
            return "made from another INT8 file (re-calibrated or re-migrated since tune)"
        return None

    def onnx(self, precision: str, *, check_hash: bool = True) -> Path:
        """The verified ONNX file a precision runs (bf16 -> the FP32 file)."""
        reads = precisions.reads(precision)
        if not self.has(reads):
            raise self._missing(reads)
        name = ONNX_FILES[reads]
        if precisions.get(reads).tuned:
            why = self.stale_mix()
            if why:
                raise ArtifactError(f"{self.path / name}: {why}; re-run `cvt-export tune --artifacts "
                                    f"{self.path}`")
        if check_hash and not self.verify(reads):
            raise ArtifactError(f"{self.path / name}: missing or changed since export (sha256 differs from "
                                f"{MANIFEST}); re-export it from the same source: "
                                f"`{self.export_command([reads])}`")
        return self.file(name)

    def _missing(self, precision: str) -> ArtifactError:
        name = ONNX_FILES.get(precisions.reads(precision), precision)
        how = (f"cvt-export tune --artifacts {self.path}" if precisions.get(precision).tuned
               else self.export_command([precision]))
        return ArtifactError(f"{self.path}: has no {name}; make it with `{how}`")

    def export_command(self, wanted: list[str]) -> str:
        """The `cvt-export onnx` command that re-makes this folder's files from the same source."""
        source = self._m.source
        parts = ["cvt-export onnx", f"--variant {self.variant_name}", f"--weights {source.weights}"]
        try:
            base = cvt_ref.get_variant(self.variant_name)
        except CvtError:
            base = None
        if base is not None and source.image_size not in (None, base.image_size):
            parts.append(f"--image-size {source.image_size}")
        if source.opset is not None:
            parts.append(f"--opset {source.opset}")
        if source.batch != "dynamic":
            parts.append(f"--batch {source.batch}")
        have = {m.precision for m in self._m.files.values()}
        chosen = sorted((set(wanted) | have) & set(precisions.EXPORTED), key=precisions.EXPORTED.index)
        if source.outliers:
            parts.append(f"--outliers {source.outliers.channels} --outlier-seed {source.outliers.seed}")
        calib = self._m.calibration or Calibration()
        if any(precisions.get(p).calibrated for p in chosen) and calib.source not in (None, "bundled photos"):
            parts.append(f"--calib {calib.source}")
        parts += [f"--precision {','.join(chosen)}", f"--out {self.path}"]
        return " ".join(parts)

    def summary(self) -> ModelSummary:
        """What a report or repository record says of the folder it was made from."""
        return ModelSummary(self.variant_name, self.weights, str(self.path), self.sha256("fp32"))

    def files(self) -> dict[str, FileEntry]:
        """File name -> manifest entry, for listings."""
        return dict(self._m.files)

    def copy_to(self, dst: Path, kept: tuple[str, ...]) -> ArtifactFolder:
        """A new artifact folder at `dst` with the `kept` precisions' ONNX files (verified) and a
        manifest trimmed to them: what a served model carries (an empty `kept`: the manifest alone)."""
        dst.mkdir(parents=True)
        files = {}
        for prec in kept:
            self.onnx(prec)
            for name in self.file_names(prec):
                shutil.copy2(self.file(name), dst / name)
            files[ONNX_FILES[precisions.reads(prec)]] = self.entry(prec)
        manifest = replace(self._m, files=files, irs=None)
        _write_manifest(dst, manifest)
        return ArtifactFolder(dst, manifest)

    # --- derived files (OpenVINO IRs) --------------------------------------------------------

    def ir(self, name: str) -> IrEntry | None:
        return (self._m.irs or {}).get(name)

    def irs(self) -> dict[str, IrEntry]:
        return dict(self._m.irs or {})

    def record_ir(self, name: str, entry: IrEntry) -> None:
        inside(self.path, entry.onnx, "IR record")
        self.update(lambda m: replace(m, irs={**(m.irs or {}), name: entry}))

    def forget_irs(self) -> None:
        """Drop every IR record (their files are left to be overwritten): a scratch folder's
        candidate replaced the file they were made from."""
        self.update(lambda m: replace(m, irs=None))

    def drop(self, precision: str) -> None:
        """Remove a precision's entry (its files stay until replaced)."""
        name = ONNX_FILES[precision]
        self.update(lambda m: replace(m, files={k: v for k, v in m.files.items() if k != name}))

    def record_file(self, precision: str, entry: FileEntry) -> None:
        """Add or replace one precision's entry (its files already in place)."""
        self.update(lambda m: replace(m, files={**m.files, ONNX_FILES[precision]: entry}))

    # --- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[ArtifactFolder]:
        """The folder's writer lock: re-entrant for this object, refused at once while another
        process (or another object) holds it. The manifest is re-read once it is held."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
            return
        with locked(self.path):
            self._lock_depth = 1
            try:
                self.reload()
                yield self
            finally:
                self._lock_depth = 0

    @property
    def locked_here(self) -> bool:
        return self._lock_depth > 0

    def update(self, change: Callable[[Manifest], Manifest]) -> None:
        """Replace the manifest by `change(manifest)` and rewrite it atomically, under the lock."""
        with self.lock():
            manifest = change(self._m)
            self._check(manifest)
            _write_manifest(self.path, manifest, self._manifest_name)
            self._m = manifest


IR_KEY = "openvino"


def as_folder(folder: ArtifactFolder | str | Path) -> ArtifactFolder:
    """The object itself (keeping its lock and view), or the folder at a path, opened and checked."""
    return folder if isinstance(folder, ArtifactFolder) else ArtifactFolder.open(folder)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write beside the target under a private name, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    except OSError as e:  # a full disk: no half file left, and the error names the file
        with contextlib.suppress(OSError):
            tmp.unlink()
        if e.filename is None or e.filename == str(tmp):
            e.filename = str(path)
        raise


def _write_manifest(out: Path, manifest: Manifest, name: str = MANIFEST) -> None:
    atomic_write(out / name, json.dumps(manifest.to_json(), indent=2) + "\n")
