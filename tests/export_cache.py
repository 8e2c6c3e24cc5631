"""The session's shared exports, kept between runs of the working tier (`make check`) only.

An export of cvt-13 takes about a minute and most tests share one. With CVT_TEST_EXPORT_CACHE
set (`make check` sets it; CI's `make test` does not), a fixture's export is kept there with
what it was made from, and reused only while all of that is unchanged:
- the request (the calibration images by content, not by their temporary path),
- every module the build can import: the closure of `cvt_export.build`'s imports inside the
  project, read from the source (imports inside functions included), with their sha256,
- the whole reference package with its bundled data, the Python version and every installed distribution's
  version.
Edit anything the export reads and the next run exports again; edit a command, the harness or
a test and it does not. The calibration files the export wrote to the session's calibration
cache come back with it, so later tests see the same cache as after a fresh export.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("cvt_ref", "cvt_export")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def source_closure(start: str) -> list[Path]:
    """Every project module `start` can import, directly or not, lazily or not (from the source),
    with the packages that hold them."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a module's packages run first
            f = _module_file(".".join(parts[:i]))
            if f is None or f in seen:
                continue
            seen.add(f)
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names if a.name.split(".")[0] in PROJECT]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                        and node.module.split(".")[0] in PROJECT:
                    todo.append(node.module)
                    todo += [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import module`
    return sorted(seen)


def _environment() -> dict[str, Any]:
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())
    return {"python": sys.version, "distributions": hashlib.sha256("\n".join(dists).encode()).hexdigest()}


def _request_key(request: Any) -> str:
    fields = asdict(request)
    calib = fields.pop("calib", None)
    fields["calib"] = sorted(_sha(p) for p in Path(calib).iterdir()) if calib else None
    return json.dumps(fields, sort_keys=True, default=str)


def _inputs(request: Any) -> dict[str, Any]:
    # the whole reference package (it loads some modules by name) and its bundled data
    reference = {p for p in (ROOT / "cvt_ref").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    files = sorted(set(source_closure("cvt_export.build")) | reference)
    return {"request": _request_key(request), "environment": _environment(),
            "files": {str(p.relative_to(ROOT)): _sha(p) for p in files}}


def exported(name: str, request: Any, out: Path, calib_cache: Path,
             make: Callable[[Any, Path], Any]) -> Path:
    """`make(request, out)`, or a copy of the kept result when nothing it was made from changed."""
    where = os.environ.get("CVT_TEST_EXPORT_CACHE")
    if not where:
        make(request, out)
        return out
    entry = Path(where) / name
    inputs = _inputs(request)
    record = entry / "inputs.json"
    if record.is_file() and json.loads(record.read_text()) == inputs:
        shutil.copytree(entry / "folder", out, dirs_exist_ok=True)
        shutil.copytree(entry / "calibration", calib_cache, dirs_exist_ok=True)
        return out
    def files() -> dict[Path, str]:
        return {p.relative_to(calib_cache): _sha(p) for p in calib_cache.rglob("*") if p.is_file()}

    before = files()
    make(request, out)
    staged = entry.with_name(entry.name + f".{os.getpid()}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(out, staged / "folder")
    (staged / "calibration").mkdir()
    for name, sha in files().items():
        if before.get(name) != sha:  # what this export wrote to the calibration cache
            (staged / "calibration" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(calib_cache / name, staged / "calibration" / name)
    (staged / "inputs.json").write_text(json.dumps(inputs, indent=1))
    shutil.rmtree(entry, ignore_errors=True)
    staged.rename(entry)
    return out
