"""The artifact folder: files staged privately, validated, then renamed into place; manifest last.

A folder is valid exactly when `manifest.json` exists and every file it lists has the sha256 it
records. The manifest is removed first and written last, so an export that dies half-way leaves
a folder that no reader mistakes for a finished one. One writer at a time: a lock file held with
`flock` (released by the OS even if the writer is killed); a second writer is refused at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import cvt_ref
from cvt_ref.errors import CvtError
from cvt_ref.source import sha256_file
from cvt_ref.variants import Variant

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
LOCK = ".lock"


class ArtifactError(CvtError):
    """An artifact folder that cannot be written, is busy, or does not hold what it claims."""


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


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the folder's writer lock, or refuse at once if another export holds it."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArtifactError(f"{out}: another export is writing this folder; wait for it "
                                "or choose another --out") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A private folder beside the artifacts (same file system, so renames are atomic).

    Call under the lock: any other staging folder then belongs to a writer that was killed.
    """
    for stale in out.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The folder's manifest if it is present, readable and of this schema; else None."""
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        return None
    return data


def verify(out: Path, manifest: Mapping[str, Any], name: str) -> bool:
    """Whether the file a manifest entry names is present with the recorded sha256 (and data)."""
    entry = manifest.get("files", {}).get(name)
    if not isinstance(entry, dict):
        return False
    for fname, digest in [(name, entry.get("sha256")), *entry.get("data_files", {}).items()]:
        path = out / fname
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def load_manifest(out: Path) -> dict[str, Any]:
    """The manifest of a finished export, or an ArtifactError that says what to run."""
    if not out.is_dir():
        raise ArtifactError(f"{out}: no such artifact folder; create it with `cvt-export onnx --out {out}`")
    manifest = read_manifest(out)
    if manifest is None:
        raise ArtifactError(f"{out}: no valid {MANIFEST}; the export did not finish or the folder "
                            f"is not an artifact folder. Re-run `cvt-export onnx --out {out}`")
    return manifest


def commit(out: Path, staged: Path, files: list[str], manifest: dict[str, Any]) -> None:
    """Move staged files into place and write the manifest last (under the lock)."""
    (out / MANIFEST).unlink(missing_ok=True)
    mode = _file_mode()
    for name in files:
        os.chmod(staged / name, mode)  # onnx writes external data 0600; artifacts are shared
        os.replace(staged / name, out / name)
    _write_manifest(out, manifest)


Precision = Literal["fp32", "fp16", "int8", "mixed"]
# "mixed": INT8 except the blocks `cvt-export tune` keeps in float (made by tune, not by export).
ONNX_FILES: dict[Precision, str] = {
    "fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx",
    "mixed": "model.mixed.onnx"}


def onnx_file(folder: Path, precision: str, *, check_hash: bool = True) -> tuple[Path, dict[str, Any]]:
    """The verified ONNX file of one precision in a finished export, with its manifest."""
    manifest = load_manifest(folder)
    name = ONNX_FILES.get(precision)  # type: ignore[call-overload]
    if name is None:
        raise ArtifactError(f"no ONNX artifact for precision {precision!r}; use {', '.join(ONNX_FILES)}")
    if name not in manifest.get("files", {}):
        how = (f"cvt-export tune --artifacts {folder}" if precision == "mixed"
               else f"cvt-export onnx --precision {precision} --out {folder}")
        raise ArtifactError(f"{folder}: has no {name}; make it with `{how}`")
    if check_hash and not verify(folder, manifest, name):
        raise ArtifactError(f"{folder / name}: missing or changed since export (sha256 differs from "
                            f"{MANIFEST}); re-export it from the same source: "
                            f"`{export_command(manifest, folder, [precision])}`")
    return folder / name, manifest


def variant_of(manifest: Mapping[str, Any]) -> Variant:
    """The variant an artifact folder was made for: its registry entry at the exported image size,
    with the checkpoint's own number of classes. Every reader of a manifest asks here."""
    source = manifest.get("source", {})
    variant = cvt_ref.get_variant(manifest["variant"]).at_size(source.get("image_size"))
    classes = source.get("num_classes") or len(manifest.get("labels") or []) or None
    return variant.with_classes(int(classes)) if classes else variant


def labels_of(manifest: Mapping[str, Any]) -> list[str]:
    """The model's own class names (a fine-tuned head's, or ImageNet-1k's)."""
    labels = manifest.get("labels")
    return list(labels) if labels else cvt_ref.class_names(variant_of(manifest).num_classes)


def export_command(manifest: Mapping[str, Any], folder: Path, precisions: list[str]) -> str:
    """The `cvt-export onnx` command that re-makes this folder's files from the same source."""
    source = manifest.get("source", {})
    parts = ["cvt-export onnx", f"--variant {manifest['variant']}", f"--weights {source.get('weights')}"]
    base = cvt_ref.get_variant(manifest["variant"])
    if source.get("image_size") not in (None, base.image_size):
        parts.append(f"--image-size {source['image_size']}")
    if source.get("opset") is not None:
        parts.append(f"--opset {source['opset']}")
    if source.get("batch") not in (None, "dynamic"):
        parts.append(f"--batch {source['batch']}")
    wanted = sorted(set(precisions) | {m.get("precision", "") for m in manifest.get("files", {}).values()}
                    - {"", "mixed"}, key=["fp32", "fp16", "int8"].index)
    stress = source.get("outliers") or {}
    if stress:
        parts.append(f"--outliers {stress['channels']} --outlier-seed {stress['seed']}")
    calib = manifest.get("calibration") or {}
    if "int8" in wanted and calib.get("source") not in (None, "bundled photos"):
        parts.append(f"--calib {calib['source']}")
    parts += [f"--precision {','.join(wanted)}", f"--out {folder}"]
    return " ".join(parts)


def update_manifest(out: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Apply `change` to the manifest and rewrite it atomically. Call under `locked(out)`."""
    manifest = load_manifest(out)
    change(manifest)
    _write_manifest(out, manifest)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write beside the target under a private name, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def _write_manifest(out: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
