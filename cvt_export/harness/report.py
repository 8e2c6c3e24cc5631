"""A benchmark report's files: report.json (schema cvt-bench/1, the record
`cvt_export.records.BenchReport`), report.md and the PNG plots (`cvt_export.render.report`).

The builder below (`Result`) is what the harness fills while it measures; the file is the
record, whose fields docs/benchmark.md documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvt_export.artifacts import atomic_write
from cvt_export.records import BenchReport, RecordError

REPORT_SCHEMA = "cvt-bench/1"


@dataclass
class Result:
    backend: str
    precision: str
    status: str = "ok"                 # ok | skipped | error
    reason: str = ""
    executed: str = ""
    device: str = ""
    artifact: str = ""
    first_inference_s: float | None = None
    peak_rss_mb: float | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, float] | None = None
    batch_consistency_max_abs: float | None = None
    batch_consistency_cosine_min: float | None = None
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    drift: list[dict[str, Any]] = field(default_factory=list)
    drift_located: str | None = None
    floor: dict[str, Any] = field(default_factory=dict)



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


def write_json(report: BenchReport | dict[str, Any], path: Path) -> None:
    data = report.to_json() if isinstance(report, BenchReport) else report
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def write_all(report: BenchReport, out: Path) -> list[Path]:
    """report.json, report.md and the plots (cvt_export/render/report.py) in `out`."""
    from cvt_export.render.report import markdown, plots

    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "report.json")
    atomic_write(out / "report.md", markdown(report))
    return [out / "report.json", out / "report.md", *plots(report, out)]
