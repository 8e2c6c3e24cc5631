"""cvt-bench: metrics against hand-computed cases, the report schema, a perturbed runner, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace as Figures  # figures by name, as a fidelity record has them
from typing import Any

import numpy as np
import pytest
from conftest import copy_artifacts

import cvt_ref
from cvt_export import metrics
from cvt_export.backends import get_backend
from cvt_export.harness import bench, report
from cvt_export.records import BenchReport
from cvt_export.render import report as render_report
from helpers import PerturbedBackend, assert_user_error, run_cli

# --- metrics, by hand ----------------------------------------------------------------------


def test_cosine_max_mean_abs_by_hand() -> None:
    ref = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]], np.float32)
    got = np.array([[0.0, 1.0], [2.0, 2.0], [3.0, 4.5]], np.float32)
    cos = metrics.cosine(ref, got)
    assert cos[0] == pytest.approx(0.0) and cos[1] == pytest.approx(1.0)
    assert cos[2] == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))
    assert metrics.max_abs(ref, got) == pytest.approx(1.0)
    assert metrics.mean_abs(ref, got) == pytest.approx((1 + 1 + 1 + 1 + 0 + 0.5) / 6)


def test_topk_agreement_by_hand() -> None:
    ref = np.array([[9, 8, 7, 6, 5, 0, 0], [0, 1, 2, 3, 4, 5, 6]], np.float32)
    same_set = ref.copy()
    same_set[0, :5] = [5, 6, 7, 8, 9]          # same top-5 set, other order, other top-1
    assert metrics.top1_agreement(ref, same_set) == 0.5
    assert metrics.top5_agreement(ref, same_set) == 1.0
    other = ref.copy()
    other[1, 0] = 100                          # row 1: new top-1, top-5 set changes
    assert metrics.top1_agreement(ref, other) == 0.5
    assert metrics.top5_agreement(ref, other) == 0.5


def test_kl_divergence_by_hand() -> None:
    p = np.array([[0.0, 0.0]])                 # softmax: [1/2, 1/2]
    q = np.array([[math.log(3.0), 0.0]])       # softmax: [3/4, 1/4]
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert metrics.kl_divergence(p, q)[0] == pytest.approx(expected)
    assert metrics.kl_divergence(p, p)[0] == pytest.approx(0.0)
    big = np.array([[1000.0, 0.0]])            # no overflow in the softmax
    assert np.isfinite(metrics.kl_divergence(big, p)).all()


def test_accuracy_and_worst_image_by_hand() -> None:
    logits = np.zeros((3, 10))
    logits[0, 2] = 5
    logits[1, 7] = 5
    logits[1, 3] = 4
    logits[2, 1] = 5
    acc = metrics.accuracy(logits, np.array([2, 3, 9]))
    assert acc.top1 == pytest.approx(1 / 3)
    assert acc.top5 == pytest.approx(2 / 3)  # row 2's label 9 ties at 0 with eight others
    noisy = logits.copy()
    noisy[1] = -logits[1]
    summary = metrics.full_fidelity(logits, noisy, ["a.jpg", "b.jpg", "c.jpg"])
    assert summary.worst_image == "b.jpg" and summary.worst_cosine == pytest.approx(-1.0)


def test_latency_stats_by_hand() -> None:
    s = metrics.latency_stats([0.001, 0.002, 0.003, 0.004], batch=8)
    assert s.median_ms == pytest.approx(2.5) and s.mean_ms == pytest.approx(2.5)
    assert s.min_ms == pytest.approx(1.0) and s.iterations == 4
    assert s.p90_ms == pytest.approx(3.7)  # linear interpolation at rank 2.7: 3 + 0.7
    assert s.stdev_ms == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s.images_per_s == pytest.approx(8 / 0.0025)


def test_drift_locates_the_largest_growth_by_hand() -> None:
    points = ["s0", "s1", "s2", "logits"]
    assert metrics.largest_growth(points, [1e-4, 2e-4, 5e-3, 6e-3]) == "s2"
    assert metrics.largest_growth(points, [3e-3, 3e-3, 3e-3, 3e-3]) == "s0"
    assert metrics.largest_growth(points, [1e-9, 1e-8, 1e-9, 1e-8]) is None  # rounding only
    d = metrics.drift("s0", np.array([[3.0, 4.0]]), np.array([[3.0, 4.0]]) * 2)
    assert d.cosine_min == pytest.approx(1.0) and d.rel_max_abs == pytest.approx(1.0)


def test_bounds_per_precision_name_what_breaks() -> None:
    assert metrics.within_bounds("fp32", Figures(max_abs=2e-4, top1_agreement=1.0)) == [
        "max_abs 0.0002 > 0.0001"]
    assert metrics.within_bounds("fp32", Figures(max_abs=1e-6, top1_agreement=0.5)) == [
        "top1_agreement 0.5 < 1"]
    assert metrics.within_bounds("int8", Figures(cosine_min=0.999, top1_agreement=0.95)) == []
    assert metrics.within_bounds("int8", Figures(cosine_min=0.99, top1_agreement=0.8)) == [
        "cosine_min 0.99 < 0.995", "top1_agreement 0.8 < 0.9"]
    assert metrics.within_bounds("fp16", Figures(cosine_min=0.99995, top1_agreement=0.9)) == [
        "top1_agreement 0.9 < 1"]
    assert metrics.within_bounds("bf16", Figures(cosine_min=float("nan"), top1_agreement=1.0)) == [
        "cosine_min nan < 0.999"]


# --- a real run, its report and its schema -------------------------------------------------

def _config(exported: Path, **kw: Any) -> bench.BenchConfig:
    base: dict[str, Any] = {"backends": ("ort",), "precisions": ("fp32", "int8"), "batches": (1, 2),
                            "artifacts": exported, "limit": 4, "warmup": 0, "iters": 2}
    return bench.BenchConfig(**(base | kw))


@pytest.mark.slow
def test_report_schema_and_files(exported_copy: Path, tmp_path: Path) -> None:
    rep = bench.run(_config(exported_copy))
    rows = {(r.backend, r.precision): r for r in rep.results}
    assert set(rows) == {("torch", "fp32"), ("ort", "fp32"), ("ort", "int8")}
    assert all(r.ok and set(r.latency) == {"1", "2"} for r in rows.values())
    assert rows["torch", "fp32"].speedup["2"] == pytest.approx(1.0)
    ort32 = rows["ort", "fp32"].fidelity
    assert ort32 is not None and ort32.max_abs <= 1e-4 and ort32.passed
    assert (rows["ort", "fp32"].batch_consistency_max_abs or 0) <= 1e-5
    for (backend, precision), r in rows.items():  # the floor: the row's own GEMM limit, measured now
        f = r.floor
        assert f is not None, (backend, precision)
        assert f.limit_shape == (1576, 384, 1536) and f.gemm_gmac_per_s > 0, (backend, precision)
        # every multiply-add: the matrix products and the convolutions
        assert f.gemm_macs_per_image and f.conv_macs_per_image
        assert f.macs_per_image == f.gemm_macs_per_image + f.conv_macs_per_image
        assert f.conv_macs_per_image > 0.03 * f.gemm_macs_per_image
        for b in ("1", "2"):  # the model's GEMM work at that rate, and the row's median over it
            assert f.ms[b] == pytest.approx(f.macs_per_image * int(b) / f.gemm_gmac_per_s / 1e6)
            assert f.times[b] == pytest.approx(r.latency[b].median_ms / f.ms[b])
            assert f.times[b] > 1, (backend, precision, b)  # no inference beats its GEMMs at full speed
    drift = rows["ort", "int8"].drift
    assert [d.point for d in drift][:2] == ["stage 0 block 0", "stage 1 block 0"]
    assert drift[-1].point == "logits" and len(drift) == sum(cvt_ref.VARIANTS["cvt-13"].depths) + 1
    assert rows["ort", "int8"].drift_located in [d.point for d in drift]
    written = report.write_all(rep, tmp_path / "out")
    assert [p.name for p in written] == ["report.json", "report.md", "throughput.png", "tradeoff.png",
                                         "drift.png"]
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report.validate(data) == [] and BenchReport.from_json(data) == rep  # the file is the record
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| ort | int8 |" in md and "## Fidelity vs PyTorch FP32" in md
    floor = rows["ort", "int8"].floor
    assert "No floor for" not in md  # every row here measured its limit
    # a row whose runner measures no limit (TensorRT's) says so
    unmeasured = dataclasses.replace(rep, results=tuple(
        dataclasses.replace(r, floor=None) if r.precision == "int8" else r for r in rep.results))
    assert "No floor for ort int8: their runner measures no GEMM limit" in render_report.markdown(unmeasured)
    assert "## Distance from the GEMM floor" in md and (
        f"| ort | int8 | {floor.gemm_gmac_per_s:.1f} | {floor.ms['1']:.1f} | {floor.times['1']:.2f}×" in md)
    for png in written[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    broken = json.loads(json.dumps(data))
    broken["results"][0]["latency"] = {}
    assert report.validate(broken) == ["results[0] (torch fp32) is ok but has no latency"]
    del broken["results"][0]["fidelity"]["cosine_min"]
    assert report.validate(broken) == ["cvt-bench report.results[0].fidelity: missing field 'cosine_min'"]
    newer = report.validate({**data, "schema": "cvt-bench/2"})
    assert newer[0].startswith("cvt-bench report: written by a newer")


@pytest.mark.slow
def test_accuracy_from_an_imagefolder(exported: Path, photos: list[Path], reference: np.ndarray,
                                      tmp_path: Path) -> None:
    """Class folders named after the reference's own predictions: three photos in the folder of
    their top-1 class, one in the folder of its *least* likely class, so the exact accuracy is
    known without the code under test (top-1 3/4, top-5 3/4)."""
    labels = cvt_ref.imagenet_labels()
    order = np.argsort(-reference.astype(np.float64), axis=1)
    picks = [(0, order[0, 0]), (1, order[1, 0]), (2, order[2, 0]), (3, order[3, -1])]
    for row, cls in picks:
        folder = tmp_path / "named" / labels[cls]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[row], folder / photos[row].name)
    (tmp_path / "named" / ".DS_Store").write_bytes(b"\0\1")  # hidden files are not images
    copy = copy_artifacts(exported, tmp_path)
    rep = bench.run(_config(copy, dataset=tmp_path / "named", precisions=("fp32",)))
    assert rep.inputs.labelled and rep.inputs.images == 4
    for r in rep.results:
        acc = r.accuracy
        assert acc is not None and (acc.top1, acc.top5, acc.n) == (0.75, 0.75, 4), r.backend
        lo, hi = acc.top1_ci or (0, 0)  # Wilson's 95% interval for 3 of 4: 0.3006 .. 0.9544
        assert (round(lo, 4), round(hi, 4)) == (0.3006, 0.9544)
    # synset folders (the ImageNet layout) give the same classes
    (tmp_path / "synsets").mkdir()
    synset = cvt_ref.imagenet_synsets()[order[0, 0]]
    (tmp_path / "synsets" / synset).mkdir()
    shutil.copy(photos[0], tmp_path / "synsets" / synset / photos[0].name)
    rep = bench.run(_config(exported, dataset=tmp_path / "synsets", precisions=("fp32",), backends=()))
    acc = rep.results[0].accuracy
    assert acc is not None and (acc.top1, acc.top5) == (1.0, 1.0)
    # folders that are not the model's classes: no accuracy, and the report says why
    (tmp_path / "other" / "my-cats").mkdir(parents=True)
    shutil.copy(photos[0], tmp_path / "other" / "my-cats" / photos[0].name)
    rep = bench.run(_config(exported, dataset=tmp_path / "other", precisions=("fp32",), backends=()))
    assert not rep.inputs.labelled and rep.results[0].accuracy is None
    assert "my-cats" in rep.inputs.accuracy_note


def test_a_perturbed_runner_is_flagged(exported_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_get = bench.get_backend
    monkeypatch.setattr(bench, "get_backend", lambda name: PerturbedBackend(real_get(name), 0.5)
                        if real_get(name).name == "ort" else real_get(name))
    rep = bench.run(_config(exported_copy, precisions=("fp32",)))
    ort = next(r for r in rep.results if r.backend == "ort")
    assert ort.fidelity is not None and not ort.fidelity.passed
    assert ort.fidelity.max_abs > 0.5 and ort.fidelity.cosine_min < 0.99
    assert any(b.startswith("max_abs") for b in ort.fidelity.broken)
    assert "**NO**" in render_report.markdown(rep)
    # (the torch row is the reference itself: judging it here could not fail, so it is not)
    # located: every block output is clean, the loss appears at the logits
    assert ort.drift_located == "logits"
    assert all(d.cosine_min > 0.99999 for d in ort.drift[:-1])


@pytest.mark.slow
def test_a_fault_inside_the_network_is_located(exported: Path, tmp_path: Path) -> None:
    """A damaged weight in stage 2, block 3 of the ONNX file (as a bad export would leave)."""
    import onnx
    from onnx import numpy_helper

    from cvt_ref.source import sha256_file

    folder = tmp_path / "damaged"
    shutil.copytree(exported, folder)
    proto = onnx.load(str(folder / "model.onnx"))
    target = "stages.2.blocks.3.attn.conv_proj_v.conv.weight"
    tensor = next(t for t in proto.graph.initializer if t.name == target)
    tensor.CopyFrom(numpy_helper.from_array(1.5 * numpy_helper.to_array(tensor), target))
    onnx.save(proto, str(folder / "model.onnx"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {"model.onnx": manifest["files"]["model.onnx"]}
    manifest["files"]["model.onnx"]["sha256"] = sha256_file(folder / "model.onnx")
    manifest.pop("openvino", None)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rep = bench.run(_config(folder, backends=("ort", "openvino"), precisions=("fp32",)))
    for row in rep.results[1:]:
        assert row.fidelity is not None and not row.fidelity.passed, row.backend
        assert row.drift_located == "stage 2 block 3", (row.backend, row.drift)
        before = next(d for d in row.drift if d.point == "stage 2 block 2")
        assert before.cosine_min > 0.99999


@pytest.mark.heavy
def test_one_backend_alone_runs_what_it_has_a_path_for(exported: Path, tmp_path: Path) -> None:
    """`cvt-bench --backend ort` (every precision by default) ran nothing and said "error: ort bf16:
    ort has no bf16 path": the default list holds precisions a backend has no path for. Those are
    listed as not run; one asked for by name is still refused."""
    folder = copy_artifacts(exported, tmp_path)
    quick = ["--artifacts", str(folder), "--batch", "1", "--iters", "1", "--warmup", "0", "--limit", "4"]
    done = run_cli("cvt-bench", "--backend", "ort", *quick, "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "r" / "report.json").read_text())["results"]
    rows = {(r["backend"], r["precision"]): r for r in results}
    assert all(rows["ort", p]["status"] == "ok" for p in ("fp32", "fp16", "int8"))
    assert rows["ort", "bf16"]["status"] == "skipped" and "not run: ort bf16" in done.stdout
    assert_user_error(run_cli("cvt-bench", "--backend", "ort", "--precision", "bf16", *quick,
                              "--out", str(tmp_path / "r2")), "ort bf16: ort has no bf16 path")


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.slow
def test_bad_inputs_give_one_line_and_exit_2(exported: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(exported, corrupt)
    with (corrupt / "model.int8.onnx").open("r+b") as f:
        f.seek(500)
        f.write(b"garbage!")
    art = ["--artifacts", str(copy_artifacts(exported, tmp_path)), "--limit", "2", "--iters", "1",
           "--warmup", "0", "--out", str(tmp_path / "rep")]
    cases = [
        (["--backend", "tvm", *art], "unknown backend 'tvm'"),
        (["--backend", "ort", "--dataset", str(empty), *art], "holds no images"),
        (["--backend", "ort", "--batch", "0", *art], "--batch 0"),
        (["--backend", "ort", "--precision", "int8", "--artifacts", str(corrupt), "--iters", "1",
          "--out", str(tmp_path / "rep")], "changed since export"),
        (["--backend", "tensorrt", "--precision", "fp16", *art], "tensorrt"),
    ]
    if get_backend("tensorrt").available()[0]:
        cases.pop()
    for args, fragment in cases:
        assert_user_error(run_cli("cvt-bench", *args), fragment)
    assert not (tmp_path / "rep").exists()


@pytest.mark.heavy
def test_progress_gives_no_time_left_across_unlike_rows_and_names_a_skipped_backend(
        exported: Path, tmp_path: Path) -> None:
    """Rows differ tenfold in cost: an estimate from them swung 2-4x off, so none is given; a
    backend that is not installed, or a precision a backend has no path for, is "skipping ...
    (why)", never "running"."""
    result = run_cli("cvt-bench", "--artifacts", str(exported), "--backend", "all",
                     "--precision", "fp32,int8", "--iters", "1", "--warmup", "0", "--limit", "4",
                     "--batch", "1", "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stderr.splitlines() if ", row " in line]
    assert rows and not [line for line in rows if "left" in line], rows
    assert any("running torch fp32, row 1 of" in line for line in rows)
    trt_ok, why = get_backend("trt").available()
    if not trt_ok:
        assert any(f"skipping tensorrt fp32 ({why})" in line for line in rows), rows
        assert not any("running tensorrt" in line for line in rows)
    assert "int8" not in get_backend("torch").precisions  # the oracle: the backend's own list
    assert any("skipping torch int8 (torch has no int8 path)" in line for line in rows), rows
    assert not any("running torch int8" in line for line in rows)
