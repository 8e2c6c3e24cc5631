"""The accuracy pass (`cvt-bench accuracy`): streamed, resumable, cached, with paired statistics.

Oracles: ONNX Runtime sessions opened here on the folder's files (not the project's runner) for
what each row computes; labels from class folders this test names; scipy for the exact tests and
intervals; an uninterrupted run for what a killed-and-resumed one must end with.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import cvt_ref
from cvt_export import imageset, metrics
from cvt_export.artifacts import ArtifactFolder
from cvt_export.harness import accuracy as acc
from cvt_export.records import AccuracyReport, RecordError, ShardRecord
from cvt_ref.preprocess import preprocess_array
from helpers import BIN, assert_user_error, run_cli

CLASSES = (1, 2, 3, 993, 385)


# --- statistics against scipy --------------------------------------------------------------------

@pytest.mark.parametrize(("gained", "lost"), [(3, 7), (0, 7), (7, 0), (40, 60), (1, 1), (120, 80)])
def test_exact_mcnemar_matches_scipy(gained: int, lost: int) -> None:
    from scipy.stats import binomtest

    m = gained + lost
    expected = binomtest(gained, m, 0.5)
    assert metrics.mcnemar_p(gained, lost) == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-12)


def test_paired_accuracy_by_hand() -> None:
    """100 images: the reference right on 60; the row loses 9 of them and gains 1 elsewhere."""
    ref = np.zeros(100, dtype=bool)
    ref[:60] = True
    row = ref.copy()
    row[:9] = False
    row[80] = True
    p = metrics.paired_accuracy(ref, row)
    assert (p.lost, p.gained, p.n) == (9, 1, 100)
    assert p.difference == pytest.approx(-0.08)
    assert p.p_value == pytest.approx(22 / 1024)  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    assert not p.within_noise
    lo, hi = p.difference_ci
    assert lo < -0.08 < hi < 0
    same = metrics.paired_accuracy(ref, ref)
    assert same.within_noise and same.difference == 0 and same.difference_ci[0] < 0


def test_class_losses_by_hand() -> None:
    labels = np.asarray([0, 0, 0, 1, 1, 2, 2])
    ref = np.asarray([1, 1, 1, 1, 0, 1, 1], dtype=bool)
    row = np.asarray([0, 0, 1, 1, 1, 1, 0], dtype=bool)
    got = metrics.class_losses(labels, ref, row)
    assert [(c.label, c.net_lost) for c in got] == [(0, 2), (2, 1)]  # class 1: one lost, one gained


# --- records ----------------------------------------------------------------------------------------

def test_report_records_refuse_foreign_and_newer_files(tmp_path: Path) -> None:
    for data, words in (({"schema": "cvt-accuracy/2"}, "newer cvt-export"),
                        ({"schema": "cvt-bench/1"}, "not a cvt-bench accuracy report"),
                        ([1, 2], "expected a JSON object"),
                        ({"schema": "cvt-accuracy/1", "created": "x"}, "missing field")):
        with pytest.raises(RecordError, match=words):
            AccuracyReport.from_json(data)
    broken = tmp_path / "accuracy.json"
    broken.write_text('{"schema": ')
    with pytest.raises(RecordError, match=r"accuracy\.json: not a cvt-bench accuracy report"):
        AccuracyReport.read(broken)


# --- the pass against ONNX Runtime run here ---------------------------------------------------------

def make_folder(root: Path, n: int, size: tuple[int, int] | None = None) -> dict[str, int]:
    """n JPEGs in class-index folders (labels known here), views of the bundled photographs."""
    items = imageset.bundled_items()
    labels = {}
    for i in range(n):
        it = items[(7 * i) % len(items)]
        cls = CLASSES[i % len(CLASSES)]
        image = it.image().convert("RGB")
        if size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        name = f"{cls}/{i:04d}.jpg"
        (root / str(cls)).mkdir(parents=True, exist_ok=True)
        image.save(root / name, quality=90)
        labels[name] = cls
    return labels


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def test_pass_matches_onnx_runtime_run_here(exported: Path, tmp_path: Path) -> None:
    labels = make_folder(tmp_path / "val", 20)
    out = tmp_path / "acc"
    cfg = acc.PassConfig(tmp_path / "val", out, (("ort", "fp32"), ("ort", "int8")), batch=4, workers=1,
                         shard_size=6)
    rep = acc.run(cfg, ArtifactFolder.open(exported))
    names = sorted(labels)
    x = np.stack([preprocess_array(tmp_path / "val" / n, "cvt-13") for n in names])
    y = np.asarray([labels[n] for n in names])
    folder = ArtifactFolder.open(exported)
    oracle = {p: ort_logits(folder.onnx(p), x) for p in ("fp32", "int8")}
    assert rep.dataset.images == 20 and rep.dataset.labelled and rep.dataset.shards >= 2
    shards = acc.plan_shards(acc.list_entries(cfg, folder.variant, folder.labels)[0], cfg.shard_size)
    for precision, row in zip(("fp32", "int8"), rep.rows, strict=True):
        logits = oracle[precision]
        prob = np.exp(metrics.log_softmax(logits))
        got = acc._gather(out, shards, f"ort-{precision}", acc.open_rows(folder, cfg)[
            ("fp32", "int8").index(precision)].key)
        assert got is not None
        # the probabilities the pass stored at its top-5 classes are the oracle's at those classes
        np.testing.assert_allclose(got["prob5"], np.take_along_axis(prob, got["top5"], axis=1), atol=2e-5)
        margin = np.sort(logits, axis=1)[:, -1] - np.sort(logits, axis=1)[:, -2]
        clear = margin > 1e-3
        np.testing.assert_array_equal(got["top5"][clear, 0], logits.argmax(axis=1)[clear])
        top1 = float((logits.argmax(axis=1) == y).mean())
        top5 = float((np.argsort(-logits, axis=1)[:, :5] == y[:, None]).any(axis=1).mean())
        assert (row.top1, row.top5, row.n) == (pytest.approx(top1), pytest.approx(top5), 20)
        assert row.top1_ci == pytest.approx(tuple(metrics.wilson(top1 * 20, 20)))
        ref_right = oracle["fp32"].argmax(axis=1) == y
        p = row.paired
        assert p is not None
        assert (p.lost, p.gained) == (int((ref_right & (logits.argmax(1) != y)).sum()),
                                      int((~ref_right & (logits.argmax(1) == y)).sum()))
    assert rep.rows[0].cosine_min > 0.99999 and rep.rows[1].cosine_min < 0.9999
    t = rep.throughput  # every part's count is what it computed; its speed alone was measured
    assert t is not None and t.images == 20 and t.efficiency is not None and t.efficiency > 0
    assert {(p.name, p.images) for p in t.parts} == {("reference", 20), ("ort-fp32", 20), ("ort-int8", 20)}
    assert all(p.decoded_per_s and p.decoded_per_s > 0 for p in t.parts)
    # a second folder of the same model takes every reference output from the cache
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(exported, copy)
    again = acc.run(acc.PassConfig(tmp_path / "val", tmp_path / "acc2", (("ort", "fp32"),), batch=4,
                                   workers=0, reference_cache=out / "reference-cache.sqlite"),
                    ArtifactFolder.open(copy))
    assert again.dataset.reference_cached == 20 and again.dataset.shards_reused == 0
    assert again.rows[0].top1 == rep.rows[0].top1


def test_batches_run_across_shard_boundaries(exported: Path, tmp_path: Path) -> None:
    """Shards of about 2 images, batch 4: the reference sees 4, 4, 4, 1 (no short batch at every
    shard's end), every shard comes back whole, and its results are the ones it gets alone."""
    make_folder(tmp_path / "val", 13)
    folder = ArtifactFolder.open(exported)
    cfg = acc.PassConfig(tmp_path / "val", tmp_path / "acc", batch=4, workers=0, shard_size=2)
    shards = acc.plan_shards(acc.list_entries(cfg, folder.variant, folder.labels)[0], cfg.shard_size)
    assert len(shards) >= 4
    ev = acc.Evaluator(folder, [], batch=4, workers=0, threads=None)
    try:
        sizes: list[int] = []
        ev.model.register_forward_hook(lambda m, i, o: sizes.append(len(i[0])))
        streamed = list(ev.stream(shards, [], lambda d: {}, lambda d, x: None))
        assert sizes == [4, 4, 4, 1]
        assert [s.key for s, _ in streamed] == [s.key for s in shards]
        for shard, parts in streamed:
            alone = ev.evaluate(shard, [], lambda d: {}, lambda d, x: None)
            assert list(parts.arrays["images"]["name"]) == [e.name for e in shard.entries]
            got, want = parts.arrays["reference"], alone.arrays["reference"]
            np.testing.assert_array_equal(got["top5"], want["top5"])
            np.testing.assert_allclose(got["prob5"], want["prob5"], rtol=1e-4, atol=1e-6)
    finally:
        ev.close()


def test_reference_cache_never_serves_another_model_or_preprocessing(tmp_path: Path) -> None:
    a = cvt_ref.create_model("cvt-13", "random:0")
    b = cvt_ref.create_model("cvt-13", "random:0")
    v = cvt_ref.VARIANTS["cvt-13"]
    assert acc.model_key(a, v) == acc.model_key(b, v)
    import torch

    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert acc.model_key(a, v) != acc.model_key(b, v)
    assert acc.preprocessing_key(v) != acc.preprocessing_key(cvt_ref.VARIANTS["cvt-13-384"])
    one = acc.ReferenceCache(tmp_path / "c.sqlite", "scope-a", 10)
    one.put(["d1"], np.ones((1, 10), dtype=np.float32))
    wider = acc.ReferenceCache(tmp_path / "c.sqlite", "scope-a", 1000)
    assert list(one.get(["d1"])) == [0] and wider.get(["d1"]) == {}
    wider.close()
    other = acc.ReferenceCache(tmp_path / "c.sqlite", "scope-b", 10)
    assert other.get(["d1"]) == {}
    one.close()
    other.close()


def test_shards_are_content_defined() -> None:
    """Adding one file changes the key of the shard it falls in, and no other."""
    def entries(names: list[str]) -> list[acc.Entry]:
        return [acc.Entry(Path(n), n, "1:1", -1) for n in names]

    names = [f"img{i:05d}.jpg" for i in range(2000)]
    before = {s.key for s in acc.plan_shards(entries(names), 50)}
    after = {s.key for s in acc.plan_shards(entries(sorted([*names, "img01000b.jpg"])), 50)}
    assert len(before - after) == 1 and len(after - before) == 1
    sizes = [len(s.entries) for s in acc.plan_shards(entries(names), 50)]
    assert sum(sizes) == 2000 and max(sizes) <= 200


# --- a kill, a resume, memory ---------------------------------------------------------------------

def _children(pid: int) -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.add(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _figures(path: Path) -> list[tuple[object, ...]]:
    rep = AccuracyReport.read(path)
    return [(r.backend, r.precision, r.n, r.top1, r.top5, r.top1_agreement, r.cosine_min,
             r.paired.lost if r.paired else None, r.paired.gained if r.paired else None)
            for r in (rep.reference, *rep.rows)]


def _pass_until(args: list[str], ready: Callable[[], bool], timeout: float = 300,
                **popen: Any) -> tuple[subprocess.Popen[str], set[int]]:
    """`cvt-bench ARGS` started as its own process and watched until `ready()` holds (or it ended,
    or `timeout`): the process, still running, and the decode workers seen under it meanwhile."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen([str(BIN / "cvt-bench"), *args], text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, **popen)
    deadline = time.monotonic() + timeout
    workers: set[int] = set()
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        workers |= _children(proc.pid)
        time.sleep(0.05)
    return proc, workers | _children(proc.pid)


@pytest.mark.heavy
def test_a_killed_pass_resumes_to_the_same_figures(exported: Path, tmp_path: Path) -> None:
    make_folder(tmp_path / "val", 24)
    args = ["accuracy", "--dataset", str(tmp_path / "val"), "--artifacts", str(exported), "--backend", "ort",
            "--precision", "int8", "--batch", "2", "--shard-size", "4", "--workers", "1"]
    whole = run_cli("cvt-bench", *args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    proc, workers = _pass_until([*args, "--out", str(out)],
                                lambda: len(list(out.glob("shards/*/ort-int8.json"))) >= 2)
    with ArtifactFolder.open(exported).lock():  # mid-pass the folder is free: locked only to compile
        pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(out.glob("shards/*/ort-int8.json")))
    assert 2 <= finished < 6, "the kill should land mid-pass"
    # a half-written part: a file with no record, and a record whose file was damaged
    part = next(out.glob("shards/*/ort-int8.npz"))
    part.write_bytes(part.read_bytes()[:-7] + b"damaged")
    time.sleep(1.5)  # decode workers notice their parent is gone
    assert not [p for p in workers if Path(f"/proc/{p}").exists()
                and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()], "orphaned decode workers"
    resumed = run_cli("cvt-bench", *args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    rep = AccuracyReport.read(out / "accuracy.json")
    assert 0 < rep.dataset.shards_reused < rep.dataset.shards
    assert rep.dataset.reference_cached >= 1  # at least the damaged part's images
    assert _figures(out / "accuracy.json") == _figures(tmp_path / "whole" / "accuracy.json")


@pytest.mark.heavy
def test_ctrl_c_stops_the_pass_in_one_line_and_it_resumes(exported: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once a shard is written:
    one line, exit 130, no traceback from the pass or its decode workers, no worker left; the same
    command then goes on from the finished shards."""
    make_folder(tmp_path / "val", 16)
    out = tmp_path / "acc"
    args = ["accuracy", "--dataset", str(tmp_path / "val"), "--artifacts", str(exported), "--backend", "ort",
            "--precision", "int8", "--batch", "2", "--shard-size", "2", "--workers", "2", "--out", str(out)]
    proc, workers = _pass_until(args, lambda: bool(list(out.glob("shards/*/images.json"))),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted: " in err and "the same command goes on from them" in err, err
    time.sleep(1)
    assert workers and not [p for p in workers if Path(f"/proc/{p}").exists()
                            and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()]
    again = run_cli("cvt-bench", *args)
    assert again.returncode == 0, again.stderr
    assert AccuracyReport.read(out / "accuracy.json").dataset.shards_reused >= 1


def _images_done(out: Path, part: str) -> int:
    done = 0
    for record in out.glob(f"shards/*/{part}.json"):
        with contextlib.suppress(RecordError):  # a record caught mid-write
            done += ShardRecord.read(record).images
    return done


@pytest.mark.slow
def test_killed_at_30_and_70_percent_of_2000_images_ends_with_the_same_figures(exported: Path,
                                                                                tmp_path: Path) -> None:
    """One pass of 2,000 images SIGKILLed when about 30% is written, started again and SIGKILLed
    at about 70%, started again: its report's figures are an uninterrupted pass's."""
    make_folder(tmp_path / "val", 2000)
    args = ["accuracy", "--dataset", str(tmp_path / "val"), "--artifacts", str(exported), "--backend", "ort",
            "--precision", "int8", "--batch", "32", "--shard-size", "100", "--workers", "1"]
    whole = run_cli("cvt-bench", *args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    at = []
    for share in (0.3, 0.7):
        proc, _ = _pass_until([*args, "--out", str(out)],
                              lambda share=share: _images_done(out, "ort-int8") >= 2000 * share,
                              timeout=900)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        at.append(_images_done(out, "ort-int8"))
    assert 500 <= at[0] < 1000 and 1300 <= at[1] < 2000, f"the kills should land at 30% and 70%: {at}"
    resumed = run_cli("cvt-bench", *args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    rep = AccuracyReport.read(out / "accuracy.json")
    assert rep.dataset.images == 2000 and 0 < rep.dataset.shards_reused < rep.dataset.shards
    assert _figures(out / "accuracy.json") == _figures(tmp_path / "whole" / "accuracy.json")


def _tree_peak_mb(proc: subprocess.Popen[bytes]) -> float:
    """The highest resident memory of a process and its children together, sampled every 20 ms."""
    peak = 0.0

    def rss(pid: int) -> float:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    while proc.poll() is None:
        peak = max(peak, rss(proc.pid) + sum(rss(c) for c in _children(proc.pid)))
        time.sleep(0.02)
    return peak


@pytest.mark.heavy
def test_memory_does_not_grow_with_the_folder(exported: Path, tmp_path: Path) -> None:
    """24 and 120 large JPEGs (1600x1200, 5.8 MB decoded each): the peak of the process tree (the
    pass and its decode worker) moves by less than 50 MB (measured here: -28 to +3 MB, the
    allocators' noise). Holding each decoded image would add 550 MB; holding the normalized
    tensors, as the in-memory `--dataset` does, 58 MB."""
    peaks = {}
    for n in (24, 120):
        make_folder(tmp_path / f"val{n}", n, size=(1600, 1200))
        proc = subprocess.Popen(
            [str(BIN / "cvt-bench"), "accuracy", "--dataset", str(tmp_path / f"val{n}"), "--artifacts",
             str(exported), "--backend", "ort", "--precision", "int8", "--batch", "4",
             "--out", str(tmp_path / f"out{n}")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        result: list[float] = []
        t = threading.Thread(target=lambda p=proc, got=result: got.append(_tree_peak_mb(p)))
        t.start()
        _, err = proc.communicate(timeout=600)
        t.join()
        assert proc.returncode == 0, err.decode()
        peaks[n] = result[0]
    assert peaks[120] - peaks[24] < 50, peaks


def test_bad_input_is_one_line(exported: Path, tmp_path: Path) -> None:
    make_folder(tmp_path / "val", 2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "val" / "1" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "zeros" / "1").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "zeros" / "1" / f"{i}.jpg").write_bytes(b"")
    base = ["accuracy", "--artifacts", str(exported)]
    cases = [
        (["--dataset", str(tmp_path / "nope")], "no such folder"),
        (["--dataset", str(tmp_path / "empty"), "--out", str(tmp_path / "o1")], "holds no images"),
        (["--dataset", str(tmp_path / "val"), "--out", str(tmp_path / "val" / "report")], "inside --dataset"),
        (["--dataset", str(tmp_path / "val"), "--out", str(exported)], "is the --artifacts"),
        (["--dataset", str(tmp_path / "val"), "--batch", "0", "--out", str(tmp_path / "o2")], "--batch 0"),
        (["--dataset", str(tmp_path / "val"), "--backend", "nope", "--out", str(tmp_path / "o3")], "nope"),
        (["--dataset", str(tmp_path / "zeros"), "--workers", "0", "--out", str(tmp_path / "o4")],
         "none of its 3"),
        (["--dataset", str(tmp_path / "zeros"), "--workers", "1", "--out", str(tmp_path / "o5")],
         "none of its 3"),
        (["--dataset", str(tmp_path / "val"), "--ray", "127.0.0.1:1", "--out", str(tmp_path / "o8")],
         "--ray 127.0.0.1:1"),
        (["--dataset", str(tmp_path / "val"), "--reference-cache", str(tmp_path / "val" / "c.db"),
          "--out", str(tmp_path / "o6")], "inside --dataset"),
    ]
    before = {p.name: p.read_bytes() for p in exported.iterdir() if p.is_file()}
    for extra, words in cases:
        assert_user_error(run_cli("cvt-bench", *base, *extra), words)
    assert not (tmp_path / "val" / "report").exists() and not (tmp_path / "val" / "c.db").exists()
    # an unreadable image among good ones is counted and named, and the pass goes on
    good = run_cli("cvt-bench", *base, "--dataset", str(tmp_path / "val"), "--workers", "1", "--out",
                   str(tmp_path / "o7"))
    assert good.returncode == 0, good.stderr
    rep = AccuracyReport.read(tmp_path / "o7" / "accuracy.json")
    assert (rep.dataset.images, rep.dataset.unreadable, rep.reference.n) == (3, 1, 2)
    assert rep.dataset.unreadable_files[0].startswith("1/broken.jpg: ")
    assert "1 could not be read" in good.stdout
    # results of another dataset or another model in --out: refused, not mixed
    make_folder(tmp_path / "other", 2)
    assert_user_error(run_cli("cvt-bench", *base, "--dataset", str(tmp_path / "other"), "--out",
                              str(tmp_path / "o7")), "holds the accuracy of")
    record = next((tmp_path / "o7" / "shards").glob("*/reference.json"))
    record.write_text(record.read_text().replace('"row_key": "', '"row_key": "0'))  # another model's
    assert_user_error(run_cli("cvt-bench", *base, "--dataset", str(tmp_path / "val"), "--out",
                              str(tmp_path / "o7")), "another model")
    assert {p.name: p.read_bytes() for p in exported.iterdir() if p.is_file()} == before  # export untouched


def test_the_in_memory_benchmark_refuses_a_folder_it_cannot_hold(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`cvt-bench --dataset` holds its inputs in memory: past its limit it says so at once and
    names the streamed pass, unless --limit takes a sample."""
    from cvt_export.harness import bench

    make_folder(tmp_path / "val", 4)
    monkeypatch.setattr(bench, "IN_MEMORY", 3)
    cfg = bench.BenchConfig(dataset=tmp_path / "val", backends=("ort",))
    with pytest.raises(bench.BenchError, match=r"4 images.*cvt-bench accuracy --dataset"):
        cfg.check()
    bench.BenchConfig(dataset=tmp_path / "val", backends=("ort",), limit=3).check()


def test_the_paired_interval_covers_the_true_difference() -> None:
    """On synthetic pairs with a known true difference (row - reference), the 95% interval holds
    it in at least 93% of 2,000 draws, at small and large discordance."""
    rng = np.random.default_rng(0)
    for n, p_lost, p_gained in ((200, 0.03, 0.01), (1000, 0.02, 0.02), (500, 0.10, 0.04)):
        truth = p_gained - p_lost
        covered = 0
        for _ in range(2000):
            kind = rng.choice(3, size=n, p=[p_lost, p_gained, 1 - p_lost - p_gained])
            ref = np.where(kind == 0, True, np.where(kind == 1, False, rng.random(n) < 0.7))
            row = np.where(kind == 0, False, np.where(kind == 1, True, ref))
            lo, hi = metrics.paired_accuracy(ref, row).difference_ci
            covered += lo <= truth <= hi
        assert covered / 2000 >= 0.93, (n, p_lost, p_gained, covered / 2000)
