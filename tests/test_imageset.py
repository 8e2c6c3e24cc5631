"""Image roles (calibration / selection / confirmation), identity by decoded content, the
intervals every decision states, and the recommendation's ties.

Oracles: copies and re-encodings made here with PIL (not through the code under test), the
Wilson interval's textbook values, hand-built report rows whose intervals overlap or separate.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import cvt_ref
from cvt_export import calibration, imageset, metrics, records
from cvt_export.artifacts import ArtifactFolder
from cvt_export.harness import bench, recommend
from cvt_export.render.recommendation import markdown as render_recommendation
from cvt_ref.errors import CvtError


def reencode(src: Path, dst: Path, quality: int = 55, scale: float = 0.6) -> Path:
    """A re-encoded, resized copy: other bytes, other pixels, the same photograph."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        im = im.resize((max(16, round(im.width * scale)), max(16, round(im.height * scale))))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
    dst.write_bytes(buf.getvalue())
    return dst


def test_bundled_evaluation_set_is_large_and_its_photographs_distinct() -> None:
    sources = imageset.bundled_sources()
    assert len(sources) == 17 and len({p.name for p in sources}) == 17
    items = imageset.bundled_items()
    assert len(items) == 17 * len(imageset.VIEWS) >= 150
    prints = [imageset.fingerprint(cvt_ref.load_image(p)) for p in sources]
    nearest = min(imageset.distance(a, b) for a, b in itertools.combinations(prints, 2))
    assert nearest > imageset.SAME_BITS  # no two bundled photographs are taken for one
    sizes = [im.size for im in (it.image() for it in items[:len(imageset.VIEWS)])]
    assert len(set(sizes)) > 2  # views really differ (crops, half scale)


@pytest.mark.parametrize("quality,scale", [(95, 1.0), (55, 0.6), (40, 0.3)])
def test_a_reencoded_copy_is_the_same_image(tmp_path: Path, photos: list[Path], quality: int,
                                            scale: float) -> None:
    for p in photos:
        copy = reencode(p, tmp_path / f"{p.stem}-copy.jpg", quality, scale)
        assert copy.read_bytes() != p.read_bytes()
        a = imageset.fingerprint(cvt_ref.load_image(p))
        b = imageset.fingerprint(cvt_ref.load_image(copy))
        assert imageset.distance(a, b) <= imageset.SAME_BITS, (p.name, imageset.distance(a, b))


def test_views_of_a_source_never_straddle_roles() -> None:
    items = imageset.bundled_items()
    calib = [imageset.fingerprint(cvt_ref.load_image(p)) for p in imageset.default_calibration_sources()]
    roles = imageset.roles(items, calib)
    by_group: dict[str, set[str]] = {}
    for it, r in zip(items, roles, strict=True):
        by_group.setdefault(it.group, set()).add(r)
    assert all(len(r) == 1 for r in by_group.values())
    sizes = imageset.sizes(roles, items)
    assert sizes["selection"].inputs + sizes["confirmation"].inputs > 100
    assert sizes["calibration"].sources == 6 and sizes["selection"].sources >= 5
    assert sizes["confirmation"].sources >= 5


def test_a_reencoded_calibration_image_is_kept_out_of_selection_and_confirmation(
        tmp_path: Path, photos: list[Path]) -> None:
    calib_dir = tmp_path / "calib"
    calib_dir.mkdir()
    chosen = [photos[1], photos[4]]  # not among the bundled set's own calibration sources
    for p in chosen:
        reencode(p, calib_dir / f"renamed-{p.stem}.jpg")
    calib, _ = calibration.calibration_set(calib_dir)
    assert calib.distinct == 2 and len(calib.fingerprints) == 2
    items = imageset.bundled_items()
    roles = imageset.roles(items, calib.fingerprints)
    for it, r in zip(items, roles, strict=True):
        assert (r == "calibration") == (it.path.name in {p.name for p in chosen}), (it.name, r)
    # and from a user's --dataset holding the original files beside other photos
    data = tmp_path / "data"
    data.mkdir()
    for p in photos:
        shutil.copy(p, data / p.name)
    users = imageset.file_items(sorted(data.iterdir()))
    roles = imageset.roles(users, calib.fingerprints)
    assert {it.path.name for it, r in zip(users, roles, strict=True) if r == "calibration"} == \
        {p.name for p in chosen}
    assert {"selection", "confirmation"} <= set(roles)


def test_copies_in_a_users_folder_share_a_group(tmp_path: Path, photos: list[Path]) -> None:
    shutil.copy(photos[0], tmp_path / "a.jpg")
    reencode(photos[0], tmp_path / "b.jpg")
    shutil.copy(photos[2], tmp_path / "c.jpg")
    items = imageset.file_items(sorted(tmp_path.iterdir()))
    assert items[0].group == items[1].group != items[2].group
    roles = imageset.roles(items, [])
    assert roles[0] == roles[1] and set(roles) == {"selection", "confirmation"}


