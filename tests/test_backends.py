"""Every backend × precision through the one Runner interface, against the PyTorch reference.

Bounds are the export issue's: FP32 max-abs ≤ 1e-4; FP16 cosine ≥ 0.9999 and top-1 100%;
INT8 cosine ≥ 0.995 on photos not used for calibration. BF16 has 3 fewer mantissa bits than
FP16, so its bound is cosine ≥ 0.999 and top-1 100% (measured figures in docs/backends.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_artifacts

import cvt_ref
from cvt_export import build
from cvt_export.artifacts import ArtifactFolder
from cvt_export.backends import BackendError, BackendUnavailable, Runner, all_backends, get_backend
from cvt_export.backends import openvino as ov_backend
from cvt_export.backends import tensorrt as trt_backend
from cvt_ref.errors import CvtError
from cvt_ref.source import sha256_file
from helpers import assert_user_error, cosine_rows, int8_backends, run_cli

CPU_CASES = [("torch", "fp32"), ("torch", "bf16"), ("ort", "fp32"), ("ort", "fp16"), ("ort", "int8"),
             ("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "bf16"), ("openvino", "int8")]


def check_bounds(precision: str, ref: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == ref.shape and got.dtype == np.float32
    if precision == "fp32":
        assert np.abs(got - ref).max() <= 1e-4
        return
    cos = cosine_rows(ref, got).min()
    bound = {"fp16": 0.9999, "bf16": 0.999, "int8": 0.995}[precision]
    assert cos >= bound, f"{precision}: cosine {cos:.6f} < {bound}"
    if precision != "int8":
        assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize(("backend", "precision"), CPU_CASES)
def test_backend_matches_reference(backend: str, precision: str, exported: Path, photos: list[Path],
                                   batch_224: torch.Tensor, reference: np.ndarray,
                                   split: tuple[Path, list[Path]]) -> None:
    b = get_backend(backend)
    ok, why = b.available()
    if not ok:
        pytest.skip(why)
    # INT8: held-out photos only (the calibration folder holds the others)
    used = [i for i, p in enumerate(photos) if precision != "int8" or p in split[1]]
    x, ref = batch_224.numpy()[used], reference[used]
    try:
        compiled = b.compile(exported, precision)
    except BackendUnavailable as e:  # a CPU without BF16 units or VNNI: nothing to measure
        pytest.skip(str(e))
    with compiled as runner:
        assert isinstance(runner, Runner)
        got = runner(x)
        single = runner(x[:1])
        info = runner.info
    print(f"{backend} {precision} ran {info.executed} on {info.device}: cosine min "
          f"{cosine_rows(ref, got).min():.6f}, max-abs {np.abs(got - ref).max():.2e}")
    check_bounds(precision, ref, got)
    assert np.abs(single[0] - got[0]).max() <= (1e-5 if precision == "fp32" else 5e-2)
    assert info.backend == b.name and info.precision == precision
    if backend == "openvino":  # what the plugin says it runs; f16 resolves per CPU (bf16 here)
        caps = info.details["capabilities"]
        half = [p for p, cap in (("fp16", "FP16"), ("bf16", "BF16")) if cap in caps] or ["fp32"]
        expected = {"fp32": ["fp32"], "fp16": half, "bf16": ["bf16"],
                    "int8": ["int8 (quantized layers) + fp32"]}[precision]
        assert info.executed in expected


def test_openvino_compiles_a_model_per_batch_size_and_keeps_the_latest(
        exported: Path, batch_224: torch.Tensor, reference: np.ndarray,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-batch models (static shapes) compute what the reference computes, one is made per new
    batch size, and only the PER_BATCH_MODELS most recently used are kept."""
    monkeypatch.setattr(ov_backend, "PER_BATCH_MODELS", 2)
    x = batch_224.numpy()
    with get_backend("openvino").compile(exported, "fp32") as runner:
        assert isinstance(runner, ov_backend.OpenVinoRunner) and runner.info.details["shapes"] == "per-batch"
        for n in (1, 3, 1, 2):  # 2 arrives with two kept: 3, the least recently used, goes
            assert np.abs(runner(x[:n]) - reference[:n]).max() <= 1e-4
            assert list(runner.per_batch)[-1][0] == n  # the batch ran on a model made for it
        assert [s[0] for s in runner.per_batch] == [1, 2]
    with get_backend("openvino").compile(exported, "fp32", shapes="dynamic") as runner:
        assert np.abs(runner(x[:3]) - reference[:3]).max() <= 1e-4 and not runner.per_batch
    with pytest.raises(BackendError, match="shapes 'static'"):
        get_backend("openvino").compile(exported, "fp32", shapes="static")  # type: ignore[arg-type]


