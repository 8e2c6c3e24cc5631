"""The typed records read every file the tools committed under reports/, of every version they
were written in, and refuse foreign, newer and broken files with one line. The oracle for what
a file says is the file's own JSON, read here without the records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvt_export.deploy import Slo
from cvt_export.records import (
    AccuracyReport,
    BenchReport,
    DeployRecord,
    ProfileReport,
    Recommendation,
    RecordError,
    RegressResult,
    TuneDecisions,
    as_json,
    parse,
)
from cvt_export.render import accuracy as render_accuracy
from cvt_export.render import deploy as render_deploy
from cvt_export.render import profile as render_profile
from cvt_export.render import recommendation as render_recommendation
from cvt_export.render import regress as render_regress
from cvt_export.render import report as render_report
from cvt_export.render import tune as render_tune

REPORTS = Path(__file__).resolve().parents[1] / "reports"
BENCH = sorted(REPORTS.rglob("report.json"))
ADVICE = sorted(REPORTS.rglob("recommendation.json"))
DEPLOY = sorted(REPORTS.rglob("*.deploy.json"))
PROFILES = sorted(REPORTS.rglob("profile-*.json"))
# Files an earlier cvt-export wrote beside the Markdown it rendered from them (what each is:
# tests/data/rendered/README.md): the renderers, fed the record read from the JSON, must write that
# Markdown again byte for byte.
RENDERED = Path(__file__).parent / "data" / "rendered"
TUNE_MD = [REPORTS / "outliers-cvt-13" / "tune-ort-confirmed.json", *sorted(RENDERED.glob("tune-*.json"))]
ACCURACY_MD = sorted(RENDERED.glob("accuracy-*.json"))
GATE_MD = sorted(RENDERED.glob("gate-*.json"))


def _written_beside(path: Path) -> str:
    """The Markdown written with a JSON file, less a leading HTML comment saying where it came from."""
    text = path.with_suffix(".md").read_text()
    return text.split("\n", 1)[1] if text.startswith("<!--") else text


def _name(path: Path) -> str:
    return str(path.relative_to(REPORTS))


def test_the_committed_files_are_found() -> None:
    assert len(BENCH) >= 8 and len(ADVICE) >= 8 and len(DEPLOY) >= 8 and len(PROFILES) >= 4
    assert BASELINES


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
def test_every_committed_deploy_record_reads_and_renders(path: Path) -> None:
    raw = json.loads(path.read_text())
    record = DeployRecord.read(path)
    slo = Slo.parse(raw["slo"])
    text = "\n".join(render_deploy.markdown(record, slo))
    if raw["chosen"] is None:
        assert "**No candidate met the SLO within the budget.**" in text
    else:
        assert f"**Chosen by the search**: {raw['chosen']['label']}." in text
        held = raw["confirmation"]["held"]
        assert ("**the SLO held**." if held else "**the SLO did not hold**.") in text
    assert render_deploy.pareto_svg(record, slo).count("<circle") == sum(
        "meets" in c for c in raw["search"]["candidates"])
    for k, c in enumerate(raw["search"]["candidates"], 1):
        assert f"| {k} | {c['label']} |" in text


@pytest.mark.parametrize("path", PROFILES, ids=_name)
def test_every_committed_profile_reads_and_renders(path: Path) -> None:
    raw = json.loads(path.read_text())
    text = render_profile.markdown(ProfileReport.read(path))
    for batch, f in raw["batches"].items():
        assert (f"## Batch {batch}\n\nWhole inference {f['run_ms']:.1f} ms; operators "
                f"{f['kernels_ms']:.1f} ms; GEMM {f['gemm_ms']:.1f} ms") in text
        for g in f["by_op"]:
            assert f"| {g['group']} | {g['ms']:.2f} | {100 * g['share']:.1f}% | {g['nodes']} |" in text


def test_the_rendered_files_are_found() -> None:
    assert len(TUNE_MD) >= 2 and len(ACCURACY_MD) >= 2 and len(GATE_MD) >= 2


@pytest.mark.parametrize("path", TUNE_MD, ids=lambda p: p.stem)
def test_tune_md_is_rendered_again_from_its_decisions(path: Path) -> None:
    decided = parse(TuneDecisions, json.loads(path.read_text()), str(path))
    assert render_tune.markdown(decided) == _written_beside(path)


@pytest.mark.parametrize("path", ACCURACY_MD, ids=lambda p: p.stem)
def test_accuracy_md_is_rendered_again_from_its_report(path: Path) -> None:
    assert render_accuracy.markdown(AccuracyReport.read(path)) == _written_beside(path)


@pytest.mark.parametrize("path", GATE_MD, ids=lambda p: p.stem)
def test_the_gate_summary_is_rendered_again_from_its_result(path: Path) -> None:
    result = RegressResult.read(path)
    assert result.to_json() == json.loads(path.read_text())  # nothing the file says is lost
    assert render_regress.markdown(result) == _written_beside(path)


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


# --- manifests that earlier releases wrote ------------------------------------------------------
# tests/data/manifests/RELEASE.json: the manifest.json of a cvt-13 (random:0) folder exported by
# that commit's own code (its ONNX files left out: only what the folder says is read here).

MANIFESTS = sorted((Path(__file__).parent / "data" / "manifests").glob("*.json"))
TUNED = Path(__file__).parent / "data" / "manifests" / "2026-12-03-f9dd58c-tuned.json"


def _lost(raw: object, written: object, at: str = "") -> list[str]:
    """What a rewrite dropped or changed of what `raw` said (a null left out is not lost)."""
    if isinstance(raw, dict):
        if not isinstance(written, dict):
            return [f"{at}: {type(written).__name__}"]
        return [lost for k, v in raw.items() if v is not None
                for lost in (_lost(v, written[k], f"{at}.{k}") if k in written else [f"{at}.{k}"])]
    return [] if raw == written else [f"{at}: {raw!r} -> {written!r}"]


def test_the_manifests_of_earlier_releases_are_there() -> None:
    assert len(MANIFESTS) >= 3


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_a_folder_an_earlier_release_wrote_still_opens(path: Path, tmp_path: Path) -> None:
    from cvt_export.artifacts import ArtifactFolder

    raw = json.loads(path.read_text())
    (tmp_path / "manifest.json").write_text(path.read_text())
    folder = ArtifactFolder.open(tmp_path)
    assert folder.variant_name == raw["variant"] and folder.weights_spec == raw["weights"]["spec"]
    assert folder.source.opset == raw["source"]["opset"] and folder.image_size == raw["source"]["image_size"]
    assert folder.variant.num_classes == len(raw.get("labels") or range(1000))
    for name, entry in raw["files"].items():
        precision = entry["precision"]
        read = folder.entry(precision)
        assert folder.file_names(precision)[0] == name and read.sha256 == entry["sha256"]
        assert read.made_from == entry.get("from") and read.graph is not None
        assert read.graph.ops == entry["graph"]["ops"] and read.graph.nodes == entry["graph"]["nodes"]
        assert read.graph.inputs[0].shape == tuple(entry["graph"]["inputs"][0]["shape"])
        if "validation" not in entry:  # tune's mix: its figures are its decisions (below)
            assert read.validation is None and precision == "mixed"
            continue
        assert read.validation is not None
        assert read.validation.top1_agreement == entry["validation"].get("top1_agreement")
        assert read.validation.max_abs == entry["validation"]["max_abs"]
    calib = raw.get("calibration") or {}
    assert folder.calibration_images.files == tuple(calib.get("files", ()))
    assert folder.calibration_images.fingerprints == tuple(calib.get("fingerprints", ()))
    for name, ir in (raw.get("openvino") or {}).items():
        read_ir = folder.ir(name)
        assert read_ir is not None and (read_ir.made_from, read_ir.onnx) == (ir["from"], ir["onnx"])
    assert folder.probes == raw["files"]["model.onnx"].get("probes", {})
    assert folder.export_command(["fp32"]).endswith(f"--out {tmp_path}")
    mixed = raw["files"].get("model.mixed.onnx")
    if mixed is not None:  # tune's decisions, typed: every field of the file, as it says them
        decided = folder.entry("mixed").tune
        assert isinstance(decided, TuneDecisions) and as_json(decided) == mixed["tune"]
        assert decided.configs[-1].confirmation.n == mixed["tune"]["configs"][-1]["confirmation"]["n"]
    # what a writer does to it (any change rewrites the file): nothing it said is lost
    assert _lost(raw, folder.manifest.to_json()) == []
    folder.update(lambda manifest: manifest)
    assert _lost(raw, json.loads((tmp_path / "manifest.json").read_text())) == []


def test_tune_decisions_of_the_first_releases_are_kept_as_written(tmp_path: Path) -> None:
    """The first releases' tune wrote its decisions without confirmation images, margin or roles
    (503bc35's `summary`): the folder opens, and they are kept as the file says them."""
    from cvt_export.artifacts import ArtifactFolder

    raw = json.loads(TUNED.read_text())
    first = raw["files"]["model.mixed.onnx"]["tune"]
    for key in ("margin", "roles"):
        del first[key]
    for config in first["configs"]:
        del config["confirmation"]
        for key in ("n", "cosine_p5", "top1_agreement_ci"):
            del config["fidelity"][key]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    folder = ArtifactFolder.open(tmp_path)
    assert folder.entry("mixed").tune == first
    folder.update(lambda manifest: manifest)
    assert json.loads((tmp_path / "manifest.json").read_text())["files"]["model.mixed.onnx"]["tune"] == first


def test_the_rewrite_check_sees_a_lost_or_changed_field() -> None:
    raw = {"a": {"b": 1, "c": None, "d": [1, 2]}, "e": "x"}
    assert _lost(raw, {"a": {"b": 1, "d": [1, 2]}, "e": "x", "new": 1}) == []
    assert _lost(raw, {"a": {"b": 2, "d": [1]}}) == [".a.b: 1 -> 2", ".a.d: [1, 2] -> [1]", ".e"]


@pytest.mark.parametrize(("change", "says"), [
    (lambda m: m.update(schema=2), "written by a newer cvt-export"),
    (lambda m: m.update(files=[]), "expected an object"),
    (lambda m: m["files"]["model.onnx"].update(sha256=None), "sha256: expected str, got None"),
    (lambda m: m["weights"].update(activation="relu"), "'relu' is not one of"),
    (lambda m: m.pop("source"), "missing field 'source'"),
])
def test_a_newer_or_broken_manifest_is_refused_in_one_line(change, says: str, tmp_path: Path) -> None:
    from cvt_export.artifacts import ArtifactError, ArtifactFolder

    raw = json.loads(MANIFESTS[-1].read_text())
    change(raw)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=says) as refused:
        ArtifactFolder.open(tmp_path)
    assert "\n" not in str(refused.value)