def test_few_calibration_images_warn(photos: list[Path], tmp_path: Path) -> None:
    calib, _ = calibration.calibration_set(None)
    assert calib.distinct == 6 and calib.source == "bundled photos"
    warning = calib.few_warning()
    assert warning is not None and "6 distinct images" in warning and "300" in warning
    many = tmp_path / "many"
    many.mkdir()
    rng = np.random.default_rng(0)
    for i in range(imageset.MIN_CALIBRATION):  # distinct noise images: no warning
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(many / f"{i:02d}.png")
    calib, _ = calibration.calibration_set(many)
    assert calib.distinct == imageset.MIN_CALIBRATION and calib.few_warning() is None


def test_bench_roles_follow_the_folders_calibration(exported: Path, split: tuple[Path, list[Path]]) -> None:
    folder = ArtifactFolder.open(exported)  # calibrated on copies of half the photos in another folder
    recorded = folder.calibration_images
    assert recorded.fingerprints and recorded.distinct == len(list(split[0].iterdir()))
    inputs = bench.load_inputs(None, None, folder.variant)
    split_roles = bench.roles(inputs, folder)
    calibrated = {it.path.name for it, r in zip(inputs.items, split_roles.of, strict=True)
                  if r == "calibration"}
    assert calibrated == {p.name for p in split[0].iterdir()}
    assert split_roles.sizes["selection"].inputs and split_roles.sizes["confirmation"].inputs
    calib = ArtifactFolder.open(exported).calibration
    assert calib is not None and "fewer than" in str(calib.warning)


# --- intervals ---------------------------------------------------------------------------------

def test_wilson_interval_matches_the_textbook() -> None:
    lo, hi = metrics.wilson(8, 10)  # Wilson (1927) / Newcombe (1998): 0.4902 .. 0.9433
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = metrics.wilson(5, 5)
    assert hi == 1.0 and lo == pytest.approx(0.5655, abs=1e-4)
    fid = metrics.fidelity(np.eye(20), np.eye(20))
    assert fid.n == 20 and fid.top1_agreement_ci[1] == 1.0 and fid.top1_agreement_ci[0] < 0.9


def test_median_interval_and_modes() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(10.0, 1.0, 400)
    lo, hi = metrics.median_interval(x)
    assert lo < np.median(x) < hi and hi - lo < 0.5
    covered = sum(lo <= 10.0 <= hi for lo, hi in (metrics.median_interval(rng.normal(10, 1, 50))
                                                  for _ in range(400)))
    assert 0.90 <= covered / 400 <= 0.99  # about 95% coverage
    assert metrics.modes(x) is None
    two = np.r_[rng.normal(30, 0.5, 20), rng.normal(50, 0.5, 20)]
    low, high = metrics.modes(two) or (0, 0)
    assert abs(low - 30) < 1 and abs(high - 50) < 1


def _row(backend: str, precision: str, ms: float, ci: tuple[float, float], cosine: float) -> records.Row:
    fid = records.RoleFidelity(cosine_min=cosine, top1_agreement=1.0, max_abs=0.1)
    full = records.Fidelity(max_abs=0.1, mean_abs=0.0, cosine_min=cosine, cosine_mean=cosine,
                            top1_agreement=1.0, top5_agreement=1.0, kl_mean=0.0, kl_max=0.0,
                            worst_image="x", worst_cosine=cosine, selection=fid,
                            confirmation=dataclasses.replace(fid, images=50))
    return records.Row(backend, precision, executed=precision, fidelity=full,
                       latency={b: records.LatencyStats(1, ms, ms, ms, ms, ms, 0.0, int(b) * 1000 / ms, ci)
                                for b in ("1", "8")})


def _report(*rows: records.Row) -> records.BenchReport:
    model = records.ModelSummary("cvt-13", records.Weights("random:0"), "a", "0" * 64)
    return records.BenchReport(created="now", machine=records.Machine("cpu", 2, ()), model=model,
                               inputs=records.Inputs("photos", 170, False, held_out_note="roles"),
                               settings=records.BenchSettings(), baseline=records.Baseline("torch", "fp32"),
                               results=rows)


def test_the_recommendation_names_a_tie_when_intervals_overlap() -> None:
    int8 = _row("ort", "int8", 15.6, (14.0, 17.0), 0.9990)
    ov = _row("openvino", "int8", 14.4, (13.5, 15.0), 0.9980)  # faster median, overlapping interval
    rec = recommend.recommend(_report(int8, ov))
    pick = rec.objectives["latency-b1"]
    assert pick is not None and (pick.backend, pick.precision) == ("ort", "int8")  # the more faithful
    assert pick.tied_with == ("openvino int8",) and "tied" in pick.why
    assert any("tied with openvino int8" in line for line in render_recommendation(rec))


