"""Runners as docs/backends.md shows them: the lifecycle, typed options, what a bad input is told, NaN."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_artifacts

import cvt_ref
from cvt_export.backends import BackendError, BackendUnavailable, Probing, get_backend

CPU_CASES = [("torch", "fp32"), ("torch", "bf16"), ("ort", "fp32"), ("ort", "fp16"), ("ort", "int8"),
             ("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "bf16"), ("openvino", "int8")]
BACKENDS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "backends.md"


@pytest.fixture(scope="module")
def x2(photos: list[Path]) -> np.ndarray:
    return cvt_ref.preprocess_batch(list(photos[:2]), "cvt-13").numpy()


def test_the_docs_python_example_runs_as_written(exported: Path, x2: np.ndarray, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", BACKENDS_PAGE.read_text(), re.S)
    example = next(b for b in blocks if "get_backend" in b)
    (tmp_path / "artifacts").mkdir()
    shutil.copytree(exported, tmp_path / "artifacts" / "cvt-13")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"x": x2}
    exec(compile(example, "docs/backends.md", "exec"), scope)
    logits = scope["logits"]
    assert isinstance(logits, np.ndarray) and logits.shape == (2, 1000)


def test_lifecycle_enter_exit_and_use_after_exit(exported: Path, x2: np.ndarray) -> None:
    runner = get_backend("ort").compile(str(exported), "fp32")  # a str path is accepted
    assert not runner.active and runner.session is None  # nothing loaded before it is entered
    with runner:
        assert runner.active and runner.session is not None
        first = runner(x2)
    assert not runner.active and runner.session is None
    with pytest.raises(BackendError, match="after it was closed"):
        runner(x2)
    with runner:  # entering again makes fresh resources
        assert np.array_equal(runner(x2), first)
    lazy = get_backend("openvino").compile(exported, "fp32")
    assert lazy(x2).shape == (2, 1000) and lazy.active  # first call outside `with` activates it


def test_runner_exposes_its_input_and_output(exported: Path) -> None:
    for backend in ("torch", "ort", "openvino"):
        runner = get_backend(backend).compile(exported, "fp32")
        assert runner.inputs.name == "pixel_values"
        assert runner.inputs.shape == ("batch", 3, 224, 224) and runner.inputs.dtype == "float32"
        assert runner.outputs.shape == ("batch", 1000)
        assert runner.inputs.fixed_batch is None


def test_unknown_options_are_errors(exported: Path) -> None:
    for backend in ("torch", "ort", "openvino"):
        with pytest.raises(TypeError, match="threds"):
            get_backend(backend).compile(exported, "fp32", threds=2)  # type: ignore[call-arg]
        with pytest.raises(BackendError, match="threads=0"):
            get_backend(backend).compile(exported, "fp32", threads=0)


def test_a_torch_tensor_is_told_its_type(exported: Path, x2: np.ndarray) -> None:
    told = r"numpy.ndarray, got torch.Tensor; pass tensor.numpy\(\)"
    with get_backend("ort").compile(exported, "fp32") as run, pytest.raises(BackendError, match=told):
        run(torch.from_numpy(x2))  # type: ignore[arg-type]


def test_torch_threads_are_restored(exported: Path, x2: np.ndarray) -> None:
    before = torch.get_num_threads()
    with get_backend("torch").compile(exported, "fp32", threads=1) as run:
        run(x2[:1])
        assert torch.get_num_threads() == before


def test_probing_is_an_explicit_protocol() -> None:
    assert isinstance(get_backend("ort"), Probing) and isinstance(get_backend("openvino"), Probing)
    assert not isinstance(get_backend("torch"), Probing)


@pytest.mark.parametrize(("backend", "precision"), CPU_CASES)
def test_nan_and_inf_rows_are_refused(backend: str, precision: str, exported: Path, x2: np.ndarray) -> None:
    bad = np.concatenate([x2, x2[:1]])
    bad[1, 0, 5, 5] = np.nan
    bad[2, 2, 0, 0] = np.inf
    try:
        runner = get_backend(backend).compile(exported, precision)
    except BackendUnavailable as e:  # only a missing hardware feature skips (no BF16 units...)
        pytest.skip(str(e))
    with runner as run:
        with pytest.raises(BackendError, match=r"rows \[1, 2\] hold NaN or Inf"):
            run(bad)
        assert np.isfinite(run(x2)).all()


def test_nan_check_can_be_turned_off(exported: Path, x2: np.ndarray) -> None:
    bad = x2.copy()
    bad[1] = np.nan
    with get_backend("ort").compile(exported, "fp32", check_finite=False) as run:
        out = run(bad)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()  # FP32 propagates NaN to its row


def test_a_copied_folder_is_independent(exported: Path, tmp_path: Path) -> None:
    """CLI tests work on copies of the session's export: nothing they do reaches the original."""
    before = sorted(p.name for p in exported.rglob("*"))
    folder = copy_artifacts(exported, tmp_path)
    (folder / "model.onnx").unlink()
    assert sorted(p.name for p in exported.rglob("*")) == before