BASELINES = sorted((REPORTS / "baseline").glob("*.json"))


@pytest.mark.parametrize("path", BASELINES, ids=_name)
def test_every_committed_baseline_reads_and_is_written_back_byte_for_byte(path: Path) -> None:
    from cvt_export import regress

    raw = path.read_text()
    baseline = regress.load_baseline(path)
    data = json.loads(raw)
    assert set(baseline.results) == set(data["results"])
    assert baseline.inputs.images == data["inputs"]["images"]
    for key, row in data["results"].items():
        assert baseline.results[key].fidelity.cosine_min == row["fidelity"]["cosine_min"]
        assert baseline.results[key].median_ms == row["median_ms"]
    assert regress.decode(baseline.reference.logits).shape == (data["inputs"]["images"], 1000)
    assert json.dumps(baseline.to_json(), indent=1) + "\n" == raw


SERVED = sorted(p for p in REPORTS.rglob("*.json") if '"cvt-bench-triton/' in p.read_text()[:200])


@pytest.mark.parametrize("path", SERVED, ids=_name)
def test_every_committed_served_report_reads_and_shows(path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from cvt_export.cli import bench as cli_bench
    from cvt_export.records import ServedReport

    raw = json.loads(path.read_text())
    report = ServedReport.read(path)
    cli_bench._show_served(report, "cvt", "http")
    shown = capsys.readouterr().out
    assert f"cosine {raw['fidelity']['cosine_min']:.5f}" in shown
    for run in raw["runs"]:
        label = f"{run['concurrency']} clients" if "concurrency" in run else f"{run['rate']:g}/s"
        assert label in shown and f"{run['images_per_s']:.1f}" in shown
        assert f"{run.get('answered', run['requests'])}/{run['requests']}" in shown


def test_a_served_report_of_a_failed_run_says_what_failed() -> None:
    """The failure line reads the record of the run that stopped (oracle: the figures put in)."""
    from cvt_export.cli import bench as cli_bench
    from cvt_export.records import ServedReport

    raw = json.loads((REPORTS / "triton-cvt-13.json").read_text())
    raw.update(schema="cvt-bench-triton/2", failed_at="4 clients")
    raw["runs"][-1].update(sent=150, answered=140, failed=10, not_sent=90, errors={"timeout": 10})
    line = cli_bench._served_failures(ServedReport.from_json(raw))
    assert line.startswith("10 of 150 requests sent failed at 4 clients") and "timeout ×10" in line
    assert f"90 of the {raw['runs'][-1]['requests']} were never sent" in line
