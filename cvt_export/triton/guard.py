"""The keeper of one tritonserver: `python -m cvt_export.triton.guard`, started by `Server`.

Why a process of its own: tritonserver and its Python stubs must not outlive whoever started
them, however that owner ends — a return, an exception, SIGTERM, Ctrl-C at any moment, or
kill -9 (which no handler in the owner sees). The guard runs in a session of its own (a
terminal's Ctrl-C does not reach it) and ends the server when any of these happens:

- its stdin reaches EOF or reads "stop": the owner closed the pipe or died, whichever way;
- it receives SIGTERM, SIGINT or SIGHUP;
- tritonserver exits by itself (it then says why, from the server's log, before cleaning up).

While the server runs, the guard watches the Python stubs (one per model instance): Triton does
not restart a stub that died, and keeps calling the model ready while every request to it fails
("Stub process is not healthy"). The guard reloads such a model (the server runs in explicit
model-control mode, all models loaded at start) and says so; a model that dies more than
MAX_RELOADS times within RELOAD_WINDOW_S stops the server, with the cause.

Shutting down: SIGTERM to tritonserver (a graceful exit, bounded by --exit-timeout-secs), SIGKILL
after a grace period, then SIGKILL to every process left in the guard's process group or
reparented to it (it is a child subreaper, so a Python stub orphaned by a killed tritonserver
comes back to it), then the shared-memory regions named with this server's prefix and the
temporary folder are removed. tritonserver also gets a parent-death signal, so a guard that is
itself killed with -9 still takes the server down.

The owner writes one JSON line (the spec) on stdin; the guard answers JSON lines on stdout:
{"event": "started", "pid": N}, {"event": "exited", "code": C, "cause": "..."},
{"event": "reloaded", "model": M, "error": None or why the reload failed}, {"event": "stopped"}.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 10.0      # after SIGTERM, before SIGKILL
GONE_S = 5.0        # for the last processes of the group to disappear
SHM_DIR = Path("/dev/shm")
INSTANCE_CHECK_S = 1.0
MAX_RELOADS, RELOAD_WINDOW_S, RELOAD_TIMEOUT_S = 3, 60.0, 300.0

# Lines of a tritonserver log that explain a failure, most telling first.
_LOADING = re.compile(r"failed to load '([^']*)'[^:]*: (.*)")
_PYERROR = re.compile(r"^\s*(\w+(Error|Exception)): (.+)$")
# Not causes: the summary line after the real ones, and what tritonserver says at every start on a
# host without a CUDA driver (this CPU-only machine).
_NOISE = ("failed to load all models", "CudaDriverHelper has not been initialized",
          "Unable to allocate pinned system memory")


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def die_with_parent() -> None:
    """preexec_fn: SIGTERM when the process that started this one dies."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _clean(line: str) -> str:
    """A log line without its prefix, quotes, and the traceback Triton appends to a Python
    error as escaped newlines ("...\\n\\nAt:\\n  file(line): function")."""
    line = re.sub(r"^[EWI]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ", "", line.strip())
    line = line.strip('"').split("\\n")[0]
    return line.strip()


def causes(log: str, limit: int = 3) -> list[str]:
    """What a tritonserver log says went wrong: model load failures by model, else the last
    Python error of a stub, else its last error lines; noise and duplicates left out."""
    lines = log.splitlines()
    found: list[str] = []
    for raw in lines:
        line = _clean(raw)
        m = _LOADING.search(line)
        if m and not any(n in line for n in _NOISE):
            found.append(f"model '{m.group(1)}': {m.group(2).strip()}")
    if not found:
        found = [_clean(raw) for raw in lines if _PYERROR.match(raw) and not any(n in raw for n in _NOISE)]
    if not found:
        found = [_clean(raw) for raw in lines
                 if (raw.startswith("E") or "error" in raw.lower()) and not any(n in raw for n in _NOISE)]
    unique = list(dict.fromkeys(f for f in found if f))
    return unique[-limit:]


def read_causes(log: Path) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "no log"
    found = causes(text)
    if found:
        return "; ".join(found)
    tail = [ln for ln in text.splitlines() if ln.strip()][-1:]
    if not tail:
        return "its log is empty"
    return f"its log says nothing wrong; it ends with: {_clean(tail[0])[:200]}"


