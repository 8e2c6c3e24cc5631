"""A local `tritonserver`: the binary shipped in PyPI's `nvidia-pytriton` wheel, run directly.

The wheel's Python backend needs three things this module provides: a backend folder holding
`libtriton_python.so` and the Python stub built for the running interpreter; the wheel's
bundled libraries on LD_LIBRARY_PATH (the stub is found through a copied path, so its $ORIGIN
run path no longer reaches them) and this interpreter's own libpython and home (the stub embeds
Python); and, because the stub ignores PYTHONPATH, CVT_EXPORT_PYTHONPATH for the generated
model files. The server listens on 127.0.0.1 only, and `Server` always stops it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cvt_export.triton import TritonError
from cvt_export.triton.repository import python_path

INSTALL = "pip install nvidia-pytriton --no-deps (its tritonserver binary; see the README)"


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


@dataclass
class Server:
    """tritonserver on 127.0.0.1 serving one repository; a context manager that always stops it."""

    repository: Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    log: Path | None = None
    startup_s: float = 120.0
    process: subprocess.Popen[bytes] | None = None

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
                "--exit-on-error", "true", "--strict-readiness", "true"]

    def start(self) -> Server:
        if not self.repository.is_dir():
            raise TritonError(f"{self.repository}: no such model repository")
        self._work = Path(tempfile.mkdtemp(prefix="cvt-triton-"))
        backends = backend_folder(self._work)
        self.log = self.log or self._work / "tritonserver.log"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(self.command(backends), stdout=sink, stderr=subprocess.STDOUT,
                                            env=environment(), start_new_session=True)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise TritonError(f"tritonserver exited with {self.process.returncode} while starting: "
                                  f"{self.last_error()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise TritonError(f"tritonserver not ready after {self.startup_s:.0f} s: {self.last_error()}")

    def last_error(self) -> str:
        if self.log is None or not self.log.is_file():
            return "no log"
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines()
                 if ln.startswith("E") or "error" in ln.lower()]
        return lines[-1][:300] if lines else "see " + str(self.log)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
