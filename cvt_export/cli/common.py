"""What every command shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console

from cvt_export.artifacts import ArtifactError, check_writable
from cvt_export.errors import CvtError

P = ParamSpec("P")
R = TypeVar("R")
EXIT_USER_ERROR = 2

VerboseOpt = Annotated[bool, typer.Option(help="log what each step does (INFO level)")]

# Where the output is not a terminal (a CI log, `| cat`, `> file`) nothing may be cut to rich's
# default 80 columns: tables take their natural width and long lines are not wrapped.
LOG_WIDTH = 1000


def _console(*, stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=LOG_WIDTH)


stdout = _console()
stderr = _console(stderr=True)


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
