"""The artifact folder has one owner: crafted manifests are refused by every reader, nothing a user
made is deleted or overwritten, one writer at a time, and bad input is refused before any work.

Every case ends in one `error:` line and exit 2 with the user's files byte-identical; the
folders are private copies of the session's export."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_artifacts

from cvt_export import artifacts, precisions, regress
from cvt_export.artifacts import ArtifactError, ArtifactFolder
from cvt_export.backends import get_backend
from cvt_export.backends import tensorrt as trt_backend
from cvt_export.metrics import parse_budget
from cvt_export.records import BaselineMachine
from cvt_ref.source import sha256_file
from helpers import assert_user_error, run_cli


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots with its sha256: 'byte-identical afterwards' is this, equal."""
    found = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                found[str(p)] = sha256_file(p)
    return found


def write_manifest(folder: Path, change: object) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    change(data)  # type: ignore[operator]
    (folder / "manifest.json").write_text(json.dumps(data))


# --- confinement ------------------------------------------------------------------------------

def _crafted(exported: Path, tmp_path: Path, how: str) -> tuple[Path, Path]:
    """A copy of the export whose manifest lists a file outside the folder (with its true sha256,
    which the manifest's author can write), and that outside file."""
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours\n")
    folder = copy_artifacts(exported, tmp_path, "crafted")
    if how == "dotdot":
        name = "../secret.txt"
    elif how == "absolute":
        name = str(outside)
    else:  # a symlink inside the folder that leads out of it
        (folder / "link.onnx").symlink_to(outside)
        name = "link.onnx"

    def change(m: dict) -> None:
        entry = m["files"]["model.fp16.onnx"]
        entry["data_files"] = {name: sha256_file(outside)}

    write_manifest(folder, change)
    return folder, outside


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_crafted_manifest_is_refused_by_the_python_api(exported: Path, tmp_path: Path, how: str) -> None:
    folder, _ = _crafted(exported, tmp_path, how)
    with pytest.raises(ArtifactError, match=r"outside the folder|leads outside"):
        ArtifactFolder.open(folder)
    with pytest.raises(ArtifactError):
        get_backend("ort").compile(folder, "fp16")


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["cvt-bench", "--backend", "ort", "--precision", "fp16", "--iters", "1", "--limit", "20",
     "--artifacts", "{a}", "--out", "{t}/rep"],
    ["cvt-bench", "regress", "--baseline", "{t}/none.json", "--update", "--artifacts", "{a}"],
    ["cvt-export", "openvino", "--artifacts", "{a}", "--precision", "fp16"],
    ["cvt-export", "trt", "--artifacts", "{a}", "--precision", "fp16"],
    ["cvt-export", "tune", "--artifacts", "{a}", "--backend", "ort", "--budget", "cosine>=0.99"],
    ["cvt-export", "triton", "--artifacts", "{a}", "--precision", "fp16", "--out", "{t}/repo"],
], ids=["bench", "regress", "openvino", "trt", "tune", "triton"])
def test_a_crafted_manifest_is_refused_by_every_command(exported: Path, tmp_path: Path,
                                                         command: list[str]) -> None:
    folder, _ = _crafted(exported, tmp_path, "dotdot")
    before = snapshot(tmp_path)
    args = [c.format(a=folder, t=tmp_path) for c in command]
    result = run_cli(*args)
    assert_user_error(result, "outside the folder")
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "repo").exists() and not (tmp_path / "rep").exists()


