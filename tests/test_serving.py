"""Serving that can be left running: `cvt-export serve` ends tritonserver, its Python stubs, their
shared memory and its temporary folder however it is stopped (SIGTERM, Ctrl-C at any moment,
kill -9 of serve, tritonserver killed mid-request), refuses a repository it cannot serve in one
line naming the model and the cause, and `cvt-export triton` refuses options it would write
wrong or a runtime would ignore.

Oracles are the operating system's: /proc (every process whose command line holds the test's
private TMPDIR, and every process of the server's process group), /dev/shm and the TMPDIR folder.
Every wait is bounded; a failing test still kills what it started (by process group)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cvt_export.records import LoadRun, LoadSpec
from cvt_export.triton import TritonError
from helpers import BIN, assert_user_error, run_cli

pytestmark = pytest.mark.slow
GONE_S = 30.0      # everything the server made is gone within this long after the signal
READY_S = 120.0



def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (process group, command line) of every live process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rfind(")") + 2:].split()
            if fields[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found[int(entry.name)] = (int(fields[2]), cmd)
    return found


def _shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()}


class Serve:
    """`cvt-export serve` with a private TMPDIR, as an operator would run it."""

    def __init__(self, repo: Path, tmp: Path, *extra: str) -> None:
        self.tmp = tmp / "tmpdir"
        self.tmp.mkdir()
        self.shm_before = _shm()
        env = {**os.environ, "TMPDIR": str(self.tmp), "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
        self.proc = subprocess.Popen([str(BIN / "cvt-export"), "serve", str(repo), "--http-port", "0",
                                      "--grpc-port", "0", *extra], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.line = ""
        self.server_pid = 0
        self.group = 0

    def ours(self) -> list[int]:
        """Processes this serve made: their command line names the private TMPDIR (tritonserver's
        backend folder, the stubs), or they are in the server's process group (the guard)."""
        return [pid for pid, (group, cmd) in _processes().items()
                if (str(self.tmp) in cmd or (self.group and group == self.group)) and pid != self.proc.pid]

    def wait_for_server_process(self) -> None:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            for pid, (group, cmd) in _processes().items():
                if "bin/tritonserver" in cmd and str(self.tmp) in cmd:
                    self.server_pid, self.group = pid, group
                    return
            assert self.proc.poll() is None, self.proc.communicate()
            time.sleep(0.05)
        raise AssertionError("tritonserver never started")

    def wait_ready(self) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                self.line = self.proc.stdout.readline()
                if self.line.startswith("serving"):
                    self.server_pid = int(self.line.split("tritonserver pid ")[1].split(")")[0].split(",")[0])
                    self.group = os.getpgid(self.server_pid)
                    return self.line.split("HTTP ")[1].split(",")[0]
            assert self.proc.poll() is None, self.proc.communicate()
        raise AssertionError("serve never said it was serving")

    def in_tmp(self) -> list[Path]:
        """What is left in TMPDIR, but ONNX Runtime's `.ses` (a session-id file it keeps in
        TMPDIR for every process that runs it, in-process benchmarks included)."""
        return [p for p in self.tmp.iterdir() if p.name != ".ses"]

    def assert_nothing_left(self) -> None:
        deadline = time.monotonic() + GONE_S
        while time.monotonic() < deadline and (self.ours() or self.in_tmp() or self.new_shm()):
            time.sleep(0.2)
        left = {pid: _processes().get(pid) for pid in self.ours()}
        assert not left, f"still running after {GONE_S:.0f} s: {left}"
        assert not self.in_tmp(), f"left in TMPDIR: {self.in_tmp()}"
        assert not self.new_shm(), f"left in /dev/shm: {self.new_shm()}"

    def new_shm(self) -> set[str]:
        return {n for n in _shm() - self.shm_before if n.startswith("cvt-triton-")}

    def kill_all(self) -> None:
        """After a failed test: kill serve and give its keeper the time to clean up; only then
        kill what is left (killing the keeper first would leave its shared memory behind)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        deadline = time.monotonic() + GONE_S
        while self.ours() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in self.new_shm():
            with contextlib.suppress(OSError):
                (Path("/dev/shm") / name).unlink()


@pytest.fixture
def serve(repo: Path, tmp_path: Path) -> Iterator[Serve]:
    started: list[Serve] = []

    def start(*extra: str) -> Serve:
        started.append(Serve(repo, tmp_path, *extra))
        return started[-1]

    yield start  # type: ignore[misc]
    for s in started:
        s.kill_all()


def _requests(url: str, stop: threading.Event, answered: list[int], failed: list[str]) -> None:
    import tritonclient.http as http

    client = http.InferenceServerClient(url, network_timeout=30.0, connection_timeout=10.0)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    item = http.InferInput("pixel_values", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    for _ in range(500):  # bounded
        if stop.is_set():
            break
        try:
            client.infer("cvt", [item])
            answered.append(1)
        except Exception as e:  # the server going away mid-request is the point
            failed.append(type(e).__name__)
            break
    client.close()


@pytest.mark.parametrize("how", ["sigterm", "sigint", "sigint-while-starting", "kill-9-serve"])
def test_serve_leaves_nothing_behind(serve: Serve, how: str) -> None:
    s = serve()  # type: ignore[operator]
    if how == "sigint-while-starting":
        s.wait_for_server_process()  # tritonserver exists, loading the model, not ready yet
        s.proc.send_signal(signal.SIGINT)
    else:
        s.wait_ready()
        s.proc.send_signal({"sigterm": signal.SIGTERM, "sigint": signal.SIGINT,
                            "kill-9-serve": signal.SIGKILL}[how])
    code = s.proc.wait(timeout=GONE_S)
    s.assert_nothing_left()
    assert code == (-9 if how == "kill-9-serve" else 0), s.proc.communicate()


def test_a_server_killed_mid_request_is_reported_and_cleaned_up(serve: Serve) -> None:
    s = serve()  # type: ignore[operator]
    url = s.wait_ready()
    stop, answered, failed = threading.Event(), [], []  # type: ignore[var-annotated]
    client = threading.Thread(target=_requests, args=(url, stop, answered, failed))
    client.start()
    deadline = time.monotonic() + 60
    while not answered and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answered, failed
    os.kill(s.server_pid, signal.SIGKILL)  # mid-run: the client is sending back to back
    code = s.proc.wait(timeout=GONE_S)
    stop.set()
    client.join(timeout=60)
    assert not client.is_alive()
    s.assert_nothing_left()
    _, err = s.proc.communicate()
    assert code == 2 and "killed by SIGKILL" in err and "Traceback" not in err, err


def _damaged(repo: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    bad = tmp_path / "repo"
    shutil.copytree(repo, bad)
    if how == "empty":
        shutil.rmtree(bad)
        bad.mkdir()
    elif how == "config":
        (bad / "cvt" / "config.pbtxt").write_text("name: \"cvt\"\nmax_batch_size: 8\nbogus_field: 1\n")
    elif how == "truncated":
        model = bad / "cvt" / "1" / "artifacts" / "model.onnx"
        model.write_bytes(model.read_bytes()[: 1000])
    elif how == "threads":
        config = bad / "cvt" / "config.pbtxt"
        text = config.read_text()
        edited = text.replace('key: "threads"\n  value {\n  }',
                              'key: "threads"\n  value {\n    string_value: "-1"\n  }')
        assert edited != text
        config.write_text(edited)
    elif how == "newline-name":
        (bad / "cvt").rename(bad / "c\nvt")
    elif how == "stray-folder":
        (bad / "notes").mkdir()
    return bad


@pytest.mark.parametrize("how, cause", [
    ("empty", "holds no models"),
    ("config", "model 'cvt':"),
    ("truncated", "model 'cvt': cvt/1/artifacts/model.onnx is not the file"),
    ("threads", "parameter threads '-1'"),
    ("newline-name", "is not a model name"),
    ("stray-folder", "model 'notes': no config.pbtxt"),
])
def test_a_repository_that_cannot_be_served_is_refused_with_its_cause(repo: Path, tmp_path: Path, how: str,
                                                                      cause: str) -> None:
    bad = _damaged(repo, tmp_path, how)
    (tmp_path / "tmpdir").mkdir()
    result = run_cli("cvt-export", "serve", str(bad), "--http-port", "0", "--grpc-port", "0",
                     env={"TMPDIR": str(tmp_path / "tmpdir")}, timeout=120)
    assert_user_error(result, cause)
    assert not list((tmp_path / "tmpdir").iterdir())  # refused before anything was made


@pytest.mark.parametrize("args, cause", [
    (["--http-port", "-5"], "--http-port -5: use 1..65535"),
    (["--grpc-port", "70000"], "--grpc-port': 70,000 is more than it takes (at most 65,535)"),
    (["--log", "/nonexistent-folder/x.log"], "does not exist"),
])
def test_bad_serve_options_are_refused(repo: Path, tmp_path: Path, args: list[str], cause: str) -> None:
    assert_user_error(run_cli("cvt-export", "serve", str(repo), *args, timeout=120), cause)


def test_a_port_in_use_is_named(repo: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("cvt-export", "serve", str(repo), "--http-port", str(port), "--grpc-port", "0",
                         timeout=120)
    assert_user_error(result, f"--http-port {port}: cannot listen")


@pytest.mark.parametrize("args, cause", [
    (["--threads", "-1"], "--threads -1: use 1..256"),
    (["--instances", "100000"], "--instances': 100,000 is more than it takes (at most 64)"),
    (["--instances", "0"], "--instances 0: use 1..64"),
    (["--gpu"], "--gpu: the python runtime"),
    (["--accelerator", "tensorrt"], "--accelerator applies to --runtime onnxruntime with --gpu"),
    (["--runtime", "onnxruntime", "--threads", "2"], "--threads and --python-backend apply to the python"),
    (["--runtime", "onnxruntime", "--python-backend", "openvino"], "apply to the python runtime only"),
    (["--name", "cvt\x07"], "--name"),
    (["--name", "a\nb"], "--name"),
])
def test_options_a_runtime_would_ignore_or_misread_are_refused_before_writing(
        exported: Path, tmp_path: Path, args: list[str], cause: str) -> None:
    out = tmp_path / "repo"
    result = run_cli("cvt-export", "triton", "--artifacts", str(exported), "--out", str(out), *args)
    assert_user_error(result, cause)
    assert not out.exists()


def test_labels_with_a_line_break_are_refused() -> None:
    from cvt_export.triton.repository import check_labels

    check_labels(["cat", "dog"], 2)
    for labels in (["cat", "d\nog"], ["cat", ""], ["cat"], ["cat", "dog\r"]):
        with pytest.raises(TritonError, match="--labels"):
            check_labels(labels, 2)


def test_open_loop_load_with_a_model_instance_killed_mid_run(serve: Serve, exported: Path,
                                                             photos: list[Path]) -> None:
    """2,000 requests arriving at 12/s (Poisson, seeded) from 16 client threads; a quarter of the
    way in, the model's instance process (its Python stub) is killed. Every request is answered
    correctly (against the ONNX Runtime runner in this process) or gets an error that names the
    fault (the dead instance, or the model unavailable while serve reloads it); none hangs; the
    last 300 requests are all answered correctly."""
    import tritonclient.http as http

    from cvt_export.artifacts import ArtifactFolder
    from cvt_export.backends import get_backend
    from cvt_ref.preprocess import load_image, preprocess_array

    variant = ArtifactFolder.open(exported).variant
    images = np.stack([preprocess_array(load_image(p), variant) for p in photos]).astype(np.float32)
    with get_backend("ort").compile(exported, "fp32") as run:
        oracle = np.concatenate([run(images[i:i + 1]) for i in range(len(images))])
    s = serve()  # type: ignore[operator]
    url = s.wait_ready()
    total, rate, clients = 2000, 12.0, 16
    due = time.perf_counter() + 1 + np.cumsum(np.random.default_rng(1).exponential(1 / rate, total))
    outcome: list[tuple[int, float, str | None]] = []  # (index, worst |diff|, error)
    lock, nxt = threading.Lock(), [0]

    def worker() -> None:
        client = http.InferenceServerClient(url, network_timeout=30.0, connection_timeout=10.0)
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= total:
                break
            time.sleep(max(0.0, due[i] - time.perf_counter()))
            k = i % len(images)
            item = http.InferInput("pixel_values", [1, *images.shape[1:]], "FP32")
            item.set_data_from_numpy(images[k:k + 1])
            try:
                got = client.infer("cvt", [item]).as_numpy("logits")
                outcome.append((i, float(np.abs(got - oracle[k:k + 1]).max()), None))
            except Exception as e:
                outcome.append((i, float("nan"), type(e).__name__ + ": " + str(e)[:80]))
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(outcome) < total // 4 and time.monotonic() < deadline + total / rate:
        time.sleep(0.05)
    stubs = [pid for pid, (group, cmd) in _processes().items()
             if group == s.group and "triton_python_backend_stub" in cmd]
    assert len(stubs) == 1, stubs
    os.kill(stubs[0], signal.SIGKILL)
    killed_at = len(outcome)
    for t in threads:
        t.join(timeout=total / rate + 600)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert sorted(i for i, _, _ in outcome) == list(range(total))
    answered = [(i, d) for i, d, e in outcome if e is None]
    errors = [e for _, _, e in outcome if e is not None]
    assert all(d <= 1e-3 for _, d in answered), max(d for _, d in answered)
    fault = ("is not healthy", "has no available versions", "unknown model")
    unexpected = [e for e in errors if not any(f in e for f in fault)]
    assert not unexpected, unexpected[:5]
    failed = sorted(i for i, _, e in outcome if e is not None)
    assert not failed or failed[0] >= killed_at - clients, failed[:5]  # no error before the fault
    assert not [i for i in failed if i >= total - 300], failed[-5:]     # it serves again
    print(f"fault at request {killed_at}: {len(errors)} errors, requests {failed[:1]}..{failed[-1:]}")
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(timeout=GONE_S)
    _, err = s.proc.communicate()
    assert "model cvt: an instance's process died; reloaded" in err, err
    s.assert_nothing_left()


def test_a_normal_run_of_1000_requests_leaves_no_error_in_the_log(serve: Serve, exported: Path,
                                                                   tmp_path: Path) -> None:
    """`cvt-bench triton` sends 1,000 requests (8 clients) to a served model; tritonserver's log
    then holds no error line and no traceback. The one error line tritonserver writes at start on
    a host without a CUDA driver ("CudaDriverHelper has not been initialized", before any model
    loads) is the only E line allowed, and only where there is no NVIDIA driver."""
    log = tmp_path / "server.log"
    s = serve("--log", str(log))  # type: ignore[operator]
    url = s.wait_ready()
    bench = run_cli("cvt-bench", "triton", "--url", url, "--model", "cvt", "--artifacts", str(exported),
                    "--concurrency", "8", "--requests", "1000", "--json", str(tmp_path / "b.json"),
                    timeout=1200)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=GONE_S) == 0
    s.assert_nothing_left()
    lines = log.read_text(errors="replace").splitlines()
    first_load = next(i for i, ln in enumerate(lines) if "loading: cvt" in ln)
    errors = [(i, ln) for i, ln in enumerate(lines)
              if ln.startswith("E") or "Traceback" in ln or "Error" in ln.split("]")[-1]]
    no_driver = not Path("/proc/driver/nvidia").exists()
    allowed = [(i, ln) for i, ln in errors
               if no_driver and i < first_load and "CudaDriverHelper has not been initialized" in ln]
    assert errors == allowed, errors[:5]
    assert "Signal (15) received" in log.read_text()  # the log is the whole run's, to its end


def test_triton_statistics_that_went_back_are_unavailable_not_negative() -> None:
    """Differences of Triton's counters, by hand; a counter that went down (the model reloaded,
    its stub restarted: the counters began again) gives no figure and says why."""
    from cvt_export.harness.served import _Counters, server_deltas
    from cvt_export.records import ServerStats

    before = _Counters(requests=100, queue_ns=4e9, compute_ns=9e9, batches={1: 60, 2: 20})
    after = _Counters(requests=140, queue_ns=5e9, compute_ns=13e9, batches={1: 80, 2: 30, 4: 0})
    got, why = server_deltas(before, after)
    assert why == "" and got == ServerStats(requests=40, executed_batches={"1": 20, "2": 10},
                                            queue_ms_per_request=25.0, compute_ms_per_request=100.0)
    reloaded = _Counters(requests=11, queue_ns=1e8, compute_ns=2e8, batches={1: 11})
    got, why = server_deltas(before, reloaded)
    assert got is None and "reloaded" in why
    got, why = server_deltas(before, None)
    assert got is None and "stopped answering" in why


def test_a_load_over_a_killed_stub_counts_every_request(serve: Serve, exported: Path,
                                                       photos: list[Path]) -> None:
    """An open-loop run whose model instance is killed mid-run: every request is answered, failed
    or never sent (counted, adding up to what was asked), and Triton's statistics are differences
    that make sense (no negative count or time) or are marked unavailable with why."""
    from cvt_export.artifacts import ArtifactFolder
    from cvt_export.harness import served
    from cvt_ref.preprocess import load_image, preprocess_array

    variant = ArtifactFolder.open(exported).variant
    images = np.stack([preprocess_array(load_image(p), variant) for p in photos]).astype(np.float32)
    s = serve()  # type: ignore[operator]
    url = s.wait_ready()
    result: dict[str, LoadRun] = {}
    run = threading.Thread(target=lambda: result.update(
        run=served.run_load(served.Target(url, "cvt"), images, LoadSpec("rate", 8.0), 240)))
    run.start()
    time.sleep(6)  # about 45 requests in
    stubs = [pid for pid, (group, cmd) in _processes().items()
             if group == s.group and "triton_python_backend_stub" in cmd]
    assert len(stubs) == 1, stubs
    os.kill(stubs[0], signal.SIGKILL)
    run.join(timeout=600)
    assert not run.is_alive()
    r = result["run"]
    assert r.requests == 240 and r.sent == (r.answered or 0) + r.failed
    assert (r.answered or 0) + r.failed + r.not_sent == 240
    srv = r.server
    if srv is None:
        assert r.server_unavailable, r
    else:
        assert srv.requests >= 0 and srv.queue_ms_per_request >= 0
        assert srv.compute_ms_per_request >= 0
        assert all(n > 0 for n in srv.executed_batches.values())
    print(r.sent, r.answered, r.failed, r.not_sent, r.server_unavailable)
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(timeout=GONE_S)
    s.assert_nothing_left()