def exit_description(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def group_members(pgid: int, parent: int) -> list[int]:
    """Live processes in process group `pgid` or whose parent is `parent` (zombies excluded)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        state, ppid, pgrp = fields[0], int(fields[1]), int(fields[2])
        if state != "Z" and (pgrp == pgid or ppid == parent):
            found.append(int(entry.name))
    return found


def remove_leftovers(work: Path | None, shm_prefix: str) -> None:
    """The server's shared-memory regions (named with its own prefix) and its temporary folder."""
    if shm_prefix:
        for region in SHM_DIR.glob(f"{shm_prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _emit(event: dict[str, Any]) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


class Guard:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.command: list[str] = spec["command"]
        self.env: dict[str, str] = spec["env"]
        self.log = Path(spec["log"])
        self.work = Path(spec["work"]) if spec.get("work") else None
        self.shm_prefix: str = spec["shm_prefix"]
        self.http_port = int(spec.get("http_port", 0))
        self.signalled = False
        self.process: subprocess.Popen[bytes] | None = None
        self.known: dict[int, str] = {}          # stub pid -> model, seen alive
        self.ready = False
        self.reloads: dict[str, list[float]] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        try:
            with self.log.open("ab") as sink:
                self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.env,
                                                preexec_fn=die_with_parent)
        except OSError as e:
            _emit({"event": "exited", "code": 127, "cause": f"tritonserver did not start: {e}"})
            self.clean()
            return 1
        _emit({"event": "started", "pid": self.process.pid})
        if not self.signalled:
            self.watch()
        code = self.process.poll()
        if code is not None and not self.signalled:
            _emit({"event": "exited", "code": code, "cause": read_causes(self.log)})
        self.shutdown()
        self.clean()
        _emit({"event": "stopped"})
        return 0

    def watch(self) -> None:
        assert self.process is not None
        next_check = 0.0
        while not self.signalled and self.process.poll() is None:
            try:
                ready, _, _ = select.select([sys.stdin], [], [], 0.2)
            except InterruptedError:
                continue
            if ready:
                line = sys.stdin.readline()
                if not line or line.strip() == "stop":
                    return
            if time.monotonic() >= next_check and self.http_port:
                next_check = time.monotonic() + INSTANCE_CHECK_S
                # Stubs come and go while models load (one checks each config): watch them only
                # once the server is ready.
                self.ready = self.ready or self._ready()
                if self.ready and not self.check_instances():
                    return

    def _ready(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return bool(reply.status == 200)
        except (OSError, ValueError):
            return False

    def stubs(self) -> dict[int, str]:
        """pid -> model name of every Python stub of this server (its first argument is
        REPO/MODEL/VERSION/model.py)."""
        found = {}
        for pid in group_members(os.getpgid(0), os.getpid()):
            with contextlib.suppress(OSError, IndexError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"triton_python_backend_stub"):
                    found[pid] = Path(argv[1].decode(errors="replace")).parts[-3]
        return found

    def check_instances(self) -> bool:
        """A model instance whose stub died serves nothing but errors ("Stub process is not
        healthy") while Triton still calls the model ready: reload that model (the server runs in
        explicit model-control mode for this). False when a model keeps dying: the server is
        then stopped, with the cause, rather than left answering errors."""
        now = self.stubs()
        gone = {model for pid, model in self.known.items() if pid not in now}
        for model in sorted(gone):
            recent = [t for t in self.reloads.get(model, []) if time.monotonic() - t < RELOAD_WINDOW_S]
            if len(recent) >= MAX_RELOADS:
                _emit({"event": "exited", "code": -1, "cause": f"model '{model}': an instance's process died "
                       f"{len(recent) + 1} times within {RELOAD_WINDOW_S:.0f} s; stopped rather than left "
                       f"answering errors ({read_causes(self.log)})"})
                self.signalled = True
                return False
            self.reloads[model] = [*recent, time.monotonic()]
            self.known = {pid: m for pid, m in self.known.items() if m != model}
            error = self.reload(model)
            _emit({"event": "reloaded", "model": model, "error": error})
            now = self.stubs()
        self.known.update({pid: m for pid, m in now.items() if m not in gone})
        return True

    def _post(self, model: str, action: str) -> None:
        url = f"http://127.0.0.1:{self.http_port}/v2/repository/models/{model}/{action}"
        request = urllib.request.Request(url, data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=RELOAD_TIMEOUT_S):
            pass

    def reload(self, model: str) -> str | None:
        """Unload, then load: a plain load of an unchanged model is a no-op for Triton."""
        try:
            self._post(model, "unload")
            self._post(model, "load")
        except (OSError, ValueError) as e:
            return str(e)[:200]
        return None

    def shutdown(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=GONE_S)
        me = os.getpid()
        deadline = time.monotonic() + GONE_S
        while True:
            _reap()
            left = group_members(os.getpgid(0), me)
            if not left or time.monotonic() > deadline:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def clean(self) -> None:
        remove_leftovers(self.work, self.shm_prefix)


def main() -> int:
    line = sys.stdin.readline()
    if not line:
        return 1
    return Guard(json.loads(line)).run()


if __name__ == "__main__":
    sys.exit(main())