def test_runner_refuses_wrong_inputs(exported: Path) -> None:
    with get_backend("ort").compile(exported, "fp32") as runner:
        for bad in (np.zeros((1, 3, 224, 224), np.float64), np.zeros((3, 224, 224), np.float32),
                    np.zeros((1, 3, 192, 192), np.float32)):
            with pytest.raises(BackendError, match="input must be"):
                runner(bad)


def test_a_changed_artifact_is_refused(exported: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "art"
    shutil.copytree(exported, folder)
    with (folder / "model.onnx").open("r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 64)
    with pytest.raises(CvtError, match="changed since export"):
        get_backend("ort").compile(folder, "fp32")


@pytest.mark.slow
def test_openvino_ir_is_recorded_and_a_truncated_one_is_rebuilt(exported: Path, tmp_path: Path,
                                                                 batch_224: torch.Tensor,
                                                                 reference: np.ndarray) -> None:
    import shutil

    folder = tmp_path / "art"
    shutil.copytree(exported, folder)
    xml = ov_backend.make_ir(folder, "fp32")
    made = ArtifactFolder.open(folder)
    bin_file = xml.with_suffix(".bin")
    ir = made.ir(xml.name)
    assert ir is not None and ir.made_from == made.sha256("fp32") == sha256_file(folder / "model.onnx")
    good = bin_file.read_bytes()
    bin_file.write_bytes(good[: len(good) // 2])  # truncated
    with get_backend("openvino").compile(folder, "fp32") as runner:
        got = runner(batch_224.numpy()[:2])
    assert bin_file.read_bytes() == good
    assert np.abs(got - reference[:2]).max() <= 1e-4


@pytest.mark.slow
def test_nncf_and_qdq_int8_both_run(exported: Path, model: cvt_ref.CvT,
                                    split: tuple[Path, list[Path]]) -> None:
    if "openvino" not in int8_backends():
        pytest.skip("OpenVINO INT8 needs VNNI or AMX; this CPU has neither")
    x = cvt_ref.preprocess_batch(list(split[1]), "cvt-13").numpy()
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    cosines = {}
    for source in ov_backend.INT8_SOURCES:
        with get_backend("openvino").compile(exported, "int8", int8_source=source) as runner:
            got = runner(x)
            assert runner.info.details["int8_source"] == source
        cosines[source] = cosine_rows(ref, got).min()
        print(f"openvino int8 from {source}: cosine min {cosines[source]:.5f}")
    # The default is the better one, as measured; NNCF must still be a working path.
    assert cosines[ov_backend.DEFAULT_INT8_SOURCE] == max(cosines.values())
    assert cosines["nncf"] >= 0.95


def test_backends_are_listed_and_unknown_ones_refused() -> None:
    assert [b.name for b in all_backends()] == ["torch", "ort", "openvino", "tensorrt"]
    assert get_backend("trt").name == "tensorrt" and get_backend("onnxruntime").name == "ort"
    with pytest.raises(BackendError, match="unknown backend 'tvm'"):
        get_backend("tvm")
    listing = run_cli("cvt-export", "backends")
    assert listing.returncode == 0
    for name in ("torch", "ort", "openvino", "tensorrt"):
        assert name in listing.stdout


def test_importing_the_package_loads_no_backend_sdk() -> None:
    code = ("import sys, cvt_export, cvt_export.backends, cvt_export.build; "
            "print([m for m in ('onnxruntime', 'openvino', 'tensorrt', 'nncf') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- TensorRT: runs where it is installed with a GPU; type-checked everywhere ---------------

def _trt_missing() -> str | None:
    ok, why = trt_backend.BACKEND.available()
    return None if ok else why


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_matches_reference(precision: str, exported: Path, model: cvt_ref.CvT,
                                    photos: list[Path], split: tuple[Path, list[Path]]) -> None:
    missing = _trt_missing()
    if missing:
        pytest.skip(f"TensorRT backend unavailable here: {missing}")
    used = photos if precision != "int8" else split[1]
    x = cvt_ref.preprocess_batch(list(used), "cvt-13").numpy()
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    with get_backend("tensorrt").compile(exported, precision) as runner:
        got = runner(x)
        alone = np.concatenate([runner(x[i:i + 1]) for i in range(len(x))])
    check_bounds(precision, ref, got)
    assert np.abs(alone - got).max() <= (1e-4 if precision == "fp32" else 2e-2)  # TensorRT #1697


@pytest.mark.slow
def test_tensorrt_missing_gives_one_line(exported: Path, tmp_path: Path) -> None:
    missing = _trt_missing()
    if missing is None:
        pytest.skip("TensorRT and a GPU are present; this checks the message when they are not")
    with pytest.raises(BackendError, match=r"pip install tensorrt|no CUDA GPU"):
        get_backend("tensorrt").compile(exported, "fp16")
    assert_user_error(run_cli("cvt-export", "trt", "--artifacts", str(copy_artifacts(exported, tmp_path))),
                      "tensorrt:")


STUB_PROBE = """
import tensorrt as trt
logger = trt.Logger(trt.Logger.WARNING)
config = trt.Builder(logger).create_builder_configg()
"""


@pytest.mark.slow
def test_tensorrt_stub_type_check_is_live(tmp_path: Path) -> None:
    """mypy against the patched stubs: the backend passes and a misspelt API fails.

    Without this, missing stubs would make `import tensorrt` Any and the check vacuous."""
    root = Path(__file__).resolve().parents[1]
    stubs = root / "build" / "trt-stubs" / "tensorrt" / "__init__.pyi"
    if not stubs.is_file():
        pytest.skip("TensorRT stubs not fetched: `make lint` (or `make test`) fetches and patches them")
    mypy = [sys.executable, "-m", "mypy", "--config-file", str(root / "pyproject.toml")]
    good = subprocess.run([*mypy, "cvt_export/backends/tensorrt.py"], cwd=root, capture_output=True,
                          text=True)
    assert good.returncode == 0, good.stdout
    probe = tmp_path / "probe.py"
    probe.write_text(STUB_PROBE)
    bad = subprocess.run([*mypy, str(probe)], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 1 and 'has no attribute "create_builder_configg"' in bad.stdout, bad.stdout


@pytest.mark.slow
def test_an_ir_from_another_openvino_version_is_rebuilt(exported: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    folder = tmp_path / "art"
    shutil.copytree(exported, folder)
    xml = ov_backend.make_ir(folder, "fp16")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["openvino"][xml.name]["openvino"] = "2023.0.0"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        path = ov_backend.ir_file(folder, "fp16")
    assert "made by another OpenVINO version" in caplog.text
    import openvino as ov

    entry = ArtifactFolder.open(folder).ir(path.name)
    assert entry is not None and entry.openvino == ov.__version__


# --- derived files follow their source ------------------------------------------------------

def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


@pytest.mark.slow
def test_derived_files_are_rebuilt_after_a_forced_reexport(exported: Path, tmp_path: Path) -> None:
    folder = copy_artifacts(exported, tmp_path)
    for backend in ("ort", "openvino"):
        with get_backend(backend).compile(folder, "fp32") as run:
            run(np.zeros((1, 3, 224, 224), np.float32))
    opt = folder / "ort" / "model.cpu.opt.onnx"
    before = _tree(folder)
    assert "ort/model.cpu.opt.onnx" in before and "openvino/model.fp32.xml" in before
    # another source without --force: refused, nothing touched
    refused = run_cli("cvt-export", "onnx", "--weights", "random:1", "--out", str(folder))
    assert_user_error(refused, "weights random:0 → random:1")
    assert "--force" in refused.stderr and _tree(folder) == before
    # with --force: the ONNX file changes, and so does everything derived from it
    build.build(build.BuildRequest("cvt-13", "random:1", force=True), folder)
    manifest = ArtifactFolder.open(folder).manifest
    new_sha = manifest.files["model.onnx"].sha256
    assert new_sha != before["model.onnx"] and "model.int8.onnx" not in manifest.files
    assert not (folder / "model.int8.onnx").exists() and manifest.files["model.onnx"].probes
    assert ov_backend.ir_stale(folder, "fp32") is not None
    for backend in ("ort", "openvino"):
        with get_backend(backend).compile(folder, "fp32") as run:
            run(np.zeros((1, 3, 224, 224), np.float32))
    after = _tree(folder)
    assert after["ort/model.cpu.opt.onnx"] != before["ort/model.cpu.opt.onnx"]
    assert json.loads((folder / "ort" / "model.cpu.opt.json").read_text())["from"] == new_sha
    assert after["openvino/model.fp32.xml"] != before["openvino/model.fp32.xml"] or \
        after["openvino/model.fp32.bin"] != before["openvino/model.fp32.bin"]
    assert ov_backend.ir_stale(folder, "fp32") is None
    # a truncated derived file is written again
    opt.write_bytes(opt.read_bytes()[:1000])
    with get_backend("ort").compile(folder, "fp32") as run:
        run(np.zeros((1, 3, 224, 224), np.float32))
    record = json.loads((folder / "ort" / "model.cpu.opt.json").read_text())
    assert opt.stat().st_size > 1000 and sha256_file(opt) == record["sha256"] and record["from"] == new_sha


def test_the_hint_for_a_changed_file_names_the_full_source(exported: Path, tmp_path: Path) -> None:
    folder = copy_artifacts(exported, tmp_path)
    with (folder / "model.int8.onnx").open("r+b") as f:
        f.seek(500)
        f.write(b"garbage!")
    with pytest.raises(CvtError) as info:
        get_backend("ort").compile(folder, "int8")
    text = str(info.value)
    assert "cvt-export onnx --variant cvt-13 --weights random:0" in text
    assert "--precision fp32,fp16,int8" in text and "--calib " in text and f"--out {folder}" in text
