"""What every command shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
import typer.main
from rich.console import Console
from rich.table import Table

from cvt_export import metrics
from cvt_export.artifacts import ArtifactError, check_writable
from cvt_export.startup import stop_on_signals
from cvt_ref.errors import CvtError

P = ParamSpec("P")
R = TypeVar("R")
EXIT_USER_ERROR = 2

VerboseOpt = Annotated[bool, typer.Option(help="log what each step does (INFO level)")]

# Where the output is not a terminal (a CI log, `| cat`, `> file`) nothing may be cut to rich's
# default 80 columns: tables take their natural width and long lines are not wrapped.
LOG_WIDTH = 1000
HELP_WIDTH = 120


def _console(*, stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=LOG_WIDTH)


stdout = _console()
stderr = _console(stderr=True)


def show_table(table: Table) -> None:
    """A table on stdout, its title on a line of its own: rich wraps a title to the table's width
    (a long path came out as "brick.jp" / "g")."""
    if table.title:
        stdout.print(table.title, highlight=False, soft_wrap=True, style="italic")
        table.title = None
    stdout.print(table)


COUNTED = re.compile(r"\((\d+)/(\d+)\)")  # a step of a counted series: "ort int8 (3/9)"


class TimeLeft:
    """Adds an estimate to the steps of a counted series: from the pace since the series' first
    step seen, "(3/9, about 40 s left)". A count that goes back or a new total starts a new
    series; its first step has no estimate yet."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.first: tuple[float, int, int] | None = None  # (when, step, total) of the series
        self.last_step = 0

    def __call__(self, text: str) -> str:
        m = COUNTED.search(text)
        if not m:
            return text
        step, total = int(m[1]), int(m[2])
        now = self.clock()
        if self.first is None or total != self.first[2] or step < self.last_step:
            self.first = (now, step, total)
        self.last_step = step
        began, first_step, _ = self.first
        if step == first_step:
            return text
        left = (now - began) / (step - first_step) * (total - step + 1)
        return f"{text[:m.end() - 1]}, about {left:.0f} s left){text[m.end():]}"


