"""Imported first of all (by `cvt_export/__init__.py`): how `cvt-export` and `cvt-bench` stop.

- During the second or so of imports (numpy, PIL, typer, rich...), Ctrl-C or SIGTERM ends the
  command with one line ("interrupted while starting" / "terminated while starting") and exit
  code 130 / 143, not a KeyboardInterrupt traceback from deep inside an import.
- Once the command is parsed, `cli.common.run_app` calls `stop_on_signals`: SIGTERM then stops a
  command exactly as Ctrl-C does (a `Terminated`, which is a KeyboardInterrupt, raised where the
  command is, so the same clean-up runs: servers stopped, staging removed, locks released, the
  accuracy pass's workers ended), and the exit code is 128 + the signal's number. A second
  SIGINT or SIGTERM while that clean-up runs is ignored: the clean-up is bounded (a server gets
  `guard.GRACE_S` before SIGKILL) and cutting it short is what would leave things behind;
  kill -9 is the way to not wait, and what it leaves is handled by the server's guard and by the
  next writer of the folder (marked scratch).

Any other process importing the package (a decode worker started by multiprocessing, the guard,
a test's interpreter) is left alone."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

COMMANDS = ("cvt-export", "cvt-bench")
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_WORDS = {int(signal.SIGINT): b"interrupted", int(signal.SIGTERM): b"terminated"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the command like Ctrl-C's KeyboardInterrupt."""


_STDERR = -1  # fd 2 as it was at start: an import may point fd 2 elsewhere for a while (quiet.py)
_STARTED = False


class Stop:
    """The signal a running command is stopping for (0: none), and whether that is how the
    command ends normally (`serve`: its exit code is then the command's own)."""

    signum = 0
    expected = False


STOP = Stop()


def _while_starting(signum: int, frame: FrameType | None) -> None:
    if _STARTED:  # caught by the C handler just before stop_on_signals: stop as a command does
        _stop(signum, frame)
        return
    with contextlib.suppress(OSError):
        os.write(_STDERR, _WORDS.get(signum, b"stopped") + b" while starting\n")
    os._exit(128 + signum)  # nothing has started yet that would need stopping


def _stop(signum: int, frame: FrameType | None) -> None:
    if STOP.signum:  # already stopping: let the clean-up finish
        return
    STOP.signum = signum
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


_ARGV0 = os.path.basename(sys.argv[0]) if sys.argv else ""
_MP = sys.modules.get("multiprocessing")  # loaded before us only in a worker it started (which
_WORKER = _MP is not None and _MP.parent_process() is not None  # has the parent's argv): not ours
_OURS = _ARGV0 in COMMANDS and not _WORKER  # this process is the command
if (_OURS and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
    with contextlib.suppress(OSError):
        _STDERR = os.dup(2)
    for _signal in SIGNALS:
        signal.signal(_signal, _while_starting)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """For the command's run: SIGINT raises KeyboardInterrupt and SIGTERM `Terminated`, once. The
    handlers before are put back at the end (a command run inside a test's interpreter leaves it
    as it found it)."""
    global _STARTED
    _STARTED = True
    STOP.signum, STOP.expected = 0, False
    try:
        previous = {s: signal.signal(s, _stop) for s in SIGNALS}
    except ValueError:  # not the main thread: signals are not ours to take
        previous = {}
    try:
        yield STOP
    finally:
        for s, handler in previous.items():
            # a command that stopped on a signal ignores more of them while Python finalizes
            # (which puts the default action back: a second Ctrl-C would kill it mid-clean-up)
            signal.signal(s, signal.SIG_IGN if STOP.signum and _OURS else handler)
