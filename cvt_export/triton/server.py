"""A local `tritonserver`: the binary shipped in PyPI's `nvidia-pytriton` wheel, run directly.

The wheel's Python backend needs three things this module provides: a backend folder holding
`libtriton_python.so` and the Python stub built for the running interpreter; the wheel's
bundled libraries on LD_LIBRARY_PATH (the stub is found through a copied path, so its $ORIGIN
run path no longer reaches them) and this interpreter's own libpython and home (the stub embeds
Python); and, because the stub ignores PYTHONPATH, CVT_EXPORT_PYTHONPATH for the generated
model files. The server listens on 127.0.0.1 only, and `Server` always stops it (by way of
the guard process, which also outlives a killed owner just long enough to clean up).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvt_export.triton import TritonError, guard
from cvt_export.triton.repository import python_path

logger = logging.getLogger(__name__)

INSTALL = "pip install nvidia-pytriton --no-deps (its tritonserver binary; see docs/triton.md)"


def triton_home() -> Path:
    """The `tritonserver` folder inside the installed nvidia-pytriton wheel (not imported:
    the package's Python API pins NumPy < 2; only its binary is used)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonError(f"tritonserver is not installed: {INSTALL}")
    home = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (home / "bin" / "tritonserver").is_file():
        raise TritonError(f"{home}: no bin/tritonserver in this nvidia-pytriton install")
    return home


def backend_folder(where: Path) -> Path:
    """A backend folder whose python backend carries the stub for this interpreter."""
    home = triton_home()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"nvidia-pytriton has no Python backend stub for Python {ver}")
    python = where / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in [*(home / "backends" / "python").glob("*.*"), stub]:
        if src.is_file():
            shutil.copy2(src, python / src.name)
    return where / "backends"


def environment() -> dict[str, str]:
    home = triton_home()
    libs = home.parent.parent / "nvidia_pytriton.libs"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PYTHONHOME"] = sys.base_prefix
    env["CVT_EXPORT_PYTHONPATH"] = os.pathsep.join(python_path())
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_port(port: int, flag: str) -> None:
    """A port the server can listen on: 1..65535 and free on 127.0.0.1 now."""
    if not 1 <= port <= 65535:
        raise TritonError(f"{flag} {port}: use 1..65535 (0 picks a free port)")
    with socket.socket() as s:
        # as servers bind: connections of a stopped server in TIME_WAIT do not hold the port (a
        # restart 30 s after SIGTERM was refused), a socket listening on it still does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise TritonError(f"{flag} {port}: cannot listen on 127.0.0.1:{port} ({e.strerror})") from None


@dataclass
class Server:
    """tritonserver on 127.0.0.1 serving one repository, kept by a guard process (see
    `cvt_export.triton.guard`): whatever happens to this process, the server, its Python stubs,
    their shared memory and the temporary folder go with it. A context manager that always stops it.

    `log`: where tritonserver writes (kept); by default a file in the temporary folder, removed
    with it. `pid` is tritonserver's, `guard` the keeper's process (its process group holds both)."""

    repository: Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    log: Path | None = None
    startup_s: float = 120.0
    guard: subprocess.Popen[str] | None = None
    pid: int | None = None
    work: Path | None = None
    shm_prefix: str = ""
    ended: str | None = None  # why the server ended by itself (exit code or signal, and its log's cause)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self, backends: Path) -> list[str]:
        return [str(triton_home() / "bin" / "tritonserver"), "--model-repository", str(self.repository),
                "--backend-directory", str(backends), "--http-address", "127.0.0.1",
                "--http-port", str(self.http_port), "--grpc-address", "127.0.0.1",
                "--grpc-port", str(self.grpc_port), "--allow-metrics", "false",
                "--exit-on-error", "true", "--strict-readiness", "true", "--exit-timeout-secs", "5",
                "--model-control-mode", "explicit", "--load-model", "*",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]

    def start(self) -> Server:
        from cvt_export.triton.repository import check_served

        check_port(self.http_port, "--http-port")
        check_port(self.grpc_port, "--grpc-port")
        if self.http_port == self.grpc_port:
            raise TritonError(f"--http-port and --grpc-port are both {self.http_port}")
        check_served(self.repository)
        self.work = Path(tempfile.mkdtemp(prefix="cvt-triton-"))
        self.shm_prefix = f"{self.work.name}-shm-"
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        try:
            backends = backend_folder(self.work)
            log = self.log or self.work / "tritonserver.log"
            spec = {"command": self.command(backends), "env": environment(), "log": str(log),
                    "work": str(self.work), "shm_prefix": self.shm_prefix, "http_port": self.http_port}
            self.guard = subprocess.Popen([sys.executable, "-m", "cvt_export.triton.guard"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                          start_new_session=True, env=_guard_environment())
            assert self.guard.stdin is not None
            self.guard.stdin.write(json.dumps(spec) + "\n")
            self.guard.stdin.flush()
            threading.Thread(target=self._listen, args=(self.guard,), daemon=True).start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _listen(self, keeper: subprocess.Popen[str]) -> None:
        assert keeper.stdout is not None
        for line in keeper.stdout:
            with contextlib.suppress(ValueError):
                self._events.put(json.loads(line))
        self._events.put({"event": "gone"})

    def poll(self) -> str | None:
        """None while the server runs; else why it ended (also kept in `ended`)."""
        while True:
            try:
                event = self._events.get_nowait()
            except (queue.Empty, AttributeError):
                break
            if event["event"] == "started":
                self.pid = int(event["pid"])
            elif event["event"] == "exited":
                self.ended = f"tritonserver {guard.exit_description(int(event['code']))}: {event['cause']}"
            elif event["event"] == "reloaded":
                logger.warning("model %s: an instance's process died; reloaded%s", event["model"],
                            f" (failed: {event['error']})" if event.get("error") else "")
            elif event["event"] == "gone" and self.ended is None:
                self.ended = "the process keeping tritonserver ended"
        return self.ended

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            ended = self.poll()
            if ended:
                raise TritonError(f"{self.repository}: not served: {ended}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    self.poll()
                    return
            time.sleep(0.25)
        raise TritonError(f"tritonserver not ready after {self.startup_s:.0f} s: {self.cause()}")

    def cause(self) -> str:
        log = self.log or (self.work / "tritonserver.log" if self.work else None)
        return guard.read_causes(log) if log else "no log"

    def alive(self) -> bool:
        return self.guard is not None and self.poll() is None and self.guard.poll() is None

    def stop(self) -> None:
        """Ask the guard to end the server and wait for it (it cleans up even if this process
        dies before the guard is done)."""
        keeper, self.guard = self.guard, None
        if keeper is not None:
            with contextlib.suppress(OSError, ValueError):
                assert keeper.stdin is not None
                keeper.stdin.write("stop\n")
                keeper.stdin.close()
            try:
                keeper.wait(timeout=guard.GRACE_S + 2 * guard.GONE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(keeper.pid, signal.SIGKILL)
                keeper.wait(timeout=guard.GONE_S)
            self.poll()
        if self.work is not None:  # what a guard that was itself killed could not remove
            guard.remove_leftovers(self.work, self.shm_prefix)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _guard_environment() -> dict[str, str]:
    """The guard imports this package: found where this process found it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_path()[0], env.get("PYTHONPATH", "")) if p)
    return env
