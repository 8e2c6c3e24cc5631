"""Fault injection: every command that writes, against every kind of failure of the disk.

Each fault is made for real where this machine allows it (a full tmpfs the test mounts, a
read-only bind mount, a file where a folder should be, a name longer than the file system takes,
an immutable folder that even root cannot write) and skipped with the reason where it does not.
What every case must give: exit 2 and one `error:` line naming the path (no traceback), nothing
half-written left (no staging folder, no temp file), no `.lock` in a folder the user made, and a
folder the command made removed again.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_accuracy_pass import make_folder

from helpers import BIN, assert_user_error, run_cli, triton_or_skip

pytestmark = pytest.mark.slow


@dataclass
class Fault:
    out: Path            # the --out the command is given
    says: tuple[str, ...]  # what its error line must say (one of them, any case)
    made_by_user: bool   # `out` existed before (and must be left as it was: empty)


def _mount(args: list[str]) -> None:
    made = subprocess.run(["mount", *args], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(args)}): {made.stderr.strip()}")


@pytest.fixture
def faults(tmp_path: Path) -> Iterator[dict[str, Callable[[], Fault]]]:
    mounts: list[Path] = []
    immutable: list[Path] = []

    def no_space() -> Fault:
        full = tmp_path / "full"
        full.mkdir()
        _mount(["-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)])
        mounts.append(full)
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # every data block taken: the next write anywhere on it fails
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        (full / "mine").mkdir()  # the user's own, empty folder (a folder needs no data block)
        return Fault(full / "mine", ("no space left", "disk is full"), True)

    def read_only() -> Fault:
        src, ro = tmp_path / "ro-src", tmp_path / "ro"
        src.mkdir()
        ro.mkdir()
        _mount(["--bind", "-o", "ro", str(src), str(ro)])
        mounts.append(ro)
        return Fault(ro / "out", ("read-only",), False)

    def not_a_folder() -> Fault:
        (tmp_path / "afile").write_text("a file")
        return Fault(tmp_path / "afile" / "out", ("not a directory", "is a file, not a folder"), False)

    def name_too_long() -> Fault:
        return Fault(tmp_path / ("n" * 300), ("too long",), False)

    def not_permitted() -> Fault:
        mine = tmp_path / "immutable"
        mine.mkdir()
        made = subprocess.run(["chattr", "+i", str(mine)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot make an immutable folder here: {made.stderr.strip()}")
        immutable.append(mine)
        return Fault(mine, ("not permitted",), True)

    yield {"no space": no_space, "read-only": read_only, "not a folder": not_a_folder,
           "name too long": name_too_long, "not permitted": not_permitted}
    for folder in immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=False)
    for folder in reversed(mounts):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _commands(exported: Path, dataset: Path) -> dict[str, list[str]]:
    art = str(exported)
    return {
        "onnx": ["cvt-export", "onnx", "--variant", "cvt-13", "--weights", "random:0",
                 "--precision", "fp32"],
        "triton": ["cvt-export", "triton", "--artifacts", art],
        "bench": ["cvt-bench", "--artifacts", art, "--backend", "ort", "--precision", "fp32",
                  "--seconds", "0.2"],
        "accuracy": ["cvt-bench", "accuracy", "--dataset", str(dataset), "--artifacts", art,
                     "--backend", "ort", "--precision", "fp32", "--batch", "2"],
        "profile": ["cvt-bench", "profile", "--artifacts", art, "--precision", "fp32", "--batch", "1",
                    "--runs", "2"],
        "deploy": ["cvt-export", "deploy", "--artifacts", art, *DEPLOY],
    }


COMMANDS = ("onnx", "triton", "bench", "accuracy", "profile", "deploy")
DEPLOY = ["--slo", "p99<=5000ms@rate=3", "--budget", "cosine>=0.99", "--max-candidates", "1",
          "--requests", "20", "--confirm-requests", "20", "--fidelity-images", "2"]
FAULTS = ("no space", "read-only", "not a folder", "name too long", "not permitted")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_failing_disk_is_one_line_and_leaves_nothing(command: str, fault: str, exported: Path,
                                                       tmp_path: Path,
                                                       faults: dict[str, Callable[[], Fault]]) -> None:
    if command == "deploy":
        triton_or_skip()
    dataset = tmp_path / "val"
    make_folder(dataset, 3)
    f = faults[fault]()
    tool, *args = _commands(exported, dataset)[command]
    result = run_cli(tool, *args, "--out", str(f.out))
    assert_user_error(result, "")
    line = next(x for x in result.stderr.splitlines() if x.startswith("error:"))
    assert any(words in line.lower() for words in f.says), line
    assert str(f.out)[:60] in line or str(f.out.parent)[:60] in line, line  # names where
    if f.made_by_user:
        assert f.out.is_dir() and sorted(p.name for p in f.out.iterdir()) == [], "left in the user's folder"
    else:
        assert not (f.out.exists() if len(f.out.name) < 255 else False), "a folder made here was left"
    assert not list(exported.glob(".staging-*")) and not list(exported.glob(".*.tmp"))


def _fill(disk: Path) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * (1 << 20))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_deploy_on_a_disk_that_fills_after_its_search(exported: Path, tmp_path: Path) -> None:
    """The disk fills while deploy confirms its choice (after the search). What is left to write
    then needs no space (the chosen repository is already staged and is renamed into place), and
    the optimized graph ONNX Runtime saves beside a served model is a cache: deploy finishes, and
    the repository it wrote holds the export's model byte for byte. (Before, the cache's failed
    write made the model unloadable: "not served: ... INVALID_PROTOBUF", exit 2.) Had it failed,
    it would have to be one line naming the disk, with its --out gone."""
    import hashlib

    triton_or_skip()
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=1g", "tmpfs", str(disk)])
    try:
        out = disk / "repo"
        proc = subprocess.Popen([str(BIN / "cvt-export"), "deploy", "--artifacts", str(exported),
                                 "--out", str(out), *DEPLOY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # bounded: the command ends
            seen.append(line)
            if "confirming" in line:
                _fill(disk)
                break
        _, rest = proc.communicate(timeout=900)
        err = "".join(seen) + rest
        assert any("confirming" in x for x in seen) and "Traceback" not in err, err
        if proc.returncode == 2:
            assert "no space left" in err and not out.exists(), err
        else:
            assert proc.returncode == 0, err
            digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
            served = [p for p in out.rglob("*.onnx") if p.parent.name != "ort"]
            assert served and all(digest(p) == digest(exported / p.name) for p in served), served
            assert not list(out.glob(".staging-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