@pytest.mark.slow
def test_recommendation_paths_are_relative_to_the_file_and_checked(exported: Path, tmp_path: Path) -> None:
    folder = copy_artifacts(exported, tmp_path, "art")
    entry = ArtifactFolder.open(folder)
    pick = {"backend": "ort", "precision": "int8", "artifacts": "art", "batch": 8,
            "onnx_sha256": entry.sha256("fp32")}
    rec = {"schema": "cvt-recommendation/1", "objectives": {"throughput-b8": pick, "latency-b1": None}}
    path = tmp_path / "recommendation.json"
    path.write_text(json.dumps(rec))
    elsewhere = tmp_path / "cwd"
    (elsewhere / "art").mkdir(parents=True)  # another folder of that name where the user stands
    from cvt_export.harness import recommend

    assert recommend.read(path, "throughput-b8").folder.path == tmp_path / "art"
    cases = {
        "sha": ({**pick, "onnx_sha256": "0" * 64}, "another export"),
        "missing": ({k: v for k, v in pick.items() if k != "precision"}, "precision is missing"),
        "type": ({**pick, "backend": 3}, "backend is missing or not a string"),
        "absolute": ({**pick, "artifacts": str(folder)}, "relative to the file"),
        "precision": ({**pick, "precision": "fp64"}, "not one of"),
    }
    for name, (bad, fragment) in cases.items():
        broken = tmp_path / f"rec-{name}.json"
        broken.write_text(json.dumps({**rec, "objectives": {"throughput-b8": bad}}))
        result = run_cli("cvt-export", "triton", "--from-recommendation", str(broken), "--out",
                         str(tmp_path / "repo"), cwd=elsewhere)
        assert_user_error(result, fragment)
    assert not (tmp_path / "repo").exists()


# --- nothing a user made is deleted ------------------------------------------------------------

@pytest.mark.slow
def test_triton_never_replaces_an_artifact_folder_or_a_users_folder(exported: Path, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    root.mkdir()
    folder = copy_artifacts(exported, root, "cvt-13")
    mine = tmp_path / "repo" / "cvt"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own model folder\n")
    before = snapshot(tmp_path)
    cases = [
        (["--out", str(root), "--name", "cvt-13"], "artifact folder"),  # the export itself
        (["--out", str(folder), "--name", "openvino"], "artifact folder"),  # inside the export
        (["--out", str(folder / "sub"), "--name", "x"], "artifact folder"),
        (["--out", str(tmp_path / "repo"), "--name", "cvt"], "not written by `cvt-export triton`"),
        (["--out", str(tmp_path / "new"), "--name", "../escape"], "--name"),
        (["--out", str(tmp_path / "new"), "--name", "a\nb"], "--name"),
    ]
    for args, fragment in cases:
        result = run_cli("cvt-export", "triton", "--artifacts", str(folder), *args)
        assert_user_error(result, fragment)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_triton_replaces_only_its_own_models_and_says_so(exported: Path, tmp_path: Path) -> None:
    folder = copy_artifacts(exported, tmp_path)
    repo = tmp_path / "repo"
    first = run_cli("cvt-export", "triton", "--artifacts", str(folder), "--out", str(repo), "--name", "a",
                    "--preprocess")
    assert first.returncode == 0, first.stderr
    again = run_cli("cvt-export", "triton", "--artifacts", str(folder), "--out", str(repo), "--name", "a",
                    "--preprocess")
    assert again.returncode == 0 and "replaced a-classifier, a-preprocess, a" in again.stdout
    before = snapshot(repo)
    stale = run_cli("cvt-export", "triton", "--artifacts", str(folder), "--out", str(repo), "--name",
                    "a-classifier")
    assert_user_error(stale, "belongs to model 'a'")
    bf16 = run_cli("cvt-export", "triton", "--artifacts", str(folder), "--out", str(repo), "--name", "b",
                   "--runtime", "onnxruntime", "--precision", "bf16")
    assert_user_error(bf16, "the onnxruntime runtime serves fp32, fp16, int8, mixed")
    assert snapshot(repo) == before


# --- one writer at a time, no valid-looking leftovers ------------------------------------------

def test_a_second_writer_is_refused_at_once(exported_copy: Path) -> None:
    folder = ArtifactFolder.open(exported_copy)
    before = snapshot(exported_copy)
    with folder.lock():
        with folder.lock():  # re-entrant for the holder
            pass
        for args in (["cvt-export", "tune", "--artifacts", str(exported_copy), "--backend", "ort",
                      "--budget", "cosine>=0.999"],
                     ["cvt-export", "onnx", "--weights", "random:0", "--out", str(exported_copy)],
                     ["cvt-export", "openvino", "--artifacts", str(exported_copy)]):
            assert_user_error(run_cli(*args), "another cvt-export command")
    assert snapshot(exported_copy) == before


def test_a_triton_repository_has_one_writer_at_a_time(exported: Path, tmp_path: Path) -> None:
    """`cvt-export triton` and `deploy` write --out under its lock: while another writer holds it
    they are refused at once (deploy before its search); a staging folder a killed writer left
    is removed by the next write, which leaves the lock file and its models."""
    repo = tmp_path / "repo"
    repo.mkdir()
    with artifacts.locked(repo):
        before = snapshot(tmp_path)
        for args in (["cvt-export", "triton", "--artifacts", str(exported), "--out", str(repo)],
                     ["cvt-export", "deploy", "--artifacts", str(exported), "--out", str(repo),
                      "--slo", "p99<=1000ms@rate=2", "--budget", "cosine>=0.99"]):
            assert_user_error(run_cli(*args), "another cvt-export command")
        assert snapshot(tmp_path) == before
    (repo / ".staging-killed" / "cvt").mkdir(parents=True)
    artifacts.mark_scratch(repo / ".staging-killed")  # what every staging folder carries
    done = run_cli("cvt-export", "triton", "--artifacts", str(exported), "--out", str(repo))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in repo.iterdir()) == [artifacts.LOCK, "cvt", "cvt.cvt-repository.json"]
    # a write that fails in a folder it made leaves no folder behind (the lock file included)
    fresh = tmp_path / "fresh"
    failed = run_cli("cvt-export", "triton", "--artifacts", str(exported), "--out", str(fresh),
                     "--runtime", "onnxruntime", "--precision", "bf16")
    assert failed.returncode == 2 and not fresh.exists()


