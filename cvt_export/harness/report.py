"""The files of cvt-bench's reports: a benchmark's report.json (schema cvt-bench/1, the record
`cvt_export.records.BenchReport`), report.md and the PNG plots (`cvt_export.render.report`), and
the accuracy pass's accuracy.json (`AccuracyReport`), accuracy.md and accuracy.png
(`cvt_export.render.accuracy`).

The harness builds the record (`harness.bench`) as it measures; its fields are documented in
docs/benchmark.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cvt_export.artifacts import atomic_write
from cvt_export.records import AccuracyReport, BenchReport, Record, RecordError


def validate(data: object) -> list[str]:
    """Problems that keep a file from being a report (empty list: valid): the record's own
    refusal (foreign, newer, a field missing or of the wrong type), then rows that say they ran
    but carry no timings."""
    try:
        report = BenchReport.from_json(data)
    except RecordError as e:
        return [str(e)]
    return [f"results[{i}] ({r.name}) is ok but has no latency"
            for i, r in enumerate(report.results) if r.ok and not r.latency]


def write_json(report: Record | dict[str, Any], path: Path) -> None:
    data = report.to_json() if isinstance(report, Record) else report
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def write_all(report: BenchReport, out: Path) -> list[Path]:
    """report.json, report.md and the plots (cvt_export/render/report.py) in `out`."""
    from cvt_export.render.report import markdown, plots

    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "report.json")
    atomic_write(out / "report.md", markdown(report))
    return [out / "report.json", out / "report.md", *plots(report, out)]


def write_accuracy(report: AccuracyReport, out: Path) -> list[Path]:
    """accuracy.json, accuracy.md and accuracy.png (cvt_export/render/accuracy.py) in `out`."""
    from cvt_export.render.accuracy import markdown, plot

    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "accuracy.json")
    atomic_write(out / "accuracy.md", markdown(report))
    return [out / "accuracy.json", out / "accuracy.md", plot(report, out / "accuracy.png")]
