"""The kill matrix: every command that starts servers, workers or scratch folders (serve, deploy,
tune, `cvt-bench triton`, `cvt-bench accuracy`) sent SIGINT (to its process group, as a terminal
does), SIGTERM or SIGKILL at three moments: starting (its imports and first reads), mid-load (a
server answering, a candidate measured, a shard written, requests in flight) and shutting down
(the signal under test 0.3 s after a first SIGTERM, while the command cleans up).

What must hold, by the operating system's account: no process whose environment carries the
command's private TMPDIR (every descendant inherits it: servers, stubs, guards, decode workers)
is alive 30 s later; nothing new of theirs in /dev/shm; nothing left in the TMPDIR; SIGINT and SIGTERM end
the command with 130 / 143 (serve: 0, its normal end) and no traceback; SIGKILL leaves only
scratch that carries the toolchain's mark (the next writer removes it) and an artifact folder that
still verifies. Each case's outcome is printed (`-s`) as one row of the matrix."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_artifacts
from test_accuracy_pass import make_folder

from cvt_export.artifacts import ArtifactError, ArtifactFolder, is_marked_scratch
from helpers import BIN, triton_or_skip

pytestmark = pytest.mark.slow
GONE_S = 30.0
REACH_S = 600.0
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
MOMENTS = ("starting", "mid-load", "shutting down")


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


class Launched:
    """A command in a session of its own (its process group is what a terminal's Ctrl-C
    reaches) with a private TMPDIR, its output collected as it comes."""

    def __init__(self, tool: str, args: list[str], tmp: Path) -> None:
        self.tmp = tmp
        self.tmp.mkdir()
        self.shm_before = _shm()
        env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
        self.proc = subprocess.Popen([str(BIN / tool), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, ls=lines: ls.extend(iter(s.readline, "")),
                             daemon=True).start()

    def ours(self) -> list[tuple[int, str]]:
        """Live processes whose environment holds this command's TMPDIR, the command included."""
        mark = f"TMPDIR={self.tmp}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if mark not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                stat = (entry / "stat").read_text()
                if stat[stat.rfind(")") + 2] == "Z":
                    continue
                found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
                              .decode(errors="replace")))
        return found

    def reach(self, moment: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + REACH_S
        while not moment():
            ended = self.proc.poll()
            assert ended is None, f"ended ({ended}) before {what}: {''.join(self.err)}"
            assert time.monotonic() < deadline, f"never reached {what}"
            time.sleep(0.05)

    def send(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGINT:
                os.killpg(self.proc.pid, sig)  # the terminal's Ctrl-C: the whole foreground group
            else:
                os.kill(self.proc.pid, sig)

    def left(self) -> tuple[list[tuple[int, str]], list[str], set[str]]:
        in_tmp = [p.name for p in self.tmp.iterdir() if p.name != ".ses"]  # ONNX Runtime's session id
        # what the command's processes name there: the server's regions (the guard's cvt-triton-
        # prefix), multiprocessing's semaphores and shared memory (another program's are not ours)
        shm = {n for n in _shm() - self.shm_before if n.startswith(("cvt-", "sem.mp-", "psm_"))}
        return self.ours(), in_tmp, shm

    def wait_clean(self) -> tuple[list[tuple[int, str]], list[str], set[str]]:
        deadline = time.monotonic() + GONE_S
        while any(self.left()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.left()

    def kill_all(self) -> None:
        """After a failed case: give guards their time, then SIGKILL whatever is still ours."""
        self.send(signal.SIGKILL)
        deadline = time.monotonic() + GONE_S
        while self.ours() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid, _ in self.ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    started: list[Launched] = []

    def start(tool: str, *args: str) -> Launched:
        started.append(Launched(tool, list(args), tmp_path / f"tmpdir-{len(started)}"))
        return started[-1]

    yield start
    for run in started:
        run.kill_all()


def _stop(run: Launched, moment: str, sig: signal.Signals, ready: Callable[[], bool]) -> int:
    """Bring the command to the moment, send the signal, return its exit code."""
    if moment == "starting":
        time.sleep(1.0)  # importing numpy, torch, the runtimes
    else:
        run.reach(ready, moment)
    if moment == "shutting down":
        run.send(signal.SIGTERM)
        time.sleep(0.3)
    run.send(sig)
    try:
        return run.proc.wait(timeout=GONE_S + 60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {GONE_S + 60:.0f} s after {sig.name}") from None


def _check(run: Launched, name: str, moment: str, sig: signal.Signals, code: int, normal: int) -> None:
    procs, in_tmp, shm = run.wait_clean()
    err = "".join(run.err)
    print(f"\n{name:<12} {moment:<14} {sig.name:<8} exit {code:>4}; left: {len(procs)} processes, "
          f"{len(in_tmp)} temp entries, {len(shm)} shm regions")
    assert not procs, f"still running {GONE_S:.0f} s later: {procs}"
    assert not in_tmp, f"left in TMPDIR: {in_tmp}"
    assert not shm, f"left in /dev/shm: {shm}"
    assert "Traceback" not in err and "Warning" not in err, err[-3000:]
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    elif moment == "shutting down":  # the first signal, SIGTERM, is the one the command stopped for
        assert code in (normal, 128 + signal.SIGTERM), (code, err[-2000:])
    else:
        assert code in (normal, 128 + sig), (code, err[-2000:])


def _scratch_is_marked(folder: Path) -> None:
    """What a killed writer leaves in a folder is scratch the next writer may remove (marked, or
    empty: killed before its mark), never something that opens as an artifact folder."""
    for left in [*folder.glob(".staging-*"), *folder.glob(".tune-*")]:
        assert is_marked_scratch(left) or not any(left.iterdir()), left
        with pytest.raises(ArtifactError):
            ArtifactFolder.open(left)


CASES = [(m, s) for m in MOMENTS for s in SIGNALS]


def _after(seconds: float, reached: Callable[[], bool]) -> Callable[[], bool]:
    """`reached`, held for `seconds` (work in flight past the moment it shows)."""
    since: list[float] = []

    def check() -> bool:
        if not since and reached():
            since.append(time.monotonic())
        return bool(since) and time.monotonic() - since[0] >= seconds

    return check


# --- serve ---------------------------------------------------------------------------------------

def _requests(url: str, stop: threading.Event) -> None:
    import tritonclient.http as http

    client = http.InferenceServerClient(url, network_timeout=30.0, connection_timeout=10.0)
    item = http.InferInput("pixel_values", [1, 3, 224, 224], "FP32")
    item.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
    for _ in range(2000):  # bounded
        if stop.is_set():
            break
        try:
            client.infer("cvt", [item])
        except Exception:  # the server going away mid-request is the point
            break
    client.close()


def _serving_url(run: Launched) -> str:
    line = next((ln for ln in run.out if ln.startswith("serving")), "")
    return line.split("HTTP ")[1].split(",")[0] if line else ""


@pytest.mark.parametrize(("moment", "how"), CASES)
def test_serve(launch: Callable[..., Launched], repo: Path, moment: str, how: str) -> None:
    run = launch("cvt-export", "serve", str(repo), "--http-port", "0", "--grpc-port", "0")
    stop = threading.Event()
    load = threading.Thread(target=lambda: _requests(_serving_url(run), stop))

    def loaded() -> bool:
        if not _serving_url(run):
            return False
        if not load.is_alive():
            load.start()
            time.sleep(1.0)  # requests in flight
        return True

    try:
        code = _stop(run, moment, SIGNALS[how], loaded)
    finally:
        stop.set()
        if load.is_alive():
            load.join(timeout=60)
    _check(run, "serve", moment, SIGNALS[how], code, normal=0)


# --- deploy --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("moment", "how"), CASES)
def test_deploy(launch: Callable[..., Launched], exported: Path, tmp_path: Path, moment: str,
                how: str) -> None:
    triton_or_skip()
    out = tmp_path / "repo"
    run = launch("cvt-export", "deploy", "--artifacts", str(exported), "--out", str(out),
                 "--slo", "p99<=5000ms@rate=3", "--budget", "cosine>=0.99", "--max-candidates", "2",
                 "--requests", "200", "--confirm-requests", "200", "--fidelity-images", "4")

    def measuring() -> bool:  # a candidate's server is up
        return (any("candidate" in ln for ln in run.err)
                and any("bin/tritonserver" in c for _, c in run.ours()))

    code = _stop(run, moment, SIGNALS[how], _after(3.0, measuring))
    _check(run, "deploy", moment, SIGNALS[how], code, normal=128 + SIGNALS[how])
    if out.exists():
        if SIGNALS[how] != signal.SIGKILL:
            assert not list(out.glob(".staging-*")), list(out.iterdir())
        _scratch_is_marked(out)
        assert not (out / "cvt" / "config.pbtxt").exists()  # nothing that looks deployed


# --- tune ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("moment", "how"), CASES)
def test_tune(launch: Callable[..., Launched], stressed: Path, tmp_path: Path, moment: str, how: str) -> None:
    folder = copy_artifacts(stressed, tmp_path)
    run = launch("cvt-export", "tune", "--artifacts", str(folder), "--backend", "ort",
                 "--budget", "cosine>=0.9995", "--seconds", "0.5")
    code = _stop(run, moment, SIGNALS[how],
                 lambda: any((s / "ort").is_dir() for s in folder.glob(".tune-*")))  # a candidate ran
    _check(run, "tune", moment, SIGNALS[how], code, normal=128 + SIGNALS[how])
    opened = ArtifactFolder.open(folder)
    assert all(opened.verify(p) for p in ("fp32", "int8")) and not opened.has("mixed")
    if SIGNALS[how] != signal.SIGKILL:
        assert not list(folder.glob(".tune-*")) and not list(folder.glob(".*.tmp"))
    _scratch_is_marked(folder)


# --- cvt-bench accuracy --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kill-val")
    make_folder(root, 48)
    return root


@pytest.mark.parametrize(("moment", "how"), CASES)
def test_accuracy(launch: Callable[..., Launched], exported: Path, dataset: Path, tmp_path: Path,
                  moment: str, how: str) -> None:
    out = tmp_path / "acc"
    run = launch("cvt-bench", "accuracy", "--dataset", str(dataset), "--artifacts", str(exported),
                 "--backend", "ort", "--precision", "int8", "--batch", "2", "--shard-size", "4",
                 "--workers", "2", "--out", str(out))
    code = _stop(run, moment, SIGNALS[how], lambda: bool(list(out.glob("shards/*/images.json"))))
    _check(run, "accuracy", moment, SIGNALS[how], code, normal=128 + SIGNALS[how])
    assert not list(out.rglob("*.tmp*")) if SIGNALS[how] != signal.SIGKILL else True


# --- cvt-bench triton ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run = Launched("cvt-export", ["serve", str(repo), "--http-port", "0", "--grpc-port", "0"],
                   tmp_path_factory.mktemp("kill-served") / "tmpdir")
    try:
        run.reach(lambda: bool(_serving_url(run)), "serving")
        yield _serving_url(run)
    finally:
        run.send(signal.SIGTERM)
        run.proc.wait(timeout=GONE_S + 30)
        run.kill_all()


@pytest.mark.parametrize(("moment", "how"), CASES)
def test_bench_triton(launch: Callable[..., Launched], served: str, exported: Path, tmp_path: Path,
                      moment: str, how: str) -> None:
    run = launch("cvt-bench", "triton", "--url", served, "--model", "cvt", "--artifacts", str(exported),
                 "--concurrency", "4", "--requests", "2000", "--json", str(tmp_path / "b.json"))
    code = _stop(run, moment, SIGNALS[how], _after(4.0, lambda: any("measuring" in ln for ln in run.err)))
    _check(run, "bench triton", moment, SIGNALS[how], code, normal=128 + SIGNALS[how])
    assert not (tmp_path / "b.json").exists()
