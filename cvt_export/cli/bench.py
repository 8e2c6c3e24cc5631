"""`cvt-bench`: the accuracy/latency harness. Not built yet (issue 5); it says so, exit 2."""

from __future__ import annotations

import typer

from cvt_export.cli.common import EXIT_USER_ERROR, stderr

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench() -> None:
    """Benchmark backends against the PyTorch reference (not available yet)."""
    stderr.print("error: cvt-bench is not implemented yet; it arrives with the harness "
                 "(export -> backends -> bench). Use `cvt-export predict` meanwhile.")
    raise typer.Exit(EXIT_USER_ERROR)


def main() -> None:
    app()
