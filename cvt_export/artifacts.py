"""The artifact folder: files staged privately, validated, then renamed into place; manifest last.

A folder is valid exactly when `manifest.json` exists and every file it lists has the sha256 it
records. The manifest is removed first and written last, so an export that dies half-way leaves
a folder that no reader mistakes for a finished one. One writer at a time: a lock file held with
`flock` (released by the OS even if the writer is killed); a second writer is refused at once.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cvt_ref
from cvt_export import precisions
from cvt_ref.errors import CvtError
from cvt_ref.source import sha256_file
from cvt_ref.variants import Variant

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
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


def _read(out: Path, name: str = "manifest.json") -> dict[str, Any] | None:
    """A manifest file if it is present, readable JSON of this schema; else None."""
    try:
        data = json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        return None
    return data


def commit(out: Path, staged: Path, files: list[str], manifest: dict[str, Any]) -> None:
    """Move staged files into place and write the manifest last (under the lock)."""
    (out / MANIFEST).unlink(missing_ok=True)
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


def _mapping(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArtifactError(f"{what}: malformed (expected an object); re-export the folder")
    return value


@dataclass(frozen=True)
class CalibrationImages:
    source: str | None            # "bundled photos" or the --calib folder
    files: tuple[str, ...]        # their file names
    digests: tuple[str, ...]      # sha256 of their files (folders exported before fingerprints)
    fingerprints: tuple[str, ...] = ()  # decoded-content fingerprints (cvt_export.imageset)
    distinct: int | None = None   # distinct images among them


SCRATCH_MANIFEST = ".scratch-manifest.json"  # never `manifest.json`: a scratch folder never opens


class ArtifactFolder:
    """One export's folder, opened and verified once; every other module takes this object.

    It owns the file names, the manifest's schema, the entry per precision, the derived files
    (OpenVINO IRs) and what each was made from, the lock (re-entrant within this object, refused at
    once across processes) and every update. Every path it hands out is inside the folder.
    """

    def __init__(self, path: Path, data: dict[str, Any], *, manifest_name: str = MANIFEST) -> None:
        self.path = path
        self._data = data
        self._manifest_name = manifest_name
        self._lock_depth = 0
        self._check(data)

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> ArtifactFolder:
        """A finished export, or an ArtifactError that says what to run."""
        out = Path(path)
        if not out.is_dir():
            raise ArtifactError(f"{out}: no such artifact folder; create it with "
                                f"`cvt-export onnx --out {out}`")
        data = _read(out)
        if data is None:
            hint = (" (it is tune's scratch, not an artifact folder)" if (out / SCRATCH_MANIFEST).exists()
                    else "")
            raise ArtifactError(f"{out}: no valid {MANIFEST}{hint}; the export did not finish or the folder "
                                f"is not an artifact folder. Re-run `cvt-export onnx --out {out}`")
        return cls(out, data)

    @classmethod
    def existing(cls, path: Path) -> ArtifactFolder | None:
        """The folder's export if it has a readable manifest (for a writer deciding what to
        keep); None for a new or unfinished folder; ArtifactError for a manifest that names
        paths outside the folder."""
        data = _read(path) if path.is_dir() else None
        return None if data is None else cls(path, data)

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
        data = {**{k: v for k, v in parent._data.items() if k not in ("files", IR_KEY)}, "files": files,
                "scratch_of": str(parent.path)}
        atomic_write(where / SCRATCH_MANIFEST, json.dumps(data, indent=1) + "\n")  # first: marks it ours
        for prec in kept:
            for name in parent.file_names(prec):
                os.link(parent.file(name), where / name)
        return cls(where, data, manifest_name=SCRATCH_MANIFEST)

    def reload(self) -> None:
        data = _read(self.path, self._manifest_name)
        if data is None:
            raise ArtifactError(f"{self.path}: its {MANIFEST} disappeared or was damaged while in use")
        self._check(data)
        self._data = data

    def _check(self, data: dict[str, Any]) -> None:
        """Every name the manifest holds stays inside the folder; entries are objects."""
        where = f"{self.path / self._manifest_name}"
        for name, entry in _mapping(data.get("files", {}), f"{where} files").items():
            _mapping(entry, f"{where} files[{name!r}]")
            inside(self.path, name, where)
            for extra in _mapping(entry.get("data_files", {}), f"{where} data_files"):
                inside(self.path, extra, where)
        for name, entry in _mapping(data.get(IR_KEY) or {}, f"{where} {IR_KEY}").items():
            _mapping(entry, f"{where} {IR_KEY}[{name!r}]")
            for f in _mapping(entry.get("sha256", {}), f"{where} {IR_KEY} sha256"):
                inside(self.path, f"{IR_KEY}/{f}", where)
            inside(self.path, entry.get("onnx", ""), where)
        for key in ("variant", "source", "weights"):
            if key not in data:
                raise ArtifactError(f"{where}: has no {key!r}; re-export the folder")
        _mapping(data["source"], f"{where} source")
        _mapping(data["weights"], f"{where} weights")

    # --- what it holds ---------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"ArtifactFolder({str(self.path)!r})"

    @property
    def variant_name(self) -> str:
        return str(self._data["variant"])

    @property
    def variant(self) -> Variant:
        """Its registry entry at the exported image size, with the checkpoint's own number of
        classes. Every reader of a folder asks here."""
        source = self._data["source"]
        try:
            variant = cvt_ref.get_variant(self.variant_name).at_size(source.get("image_size"))
        except CvtError as e:
            raise ArtifactError(f"{self.path / MANIFEST}: {e}") from None
        classes = source.get("num_classes") or len(self._data.get("labels") or []) or None
        return variant.with_classes(int(classes)) if classes else variant

    @property
    def labels(self) -> list[str]:
        """The model's own class names (a fine-tuned head's, or ImageNet-1k's)."""
        labels = self._data.get("labels")
        return list(labels) if labels else cvt_ref.class_names(self.variant.num_classes)

    @property
    def source(self) -> dict[str, Any]:
        """What was exported (variant, size, classes, weights, activation, stress, opset, batch)."""
        return copy.deepcopy(self._data["source"])

    @property
    def weights(self) -> dict[str, Any]:
        return dict(self._data["weights"])

    @property
    def weights_spec(self) -> str:
        return str(self._data["weights"]["spec"])

    @property
    def image_size(self) -> int:
        return int(self.variant.image_size)

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The INT8 calibration record (source, files, content digests, cache key), if any."""
        calib = self._data.get("calibration")
        return copy.deepcopy(calib) if calib else None

    @property
    def calibration_images(self) -> CalibrationImages:
        """Which images INT8 calibrated on (empty when there is no INT8 file)."""
        calib = self._data.get("calibration") or {}
        return CalibrationImages(calib.get("source"), tuple(calib.get("files") or ()),
                                 tuple(calib.get("digests") or ()), tuple(calib.get("fingerprints") or ()),
                                 calib.get("distinct"))

    def has(self, precision: str) -> bool:
        name = ONNX_FILES.get(precisions.reads(precision))
        return name is not None and name in self._data.get("files", {})

    def entry(self, precision: str) -> dict[str, Any]:
        """The manifest entry of a precision's ONNX file (a copy)."""
        if not self.has(precision):
            raise self._missing(precision)
        return copy.deepcopy(self._data["files"][ONNX_FILES[precisions.reads(precision)]])

    def sha256(self, precision: str) -> str:
        return str(self.entry(precision)["sha256"])

    def file_names(self, precision: str) -> list[str]:
        """The ONNX file of a precision and its external-data files."""
        entry = self.entry(precision)
        return [ONNX_FILES[precisions.reads(precision)], *entry.get("data_files", {})]

    def recorded_sha256(self, name: str) -> str | None:
        """The sha256 the manifest records for one of its ONNX files (None: not listed)."""
        entry = self._data.get("files", {}).get(name)
        return entry.get("sha256") if entry else None

    def file(self, name: str) -> Path:
        """A path in the folder for a plain relative name (refused when it would lead out)."""
        return inside(self.path, name, str(self.path))

    @property
    def probes(self) -> dict[str, str]:
        return dict(self._data.get("files", {}).get(ONNX_FILES["fp32"], {}).get("probes") or {})

    def graph(self, precision: str) -> dict[str, Any]:
        return dict(self.entry(precision)["graph"])

    def verify(self, precision: str) -> bool:
        """Whether the precision's files are present with the recorded sha256."""
        if not self.has(precision):
            return False
        entry = self.entry(precision)
        digests = [(ONNX_FILES[precisions.reads(precision)], entry.get("sha256")),
                   *entry.get("data_files", {}).items()]
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
        made = self._data["files"][ONNX_FILES["mixed"]]
        fp32 = self._data["files"].get(ONNX_FILES["fp32"], {}).get("sha256")
        int8 = self._data["files"].get(ONNX_FILES["int8"], {}).get("sha256")
        if made.get("from") != fp32:
            return "made from another FP32 export"
        if made.get("int8_from") != int8:
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
        source = self._data["source"]
        parts = ["cvt-export onnx", f"--variant {self.variant_name}", f"--weights {source.get('weights')}"]
        try:
            base = cvt_ref.get_variant(self.variant_name)
        except CvtError:
            base = None
        if base is not None and source.get("image_size") not in (None, base.image_size):
            parts.append(f"--image-size {source['image_size']}")
        if source.get("opset") is not None:
            parts.append(f"--opset {source['opset']}")
        if source.get("batch") not in (None, "dynamic"):
            parts.append(f"--batch {source['batch']}")
        have = {m.get("precision", "") for m in self._data.get("files", {}).values() if isinstance(m, dict)}
        chosen = sorted((set(wanted) | have) & set(precisions.EXPORTED), key=precisions.EXPORTED.index)
        stress = source.get("outliers") or {}
        if stress:
            parts.append(f"--outliers {stress['channels']} --outlier-seed {stress['seed']}")
        calib = self._data.get("calibration") or {}
        if any(precisions.get(p).calibrated for p in chosen) and calib.get("source") not in (
                None, "bundled photos"):
            parts.append(f"--calib {calib['source']}")
        parts += [f"--precision {','.join(chosen)}", f"--out {self.path}"]
        return " ".join(parts)

    def summary(self) -> dict[str, Any]:
        """What a report or repository record says of the folder it was made from."""
        return {"variant": self.variant_name, "weights": self.weights, "artifacts": str(self.path),
                "onnx_sha256": self._data["files"][ONNX_FILES["fp32"]]["sha256"]}

    def files(self) -> dict[str, dict[str, Any]]:
        """File name -> manifest entry, for listings (copies)."""
        return copy.deepcopy(self._data.get("files", {}))

    def data(self) -> dict[str, Any]:
        """The whole manifest (a copy): for records that embed it, never for indexing."""
        return copy.deepcopy(self._data)

    def copy_to(self, dst: Path, kept: tuple[str, ...]) -> ArtifactFolder:
        """A new artifact folder at `dst` with the `kept` precisions' ONNX files (verified) and a
        manifest trimmed to them: what a served model carries (an empty `kept`: the manifest alone)."""
        dst.mkdir(parents=True)
        files = {}
        for prec in kept:
            self.onnx(prec)
            for name in self.file_names(prec):
                shutil.copy2(self.file(name), dst / name)
            name = ONNX_FILES[precisions.reads(prec)]
            files[name] = self._data["files"][name]
        data = {**{k: v for k, v in self._data.items() if k != IR_KEY}, "files": copy.deepcopy(files)}
        _write_manifest(dst, data)
        return ArtifactFolder(dst, data)

    # --- derived files (OpenVINO IRs) --------------------------------------------------------

    def ir(self, name: str) -> dict[str, Any] | None:
        entry = (self._data.get(IR_KEY) or {}).get(name)
        return copy.deepcopy(entry) if entry else None

    def irs(self) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self._data.get(IR_KEY) or {})

    def record_ir(self, name: str, entry: dict[str, Any]) -> None:
        inside(self.path, entry.get("onnx", ""), "IR record")
        self.update(lambda m: m.setdefault(IR_KEY, {}).__setitem__(name, entry))

    def forget_irs(self) -> None:
        """Drop every IR record (their files are left to be overwritten): a scratch folder's
        candidate replaced the file they were made from."""
        self.update(lambda m: m.pop(IR_KEY, None))

    def drop(self, precision: str) -> None:
        """Remove a precision's entry (its files stay until replaced)."""
        self.update(lambda m: m["files"].pop(ONNX_FILES[precision], None))

    def record_file(self, precision: str, entry: dict[str, Any]) -> None:
        """Add or replace one precision's entry (its files already in place)."""
        self.update(lambda m: m["files"].__setitem__(ONNX_FILES[precision], entry))

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

    def update(self, change: Callable[[dict[str, Any]], object]) -> None:
        """Apply `change` to the manifest and rewrite it atomically, under the lock."""
        with self.lock():
            data = copy.deepcopy(self._data)
            change(data)
            self._check(data)
            atomic_write(self.path / self._manifest_name, json.dumps(data, indent=2) + "\n")
            self._data = data


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


def _write_manifest(out: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