def test_scratch_never_opens_as_an_artifact_folder(exported_copy: Path) -> None:
    from cvt_export import tune

    folder = ArtifactFolder.open(exported_copy)
    with folder.lock():
        scratch = ArtifactFolder.scratch(folder, tune.SCRATCH_PREFIX, ("fp32", "int8"))
        assert scratch.verify("fp32") and scratch.verify("int8")
        with pytest.raises(ArtifactError, match="tune's scratch"):
            ArtifactFolder.open(scratch.path)
        assert not any(p.name == "manifest.json" for p in scratch.path.rglob("*"))
        mine = exported_copy / f"{tune.SCRATCH_PREFIX}mine"  # the user's, sharing the prefix
        mine.mkdir()
        (mine / "notes.txt").write_text("mine")
        earlier = exported_copy / f"{tune.SCRATCH_PREFIX}earlier"  # a scratch from before the mark
        earlier.mkdir()
        (earlier / artifacts.SCRATCH_MANIFEST).write_text(json.dumps({"scratch_of": str(exported_copy)}))
        tune._remove_leftovers(folder)  # what a killed tune left: removed by the next one
    assert not scratch.path.exists() and not earlier.exists()
    assert (mine / "notes.txt").read_text() == "mine"
    assert all(folder.verify(p) for p in ("fp32", "fp16", "int8"))


