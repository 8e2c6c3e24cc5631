"""Imported first of all (by `cvt_export/__init__.py`): when the process is `cvt-export` or
`cvt-bench`, a Ctrl-C during the second or so of imports that follows (numpy, PIL, typer, rich...)
ends the command with one line and exit code 130, not a KeyboardInterrupt traceback from deep
inside an import. `cli.common.run_app` puts Python's own handler back once the command is parsed,
so a command's own clean-up on Ctrl-C (serve stopping its server) runs as before. Any other
process importing the package is left alone."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType

COMMANDS = ("cvt-export", "cvt-bench")


_STDERR = -1  # fd 2 as it was at start: an import may point fd 2 elsewhere for a while (quiet.py)
_STARTED = False


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    if _STARTED:  # caught by the C handler just before restore_interrupt: Python's behaviour
        raise KeyboardInterrupt
    with contextlib.suppress(OSError):
        os.write(_STDERR, b"interrupted while starting\n")
    os._exit(130)  # nothing has started yet that would need stopping


_ARGV0 = os.path.basename(sys.argv[0]) if sys.argv else ""
_MP = sys.modules.get("multiprocessing")  # loaded before us only in a worker it started (which
_WORKER = _MP is not None and _MP.parent_process() is not None  # has the parent's argv): not ours
if _ARGV0 in COMMANDS and not _WORKER and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    with contextlib.suppress(OSError):
        _STDERR = os.dup(2)
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def restore_interrupt() -> None:
    """Python's KeyboardInterrupt again (called once the command's imports are done)."""
    global _STARTED
    _STARTED = True
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
