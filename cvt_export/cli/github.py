"""Meeting GitHub Actions where it reads: a job summary and error annotations.

Inside a workflow step (`GITHUB_ACTIONS=true`), `cvt-bench` and `cvt-bench regress` append their
Markdown to the file `GITHUB_STEP_SUMMARY` names, and each FAIL/CHANGED line of the gate is also
printed as a workflow command (`::error title=...::message`), which GitHub shows on the run's
page. Outside Actions nothing here does anything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def in_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(kind: str, title: str, message: str) -> str:
    """One workflow command line: kind is error, warning or notice."""
    return f"::{kind} title={_escape_property(title)}::{_escape_data(message)}"


def annotate(kind: str, title: str, message: str) -> None:
    if in_actions():
        print(annotation(kind, title, message), file=sys.stdout, flush=True)


def summary(markdown: str) -> str | None:
    """Append to the job summary; returns a warning to show when the file cannot be written (the
    command's own result does not depend on it), None otherwise."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not in_actions() or not target:
        return None
    try:
        with Path(target).open("a", encoding="utf-8") as f:
            f.write(markdown.rstrip("\n") + "\n\n")
    except OSError as e:
        return f"warning: cannot append to the job summary {target} ({e.strerror or e})"
    return None