def test_a_mix_made_from_another_int8_file_is_not_used(exported_copy: Path) -> None:
    folder = ArtifactFolder.open(exported_copy)
    for name in folder.file_names("int8"):
        (exported_copy / name.replace("int8", "mixed")).write_bytes((exported_copy / name).read_bytes())
    int8 = folder.entry("int8")
    entry = dataclasses.replace(int8, precision="mixed", made_from=folder.sha256("fp32"),
                                int8_from=folder.sha256("int8"),
                                data_files={k.replace("int8", "mixed"): v
                                            for k, v in int8.data_files.items()})
    folder.record_file("mixed", entry)
    assert ArtifactFolder.open(exported_copy).onnx("mixed").name == "model.mixed.onnx"
    write_manifest(exported_copy, lambda m: m["files"]["model.int8.onnx"].__setitem__("sha256", "0" * 64))
    with pytest.raises(ArtifactError, match="another INT8 file"):
        ArtifactFolder.open(exported_copy).onnx("mixed")
    with pytest.raises(ArtifactError, match="another INT8 file"):
        get_backend("ort").compile(exported_copy, "mixed")


# --- bad input refused up front ----------------------------------------------------------------

@pytest.mark.parametrize("budget", ["cosine>=2", "top1-drop<=-1", "top1-agreement>=1.5", "cosine>=nan"])
def test_impossible_budgets_are_refused(budget: str, exported_copy: Path) -> None:
    with pytest.raises(ValueError):
        parse_budget(budget)
    before = snapshot(exported_copy)
    result = run_cli("cvt-export", "tune", "--artifacts", str(exported_copy), "--backend", "ort",
                     "--budget", budget)
    assert_user_error(result, "--budget")
    assert snapshot(exported_copy) == before


@pytest.mark.slow
def test_a_baseline_of_wrong_types_or_another_model_is_bad_input(exported: Path, tmp_path: Path) -> None:
    good = Path(__file__).resolve().parents[1] / "reports" / "baseline" / "cvt-13.json"
    data = json.loads(good.read_text())
    key = next(iter(data["results"]))
    cases = {
        "string": (lambda d: d["results"][key]["fidelity"].__setitem__("cosine_min", "high"),
                   "fidelity.cosine_min: expected a number, got 'high'; fix it or regenerate"),
        "images": (lambda d: d["inputs"].__setitem__("images", "11"),
                   "inputs.images: expected int, got '11'"),
        "count": (lambda d: d["inputs"].__setitem__("images", 0), "inputs.images must be a positive integer"),
        "median": (lambda d: d["results"][key].__setitem__("median_ms", None),
                   "median_ms: expected a number, got None"),
        "slow": (lambda d: d["results"][key].__setitem__("median_ms", -1),
                 "median_ms must be a positive number"),
        "weights": (lambda d: d.__setitem__("weights", "random:7"), "made for weights random:7"),
    }
    for name, (change, fragment) in cases.items():
        bad = json.loads(good.read_text())
        change(bad)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(bad))
        before = path.read_bytes()
        result = run_cli("cvt-bench", "regress", "--baseline", str(path), "--artifacts", str(exported),
                         "--iters", "1", "--backend", "ort", "--precision", "fp32")
        assert_user_error(result, fragment)
        assert path.read_bytes() == before
    for tolerance, fragment in (({"cosine_min_min": "x"}, "cosine_min_min: expected a number"),
                                ({"cosine_min_min": float("nan")}, "an object of finite numbers")):
        bad = json.loads(good.read_text())
        bad["results"][key]["tolerance"] = tolerance
        (tmp_path / "t.json").write_text(json.dumps(bad))
        with pytest.raises(regress.BaselineError, match=fragment):
            regress.load_baseline(tmp_path / "t.json")


def test_a_runner_serializes_calls_from_several_threads(exported: Path) -> None:
    import cvt_ref

    images = cvt_ref.preprocess_batch(list(cvt_ref.bundled_photos())[:4], "cvt-13").numpy()
    with get_backend("openvino").compile(exported, "fp32") as runner:
        alone = [runner(images[i:i + 1]) for i in range(4)]
        got: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def call(i: int) -> None:
            try:
                for _ in range(3):
                    got[i] = runner(images[i:i + 1])
            except BaseException as e:  # "Infer Request is busy" before serialization
                errors.append(e)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    for i in range(4):
        assert np.array_equal(got[i], alone[i])


