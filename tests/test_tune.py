"""Budgets, tune's per-block units and search, and the recommendation cvt-bench writes.

Oracles: the PyTorch model on held-out photos (run here, not through tune), ONNX Runtime run
directly on the written file, and the report's own rows for the recommendation (recomputed
here with bounds written in this file).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace as Figures  # figures by name, as a fidelity record has them

import numpy as np
import onnx
import pytest
import torch
from conftest import copy_artifacts
from PIL import Image, ImageEnhance

import cvt_ref
from cvt_export import imageset, metrics
from cvt_export.artifacts import ArtifactFolder
from cvt_export.derive import QUANTIZED_OPS, quantized_nodes, tensorrt_qdq_problems
from cvt_export.harness import recommend
from cvt_export.records import BenchReport, TuneDecisions, as_json
from cvt_export.render.recommendation import markdown as render_recommendation
from cvt_export.tune import block_nodes
from helpers import BIN, assert_user_error, cosine_rows, run_cli


def test_budgets_parse_and_judge() -> None:
    b = metrics.parse_budget("cosine>=0.999")
    assert (b.metric, b.op, b.value) == ("cosine", ">=", 0.999)
    assert b.holds(Figures(cosine_min=0.9995)) and not b.holds(Figures(cosine_min=0.998))
    assert not b.holds(Figures(cosine_min=float("nan")))
    drop = metrics.parse_budget("top1-drop <= 0.5")
    assert drop.holds(Figures(top1_drop=0.4)) and not drop.holds(Figures(top1_drop=1.0))
    assert not drop.holds(Figures())  # no labels: the bound cannot hold
    for bad in ("cosine>0.9", "latency<=3", "cosine<=0.9", "top1-drop>=1", "cosine>=x"):
        with pytest.raises(ValueError):
            metrics.parse_budget(bad)


def test_blocks_partition_the_quantizable_nodes(exported: Path) -> None:
    proto = onnx.load(str(exported / "model.onnx"), load_external_data=False)
    units = block_nodes(proto, ArtifactFolder.open(exported).probes)
    assert list(units) == [f"stage {s} block {b}" for s, d in enumerate((1, 2, 10)) for b in range(d)]
    names = [n for nodes in units.values() for n in nodes]
    assert len(names) == len(set(names))  # no node in two blocks
    everything = {n.name for n in proto.graph.node if n.op_type in QUANTIZED_OPS}
    head = {n.name for n in proto.graph.node if "logits" in n.output}
    assert everything - set(names) <= head  # only the classifier is outside the blocks
    # each block: 3 patch-embedding convs in total, q/k/v depthwise (3), q/k/v/out + 2 MLP + 2
    # attention MatMuls (8) per block
    assert all(len(nodes) in (11, 12) for nodes in units.values()), {k: len(v) for k, v in units.items()}


def test_tune_refuses_bad_input(exported_copy: Path, tmp_path: Path) -> None:
    folder = str(exported_copy)
    assert_user_error(run_cli("cvt-export", "tune", "--artifacts", folder, "--budget", "cos>=1"), "--budget")
    assert_user_error(run_cli("cvt-export", "tune", "--artifacts", str(exported_copy), "--backend", "torch",
                              "--budget", "cosine>=0.99"), "tune drives")
    assert_user_error(run_cli("cvt-export", "tune", "--artifacts", str(exported_copy),
                              "--budget", "top1-drop<=0.5"), "needs --dataset")
    assert_user_error(run_cli("cvt-export", "tune", "--artifacts", str(tmp_path / "nothing"),
                              "--budget", "cosine>=0.99"), "no such artifact folder")
    assert not (exported_copy / "model.mixed.onnx").exists()
    assert_user_error(run_cli("cvt-export", "triton", "--from-recommendation", str(tmp_path / "r.json"),
                              "--out", str(tmp_path / "repo")), "cannot read")


def unseen_images(sources: list[Path]) -> list[Image.Image]:
    """Images no role of the tool ever held: transforms the evaluation set does not make
    (a rotation, an off-centre crop, a darker copy) of the given photographs, and blends of two."""
    out: list[Image.Image] = []
    opened = [cvt_ref.load_image(p).convert("RGB") for p in sources]
    for im in opened:
        w, h = im.size
        out.append(im.rotate(10, resample=Image.Resampling.BILINEAR))
        out.append(im.crop((round(0.25 * w), round(0.3 * h), round(0.8 * w), round(0.85 * h))))
        out.append(ImageEnhance.Brightness(im).enhance(0.75))
    for a, b in itertools.pairwise(opened):
        out.append(Image.blend(a.resize((256, 256)), b.resize((256, 256)), 0.5))
    return out


@pytest.mark.slow
def test_tune_meets_the_budget_on_the_stressed_model(
        stressed: Path, tmp_path: Path, split: tuple[Path, list[Path]], model: cvt_ref.CvT) -> None:
    folder = copy_artifacts(stressed, tmp_path)
    budget = 0.9995
    done = run_cli("cvt-export", "tune", "--artifacts", str(folder), "--backend", "ort",  # 100 of the
                   "--budget", f"cosine>={budget}", "--seconds", "1", "--margin", "0.2",  # 170 inputs
                   "--limit", "100", timeout=1800)
    assert done.returncode == 0, done.stderr
    assert "mixed" in done.stdout
    files = ArtifactFolder.open(folder).files()
    assert "model.mixed.onnx" in files, done.stdout  # INT8 alone misses this budget
    decided = files["model.mixed.onnx"].tune
    assert isinstance(decided, TuneDecisions)
    assert decided.budget == (f"cosine>={budget:g}",) and decided.search.startswith("greedy")
    assert decided.margin == 0.2
    roles = decided.roles
    assert roles["selection"].inputs >= 25 and roles["confirmation"].inputs >= 25
    assert roles["calibration"].sources == len(list(split[0].iterdir()))
    accepted = [c for c in decided.configs if c.precision == "mixed" and c.within_budget]
    assert accepted and all(c.fidelity.cosine_min >= budget + 0.2 * (1 - budget) and
                            c.confirmation.cosine_min >= budget + 0.2 * (1 - budget) for c in accepted)
    written = accepted[-1]  # the last accepted candidate is the file
    assert 0 < len(written.float_blocks) < 13
    assert len(decided.sensitivity) == 13
    assert json.loads((folder / "tune.json").read_text()) == as_json(decided)  # the same decisions
    assert not list(folder.glob(".tune*")) and not list(folder.glob(".*.tmp"))
    assert (folder / "tune.md").read_text().count("|") > 20
    # Independent: ONNX Runtime on the written file vs PyTorch on images the tool never saw
    import onnxruntime as ort

    calibrated = {p.name for p in split[0].iterdir()}
    others = [p for p in imageset.bundled_sources() if p.name not in calibrated]
    unseen = cvt_ref.preprocess_batch(unseen_images(others), "cvt-13")
    with torch.inference_mode():
        ref = model(unseen).numpy()
    so = ort.SessionOptions()
    so.add_session_config_entry("session.x64quantprecision", "1")  # exact INT8 on CPUs without VNNI
    session = ort.InferenceSession(str(folder / "model.mixed.onnx"), so, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: unseen.numpy()})[0]
    assert len(got) >= 40
    assert cosine_rows(ref, got).min() >= budget, (cosine_rows(ref, got).min(), len(got))
    mixed = onnx.load(str(folder / "model.mixed.onnx"))
    assert not tensorrt_qdq_problems(mixed)
    full = quantized_nodes(onnx.load(str(folder / "model.int8.onnx")))
    assert sum(quantized_nodes(mixed).values()) < sum(full.values())  # the kept blocks are float
    # the tuned row beside the others in cvt-bench's report
    report = tmp_path / "r.json"
    bench = run_cli("cvt-bench", "--backend", "ort", "--precision", "int8,mixed", "--artifacts",
                    str(folder), "--batch", "8", "--iters", "2", "--warmup", "1", "--limit", "40",
                    "--json", str(report))
    assert bench.returncode == 0, bench.stderr
    rows = {r["precision"]: r for r in json.loads(report.read_text())["results"] if r["backend"] == "ort"}
    assert rows["mixed"]["status"] == "ok"
    assert rows["mixed"]["fidelity"]["held_out"]["cosine_min"] >= budget
    # INT8 re-calibrated (3 images instead of 6): the mix made from the old INT8 file goes, said so
    again = run_cli("cvt-export", "onnx", "--weights", "random:0", "--outliers", "4", "--precision",
                    "fp32,int8", "--calib", str(split[0]), "--calib-size", "3", "--smooth", "0.5",
                    "--out", str(folder))
    assert again.returncode == 0, again.stderr
    assert "model.mixed.onnx removed: it was made from another INT8 file" in again.stderr
    assert "model.mixed.onnx" not in ArtifactFolder.open(folder).files()
    assert not (folder / "model.mixed.onnx").exists()


def _wait_for(check: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 300
    while not check():
        assert process.poll() is None, f"tune ended before {what}"
        assert time.monotonic() < deadline, f"tune never reached {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_tune_killed_at_three_moments_leaves_nothing_that_verifies(stressed: Path, tmp_path: Path) -> None:
    """kill -9 at start-up, once its scratch exists, and once a candidate has run there: the folder
    still verifies, no scratch ever opens as an artifact folder, and a re-run works."""
    from cvt_export.artifacts import ArtifactError, ArtifactFolder

    folder = copy_artifacts(stressed, tmp_path)
    command = [str(BIN / "cvt-export"), "tune", "--artifacts", str(folder), "--backend", "ort",
               "--budget", "cosine>=0.9995", "--seconds", "0.5"]
    scratch = lambda: list(folder.glob(".tune-*"))  # noqa: E731
    moments = {
        "start-up": lambda: time.sleep(3) is None,
        "scratch made": lambda: bool(scratch()),
        "a candidate ran": lambda: any((s / "ort").is_dir() for s in scratch()),
    }
    for what, reached in moments.items():
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            _wait_for(reached, process, what)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        opened = ArtifactFolder.open(folder)
        assert all(opened.verify(p) for p in ("fp32", "int8")), what
        assert not opened.has("mixed"), what
        manifests = [p for p in folder.rglob("manifest.json") if p.parent != folder]
        assert manifests == [], (what, manifests)
        for left in scratch():
            with pytest.raises(ArtifactError):
                ArtifactFolder.open(left)
    done = run_cli("cvt-export", "tune", "--artifacts", str(folder), "--backend", "ort",
                   "--budget", "cosine>=0.9995", "--seconds", "0.5", "--limit", "40", timeout=1800)
    assert done.returncode == 0, done.stderr
    assert not scratch() and ArtifactFolder.open(folder).verify("mixed")


@pytest.mark.slow
def test_recommendation_is_the_fastest_row_within_bounds(exported: Path, tmp_path: Path) -> None:
    """End to end, on a real run: the recommendation cvt-bench writes is the one in its report,
    names a row that ran within its bounds on the selection images (the bounds table's verdict),
    states that row's figures, and is what Triton takes.
    The rule itself (fastest beyond the noise, ties to the most faithful, the budget, batch
    dependence) is held to hand-made rows whose answer is known: tests/test_imageset.py."""
    folder = copy_artifacts(exported, tmp_path)
    out = tmp_path / "report"
    bench = run_cli("cvt-bench", "--backend", "ort", "--precision", "fp32,int8",
                    "--artifacts", str(folder), "--batch", "1,8", "--iters", "3", "--warmup", "1",
                    "--limit", "40", "--out", str(out))
    assert bench.returncode == 0, bench.stderr
    report = json.loads((out / "report.json").read_text())
    rec = json.loads((out / "recommendation.json").read_text())
    for objective, pick in rec["objectives"].items():  # the folder, relative to the file, and its digest
        assert (out / pick.pop("artifacts")).resolve() == folder.resolve()
        assert pick.pop("onnx_sha256") == report["model"]["onnx_sha256"]
        report["recommendation"]["objectives"][objective].pop("artifacts")
    assert rec == report["recommendation"]
    ran = {(r["backend"], r["precision"]): r for r in report["results"] if r["status"] == "ok"}
    pick = rec["objectives"]
    for objective, batch in (("throughput-b8", "8"), ("latency-b1", "1")):
        got = pick[objective]
        row = ran[got["backend"], got["precision"]]
        assert got["backend"] != "torch"  # within its bounds on the selection images, which decide
        assert metrics.within_bounds(got["precision"], Figures(**row["fidelity"]["selection"])) == []
        assert got["confirmation"]["images"] == row["fidelity"]["confirmation"]["images"] > 0
        assert np.isclose(got["median_ms"], row["latency"][batch]["median_ms"])
    b8 = ran[pick["throughput-b8"]["backend"], pick["throughput-b8"]["precision"]]
    assert np.isclose(pick["throughput-b8"]["images_per_s"], b8["latency"]["8"]["images_per_s"])
    assert "## Recommendation" in (out / "report.md").read_text()
    # a budget nothing quantized can meet: the pick is an FP32 row
    strict = recommend.recommend(BenchReport.read(out / "report.json"),
                                 [metrics.parse_budget("cosine>=0.99999")])
    s8 = strict.objectives["throughput-b8"]
    assert s8 is not None and s8.precision == "fp32" and s8.median_ms is not None
    # the faster rows the budget kept out are named, each with what it misses
    faster_out = {(r["backend"], r["precision"]) for r in report["results"]
                  if r["status"] == "ok" and r["backend"] != "torch"
                  and r["latency"]["8"]["median_ms"] < s8.median_ms
                  and r["fidelity"]["selection"]["cosine_min"] < 0.99999}
    assert {(r.backend, r.precision) for r in s8.passed_over} == faster_out
    assert all(r.why == "misses cosine>=0.99999" for r in s8.passed_over)
    shown = "\n".join(render_recommendation(strict))
    assert all(f"{b} {p}" in shown for b, p in faster_out)
    assert not faster_out or "outside the budget" in shown
    # Triton takes the recommendation: the repository serves that backend and precision
    repo = tmp_path / "repo"
    made = run_cli("cvt-export", "triton", "--from-recommendation", str(out / "recommendation.json"),
                   "--out", str(repo))
    assert made.returncode == 0, made.stderr
    record = json.loads((repo / "cvt.cvt-repository.json").read_text())
    assert record["options"]["precision"] == b8["precision"]
    assert record["options"]["python_backend"] == b8["backend"]