class _StepLines:
    """A status for logs: each new step is one line on stderr with the time since the start."""

    def __init__(self, title: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.last = ""
        self.time_left = TimeLeft(clock)
        self.update(title)

    def update(self, text: str) -> None:
        if text and text != self.last:
            self.last = text
            stderr.print(f"[{self.clock() - self.start:7.1f} s] {self.time_left(text)}", highlight=False,
                         soft_wrap=True)


def bar(step: int, total: int, width: int = 20) -> str:
    """A text progress bar for a terminal's status line: steps before this one are done."""
    done = round(width * min(max(step - 1, 0), total) / total) if total > 0 else 0
    return "█" * done + "░" * (width - done)


class _Spinner:
    """A terminal's spinner, with the same estimate in its text and, for a counted series, a
    progress bar in front of it."""

    def __init__(self, live: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.live = live
        self.time_left = TimeLeft(clock)

    def update(self, text: str) -> None:
        m = COUNTED.search(text)
        shown = self.time_left(text)
        self.live.update(f"{bar(int(m[1]), int(m[2]))} {shown}" if m else shown)


@contextlib.contextmanager
def status(title: str) -> Iterator[Any]:
    """Progress of long work: a spinner with the current step on a terminal; elsewhere (a CI log,
    `2> file`) one line per step with the elapsed time, where a spinner would print nothing. A step
    of a counted series ("(3/9)") says about how long the series has left."""
    if stderr.is_terminal:
        with stderr.status(title) as live:
            yield _Spinner(live)
    else:
        yield _StepLines(title)


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """A CvtError is the user's to fix: say it in one line, no traceback, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CvtError as e:
            stderr.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper


# What the disk or the file system says, not the program: the user's to fix (free space, another
# folder, a shorter name), said in one line with the path.
DISK_ERRORS: dict[int, str] = {
    errno.ENOSPC: "no space left on the device; free some space or choose another folder",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another folder",
    errno.EFBIG: "file too large for this file system; choose another folder",
    errno.EROFS: "read-only file system; choose another folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder where a file was expected",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
    errno.EIO: "input/output error from the disk",
}


SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_error(e: OSError) -> str | None:
    """One line for an error of the disk (None for any other OSError: that one is a bug)."""
    from cvt_export import artifacts

    cause = DISK_ERRORS.get(e.errno or 0)
    if cause is None:
        return None
    where = e.filename if e.filename is not None else artifacts.failed_folder(e)
    if e.errno in SPACE and e.filename2 is not None:
        where = e.filename2  # a copy: the destination is what is full
    if where is None:
        return cause[:1].upper() + cause[1:]
    where = str(where)
    if len(where) > 160:
        where = where[:80] + "..." + where[-40:]
    return f"{where}: {cause}"


# The most each numeric option takes, where time or memory grows with the value; None: harmless
# however large (the reason beside it). Every int and float option of both commands is listed:
# tests/test_user_errors.py fails for one that is not, so a new option is classified when added.
NUMBER_BOUNDS: dict[str, float | None] = {
    "--seconds": 3600, "--iters": 100_000, "--warmup": 10_000, "--runs": 100_000,
    "--requests": 100_000, "--confirm-requests": 100_000, "--max-candidates": 1_000,
    "--fidelity-images": 10_000, "--batch": 4_096, "--min-batch": 4_096, "--opt-batch": 4_096,
    "--max-batch": 4_096, "--workers": 256, "--shard-size": 1_000_000, "--threads": 1_024,
    "--instances": 64, "--image-size": 2_048, "--opset": 100, "--outliers": 4_096, "--top": 100_000,
    "--http-port": 65_535, "--grpc-port": 65_535, "--workspace": 1_024, "--max-slowdown": 1_000,
    "--margin": 1.0,
    "--limit": None,         # images: never more than the folder holds
    "--calib-size": None,    # images: never more than the folder holds
    "--outlier-seed": None,  # a seed: any value costs the same
}


def _numeric(param: Any) -> bool:
    import typing

    desc = getattr(param, "type_descriptor", None)
    if desc is not None:  # typer's own parameter (newer typer)
        hint = desc.annotation
        kinds = {hint, *typing.get_args(hint)}
        return bool(kinds & {int, float})
    return getattr(getattr(param, "type", None), "name", "") in ("integer", "float", "integer range",
                                                                  "float range")


def bound_numbers(command: Any, bad: type[Exception]) -> None:
    """Every int and float option of every (sub)command: NaN and infinities refused, and the
    bound of NUMBER_BOUNDS applied, when the command line is parsed (one line, exit 2)."""
    import math

    for sub in [command, *getattr(command, "commands", {}).values()]:
        for param in sub.params:
            if not _numeric(param):
                continue
            name = max(param.opts, key=len)
            bound = NUMBER_BOUNDS.get(name)
            convert = param.process_value

            def checked(ctx: Any, value: Any, convert: Any = convert, param: Any = param,
                        bound: float | None = bound) -> Any:
                value = convert(ctx, value)
                for v in value if isinstance(value, list | tuple) else [value]:
                    if isinstance(v, bool) or not isinstance(v, int | float):
                        continue
                    if not math.isfinite(v):
                        raise bad(f"{v} is not a finite number", ctx=ctx, param=param)  # type: ignore[call-arg]
                    if bound is not None and v > bound:
                        shown = f"{v:,}" if isinstance(v, int) else f"{v:g}"
                        raise bad(f"{shown} is more than it takes (at most {bound:,g})",  # type: ignore[call-arg]
                                  ctx=ctx, param=param)
                return value

            param.process_value = checked


def run_app(app: typer.Typer) -> None:
    """Run a command-line app with the parser's own errors (an unknown option or command, a value
    of the wrong type) as the project's one `error:` line and exit 2, not a framed box."""
    import importlib.util
    import sys

    # --help into a pipe or a file: rich would squeeze the option boxes to 80 columns, wrapping
    # each help text into a narrow column; 120 reads well in a log or a pager (TERMINAL_WIDTH wins)
    import typer.rich_utils as rich_utils

    if not stdout.is_terminal and not os.environ.get("TERMINAL_WIDTH"):
        rich_utils.MAX_WIDTH = HELP_WIDTH
    # newer typer carries its own copy of click, older ones use click itself
    exc: Any = importlib.import_module("typer._click.exceptions" if importlib.util.find_spec("typer._click")
                                       else "click.exceptions")
    command = typer.main.get_command(app)
    bound_numbers(command, exc.BadParameter)
    with stop_on_signals() as stopped:
        code = _run(command, exc)
    if stopped.signum and not stopped.expected:  # Ctrl-C or SIGTERM, cleaned up: the shell's code
        sys.exit(128 + stopped.signum)
    sys.exit(code)


def _run(command: Any, exc: Any) -> int:
    """The command's exit code, with the parser's errors and the disk's as one line."""
    import sys

    try:
        code = command(standalone_mode=False)
    except exc.NoArgsIsHelpError as e:
        e.show()
        sys.exit(EXIT_USER_ERROR)
    except exc.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else Path(sys.argv[0]).name
        stderr.print(f"[bold red]error:[/] {where}: {e.format_message()} (see {where} --help)",
                     highlight=False, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
    except typer.Abort:
        stderr.print("Aborted!", highlight=False)
        sys.exit(1)
    except OSError as e:  # an error of the disk, from any command: one line
        line = disk_error(e)
        if line is None:
            raise
        stderr.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
    return code if isinstance(code, int) else 0


def parse_budgets(texts: list[str] | None) -> list[metrics.Budget]:
    """`--budget` options, refused (one line, exit 2) before any of the toolchain loads."""
    try:
        return [metrics.parse_budget(b) for b in texts or []]
    except ValueError as e:
        raise CvtError(str(e)) from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def output_file(path: Path, option: str) -> None:
    """A file the command may write: not a folder, in a folder that exists and is writable."""
    if path.is_dir():
        raise ArtifactError(f"{option} {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise ArtifactError(f"{option} {path}: the folder {path.parent} does not exist; create it first")
    check_writable(path.parent, option)


def not_an_input(path: Path, option: str, inputs: dict[str, Path | None], *, file: bool = False) -> None:
    """Refuse an output (`--json FILE`, `--out FOLDER`) that would overwrite what the command
    reads: another option's file or folder, or an export folder (its manifest and files are the
    export's; a file output may not land in its root either)."""
    from cvt_export.artifacts import ArtifactFolder

    target = path.resolve()
    for other, given in inputs.items():
        if given is not None and target == given.resolve():
            raise CvtError(f"{option} {path}: is the {other} this command reads; choose another "
                           f"{'folder' if given.is_dir() else 'file'}")
    for folder in (target, target.parent) if file else (target,):
        if folder.is_dir() and ArtifactFolder.is_export(folder):
            raise CvtError(f"{option} {path}: {'is' if folder == target else 'is inside'} the export "
                           f"folder {folder}; write reports to another folder (such as {folder / 'report'})")
