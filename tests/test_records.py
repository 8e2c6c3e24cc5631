"""The typed records read every file the tools committed under reports/, of every version they
were written in, and refuse foreign, newer and broken files with one line. The oracle for what
a file says is the file's own JSON, read here without the records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvt_export.deploy import Slo
from cvt_export.records import AccuracyReport, BenchReport, ProfileReport, Recommendation, RecordError
from cvt_export.render import deploy as render_deploy
from cvt_export.render import profile as render_profile
from cvt_export.render import recommendation as render_recommendation
from cvt_export.render import report as render_report

REPORTS = Path(__file__).resolve().parents[1] / "reports"
BENCH = sorted(REPORTS.rglob("report.json"))
ADVICE = sorted(REPORTS.rglob("recommendation.json"))
DEPLOY = sorted(REPORTS.rglob("*.deploy.json"))
PROFILES = sorted(REPORTS.rglob("profile-*.json"))


def _name(path: Path) -> str:
    return str(path.relative_to(REPORTS))


def test_the_committed_files_are_found() -> None:
    assert len(BENCH) >= 8 and len(ADVICE) >= 8 and len(DEPLOY) >= 8 and len(PROFILES) >= 4


@pytest.mark.parametrize("path", BENCH, ids=_name)
def test_every_committed_report_reads_and_renders(path: Path) -> None:
    raw = json.loads(path.read_text())
    report = BenchReport.read(path)
    md = render_report.markdown(report)
    ran = [r for r in raw["results"] if r["status"] == "ok"]
    assert ran
    for r in ran:  # each row's median at each batch, as the file has it
        cells = [f"{r['latency'][str(b)]['median_ms']:.1f}" for b in raw["settings"]["batches"]]
        line = next(x for x in md.splitlines() if x.startswith(f"| {r['backend']} | {r['precision']} | "
                                                               f"{r['executed']} |"))
        assert all(c in line for c in cells), (line, cells)
    for r in raw["results"]:
        if r["status"] != "ok":
            assert f"- {r['backend']} {r['precision']} ({r['status']})" in md
    for objective, pick in (raw.get("recommendation") or {}).get("objectives", {}).items():
        if pick:
            assert f"**{objective}**: {pick['backend']} {pick['precision']} (" in md


@pytest.mark.parametrize("path", ADVICE, ids=_name)
def test_every_committed_recommendation_reads_and_renders(path: Path) -> None:
    raw = json.loads(path.read_text())
    text = "\n".join(render_recommendation.markdown(Recommendation.read(path)))
    for objective, pick in raw["objectives"].items():
        figure = (f"{pick['median_ms']:.1f} ms" if objective == "latency-b1"
                  else f"{pick['images_per_s']:.1f} img/s")
        assert f"**{objective}**: {pick['backend']} {pick['precision']} ({figure}" in text


@pytest.mark.parametrize("path", DEPLOY, ids=_name)
def test_every_committed_deploy_record_renders(path: Path) -> None:
    raw = json.loads(path.read_text())
    slo = Slo.parse(raw["slo"])
    text = "\n".join(render_deploy.markdown(raw, slo))
    if raw["chosen"] is None:
        assert "**No candidate met the SLO within the budget.**" in text
    else:
        assert f"**Chosen by the search**: {raw['chosen']['label']}." in text
        held = raw["confirmation"]["held"]
        assert ("**the SLO held**." if held else "**the SLO did not hold**.") in text
    assert render_deploy.pareto_svg(raw, slo).count("<circle") == sum(
        "meets" in c for c in raw["search"]["candidates"])


@pytest.mark.parametrize("path", PROFILES, ids=_name)
def test_every_committed_profile_reads_and_renders(path: Path) -> None:
    raw = json.loads(path.read_text())
    text = render_profile.markdown(ProfileReport.read(path))
    for batch, f in raw["batches"].items():
        assert (f"## Batch {batch}\n\nWhole inference {f['run_ms']:.1f} ms; operators "
                f"{f['kernels_ms']:.1f} ms; GEMM {f['gemm_ms']:.1f} ms") in text
        for g in f["by_op"]:
            assert f"| {g['group']} | {g['ms']:.2f} | {100 * g['share']:.1f}% | {g['nodes']} |" in text


def test_foreign_newer_and_broken_files_are_refused_with_one_line(tmp_path: Path) -> None:
    report = json.loads(BENCH[0].read_text())
    cases = {
        "accuracy": (json.dumps({**report, "schema": "cvt-accuracy/1"}),
                     "not a cvt-bench report (schema 'cvt-accuracy/1', expected 'cvt-bench/1')"),
        "newer": (json.dumps({**report, "schema": "cvt-bench/2"}),
                  "written by a newer cvt-export (cvt-bench/2; this one reads cvt-bench/1 and older)"),
        "truncated": (BENCH[0].read_text()[:500], "not a cvt-bench report (JSONDecodeError"),
        "wrong type": (json.dumps({**report, "results": [{**report["results"][0],
                                                           "latency": {"1": "fast"}}]}),
                       "results[0].latency.1: expected an object, got str"),
    }
    for what, (text, said) in cases.items():
        path = tmp_path / f"{what}.json"
        path.write_text(text)
        with pytest.raises(RecordError) as caught:
            BenchReport.read(path)
        message = str(caught.value)
        assert said in message and "\n" not in message and message.startswith(str(path)), (what, message)
    with pytest.raises(RecordError, match="not a cvt-bench accuracy report"):
        AccuracyReport.read(BENCH[0])