def test_a_small_max_batch_makes_a_valid_tensorrt_profile() -> None:
    for largest in (1, 4, 8, 64):
        opts = trt_backend.BuildOptions.up_to(largest)
        opts.check()
        assert opts.opt_batch == min(8, largest) and opts.max_batch == largest


# --- one owner, one table ------------------------------------------------------------------

def test_the_table_parses_precisions() -> None:
    """The CLI's spelling rules (that no other module states a precision rule is checked by ast in
    tests/test_structure.py, and a row added to the table is run by cvt-bench there)."""
    assert precisions.parse("INT8, fp32") == ("fp32", "int8")
    assert precisions.reads("bf16") == "fp32"
    with pytest.raises(precisions.PrecisionError, match="fp64"):
        precisions.parse("fp64")


def test_int8_rows_are_held_to_the_bounds_when_the_baselines_cpu_computes_int8_otherwise() -> None:
    """A baseline made where INT8 dot products are exact (VNNI/AMX) and a run where they are not
    (or the reverse) differ in INT8 rounding: the gate then holds INT8 to the bounds table only."""
    from cvt_export import machine

    exact_here = machine.int8_dot_exact()
    vnni = BaselineMachine(isa=("avx2", "avx512f", "avx512_vnni"))
    avx2 = BaselineMachine(isa=("avx2", "fma"))
    assert regress.other_int8_kernels(vnni) is (not exact_here)
    assert regress.other_int8_kernels(avx2) is exact_here
    assert regress.other_int8_kernels(None) is False  # an old baseline: no change


def test_a_child_forked_under_the_lock_does_not_keep_it(tmp_path: Path) -> None:
    """OpenVINO's telemetry forks a multiprocessing child during a conversion that runs under the
    folder's lock; the child shares the lock's open file description and outlives the conversion.
    Measured on a fresh clone under load: the next writer was refused ("another cvt-export command
    ... is writing this folder") by its own process's leftover. Released by LOCK_UN, it is not."""
    import multiprocessing
    import time

    from cvt_export.artifacts import locked

    with locked(tmp_path):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(5,), daemon=True)
        child.start()
    try:
        with locked(tmp_path):
            assert child.is_alive()  # the child still holds its copy of the descriptor
        # and another process is still refused while this one holds it
        with locked(tmp_path):
            probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                                    "from cvt_export.artifacts import locked\n"
                                    f"with locked(Path({str(tmp_path)!r})): pass"],
                                   capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0 and "another cvt-export command" in probe.stderr
    finally:
        child.terminate()
        child.join(timeout=10)


def test_staging_removes_only_what_carries_its_mark(tmp_path: Path) -> None:
    """A user's `.staging-mine` inside --out is theirs: the next writer removes a killed writer's
    staging folder (it carries the mark) and an empty one, never a folder for its name."""
    from cvt_export import artifacts

    out = tmp_path / "out"
    mine = out / ".staging-mine"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("chapter 1")
    (out / ".staging-empty").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    (outside / artifacts.SCRATCH_MARK).write_text((out / "x").name)  # a mark with other words
    (out / ".staging-link").symlink_to(outside, target_is_directory=True)
    killed = None
    with artifacts.staging(out) as staged:  # a writer that dies: its folder stays behind
        killed = staged
        (staged / "model.onnx").write_bytes(b"half")
        import shutil

        shutil.copytree(staged, out / ".staging-killed")
    assert not killed.exists()
    with artifacts.staging(out) as staged:
        assert (staged / artifacts.SCRATCH_MARK).is_file()
        assert not (out / ".staging-killed").exists() and not (out / ".staging-empty").exists()
    assert (mine / "thesis.tex").read_text() == "chapter 1"
    assert (outside / "keep.txt").exists() and (out / ".staging-link").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [".staging-link", ".staging-mine"]