def test_a_row_slower_than_another_beyond_the_noise_is_not_tied_through_a_wide_one() -> None:
    """Overlap is not transitive: the demo's report had ORT FP16 [92.1, 94.1] ms beating ORT FP32
    [98.6, 102.5] beyond the noise while both overlapped OpenVINO FP32's bimodal interval; FP32,
    the most faithful, was named. A row another row beats is never the pick."""
    fp32 = _row("ort", "fp32", 99.7, (98.6, 102.5), 1.0)
    fp16 = _row("ort", "fp16", 93.4, (92.1, 94.1), 0.999999)
    wide = _row("openvino", "fp32", 88.0, (75.4, 138.0), 0.9999995)
    budget = [metrics.parse_budget("cosine>=0.99")]
    pick = recommend.recommend(_report(fp32, fp16, wide), budget).objectives["latency-b1"]
    assert pick is not None and (pick.backend, pick.precision) == ("openvino", "fp32")  # more faithful
    assert pick.tied_with == ("ort fp16",)
    alone = recommend.recommend(_report(fp32, fp16), budget).objectives["latency-b1"]
    assert alone is not None and (alone.precision, alone.tied_with) == ("fp16", ())


def test_the_recommendation_holds_a_dynamic_row_to_its_bound_alone_and_in_a_batch() -> None:
    """A dynamic row is picked only when each image's answer alone and in a batch agree to the
    cosine the row is held to against the reference; the pick says by how much they differ."""
    fast = _row("ort", "int8dyn", 10.0, (9.5, 10.5), 0.9996)
    slow = _row("ort", "int8", 20.0, (19.5, 20.5), 0.999)
    steady_row = dataclasses.replace(fast, batch_consistency_cosine_min=0.9997)
    steady = recommend.recommend(_report(steady_row, slow))
    pick = steady.objectives["latency-b1"]
    assert pick is not None and pick.precision == "int8dyn" and "agree to cosine 0.999700" in pick.why
    moving_row = dataclasses.replace(fast, batch_consistency_cosine_min=0.99)
    moving = recommend.recommend(_report(moving_row, slow))
    pick = moving.objectives["latency-b1"]
    assert pick is not None and pick.precision == "int8"
    assert [p.why for p in pick.passed_over] == [
        "batch dependence: cosine 0.99 between an image alone and in a batch < 0.998"]
    budget = [metrics.parse_budget("cosine>=0.98")]  # a --budget sets the cosine both are held to
    pick = recommend.recommend(_report(moving_row, slow), budget).objectives["latency-b1"]
    assert pick is not None and pick.precision == "int8dyn"


def test_the_recommendation_calls_a_row_faster_when_intervals_separate() -> None:
    int8 = _row("ort", "int8", 15.6, (15.2, 16.0), 0.9990)
    ov = _row("openvino", "int8", 14.4, (14.1, 14.8), 0.9980)
    pick = recommend.recommend(_report(int8, ov)).objectives["latency-b1"]
    assert pick is not None and (pick.backend, pick.tied_with) == ("openvino", ())
    assert "beyond the noise" in pick.why and pick.confirmation and pick.confirmation.images == 50


def test_an_objective_no_row_serves_says_why(tmp_path: Path) -> None:
    """Three causes, told apart: the batch size was not timed, nothing deployable ran, or the rows
    that ran are outside the budget (named with the cosine that decided). The reason travels in
    recommendation.json to `--from-recommendation`, as one line."""
    ort8 = _row("ort", "int8", 15.6, (15.2, 16.0), 0.9922)
    ort8 = dataclasses.replace(ort8, latency={"1": ort8.latency["1"]})
    rec = recommend.recommend(_report(ort8))
    assert rec.objectives == {"latency-b1": None, "throughput-b8": None}
    assert rec.unmet["throughput-b8"] == "batch 8 was not timed (this run: --batch 1; add 8 to time it)"
    figures = SimpleNamespace(cosine_min=0.9922, top1_agreement=1.0, max_abs=0.1)
    assert rec.unmet["latency-b1"] == ("no row timed at batch 1 is within the budget: ort int8 "
                                       f"({', '.join(metrics.within_bounds('int8', figures))})")
    assert "cosine_min 0.9922 < " in rec.unmet["latency-b1"]  # INT8's bound is above 0.9922
    budget = [metrics.parse_budget("cosine>=0.995")]
    assert recommend.recommend(_report(ort8), budget).unmet["latency-b1"] == (
        "no row timed at batch 1 is within the budget: ort int8 (misses cosine>=0.995)")
    assert "- throughput-b8: batch 8 was not timed" in "\n".join(render_recommendation(rec))
    torch_only = _row("torch", "fp32", 70.0, (69.0, 71.0), 1.0)
    assert recommend.recommend(_report(torch_only)).unmet["latency-b1"].startswith("no deployable row")
    served = recommend.recommend(_report(_row("ort", "fp32", 50.0, (49.0, 51.0), 1.0)), budget)
    assert served.unmet == {} and served.objectives["latency-b1"] is not None
    path = tmp_path / "recommendation.json"
    path.write_text(json.dumps({**rec.to_json(), "unmet": {"throughput-b8": "crafted\nsecond line"}}))
    with pytest.raises(CvtError, match=r"no configuration for throughput-b8: crafted$"):
        recommend.read(path, "throughput-b8")
    path.write_text(json.dumps(rec.to_json()))
    with pytest.raises(CvtError, match="batch 8 was not timed"):
        recommend.read(path, "throughput-b8")
