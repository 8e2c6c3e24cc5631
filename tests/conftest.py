"""Shared fixtures. The oracle is transformers' CvtForImageClassification, built and
randomised here in its own parameter space, so no cvt_ref code decides what it computes."""

from __future__ import annotations

import math
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import export_cache
import numpy as np
import pytest
import torch

import cvt_ref
from cvt_export import build
from cvt_export.build import BuildRequest
from cvt_export.derive import SMOOTH_CHOICES

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may wait for the network
torch.set_num_threads(max(1, os.cpu_count() or 1))
# Tests send the commands SIGINT as a terminal does. A test run started with SIGINT ignored (a
# background job of a non-interactive shell, nohup) hands SIG_IGN on to every command it starts, and
# the commands rightly keep an inherited SIG_IGN; a handled SIGINT here is reset to the default in
# them at exec, as under a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that run OpenVINO carry the `openvino` marker (by name or parameter), so
    `-m "not openvino"` deselects them; where OpenVINO is not installed they skip with the reason."""
    import importlib.util

    missing = importlib.util.find_spec("openvino") is None
    for item in items:
        if "openvino" in item.nodeid.lower():
            item.add_marker(pytest.mark.openvino)
        if missing and item.get_closest_marker("openvino"):
            item.add_marker(pytest.mark.skip(reason="OpenVINO is not installed: "
                                                    "pip install 'cvt-export[openvino]'"))


@torch.no_grad()
def scramble(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights where every term matters: O(1) attention scores, non-trivial norms and
    BatchNorm statistics (transformers' own init leaves attention almost uniform and BN at
    identity, which would hide a wrong scale or a bad fold)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in sorted(model.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif t.dim() >= 2:
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
        elif name.endswith("weight"):  # LayerNorm / BatchNorm gains
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
        else:  # biases, running means
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return model.eval()


def hf_model(variant: cvt_ref.Variant, seed: int = 0) -> torch.nn.Module:
    from transformers import CvtConfig, CvtForImageClassification

    return scramble(CvtForImageClassification(CvtConfig(**variant.hf_config())), seed)


class QuickGELU(torch.nn.Module):
    """The original code's activation, written here from its definition (not imported)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    found = cvt_ref.bundled_photos()
    assert len(found) >= 10
    return found


@pytest.fixture(scope="session")
def batch_224(photos: list[Path]) -> torch.Tensor:
    return cvt_ref.preprocess_batch(list(photos), "cvt-13")


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[cvt_ref.Variant], Path]:
    """variant -> a save_pretrained folder of a scrambled transformers model (cached)."""
    cache: dict[str, Path] = {}

    def make(variant: cvt_ref.Variant) -> Path:
        if variant.name not in cache:
            folder = tmp_path_factory.mktemp("hf-" + variant.name.replace("[", "_").replace("]", ""))
            hf_model(variant).save_pretrained(folder)
            cache[variant.name] = folder
        return cache[variant.name]

    return make


# --- the cvt-13 artifacts the export and backend tests share (exported once per session) ----

@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private calibration cache for the whole session (never the user's ~/.cache)."""
    folder = tmp_path_factory.mktemp("calib-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CVT_EXPORT_CACHE", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def _private_cache(cache: Path) -> None:
    """Every test runs with CVT_EXPORT_CACHE pointing at the session's cache."""


@pytest.fixture(scope="session")
def model() -> cvt_ref.CvT:
    return cvt_ref.create_model("cvt-13", "random:0")


@pytest.fixture(scope="session")
def split(photos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A calibration folder of half the photos, and the other half held out."""
    folder = tmp_path_factory.mktemp("calib")
    for p in photos[0::2]:
        shutil.copy(p, folder / p.name)
    return folder, photos[1::2]


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, cache: Path,
             split: tuple[Path, list[Path]]) -> Path:
    """cvt-13 (random:0) exported to FP32, FP16 and INT8 (calibrated on `split[0]`)."""
    return export_cache.exported(
        "cvt-13", BuildRequest("cvt-13", "random:0", precisions=("fp32", "fp16", "int8"), calib=split[0]),
        tmp_path_factory.mktemp("cvt-13"), cache, build.build)


@pytest.fixture(scope="session")
def stressed(tmp_path_factory: pytest.TempPathFactory, cache: Path, split: tuple[Path, list[Path]]) -> Path:
    """cvt-13 (random:0) with the outlier stress (4 channels per site), FP32 and INT8 (the CLI's
    default policy: SmoothQuant migration at the strength chosen on the selection images),
    calibrated on `split[0]`."""
    return export_cache.exported(
        "cvt-13-stressed", BuildRequest("cvt-13", "random:0", precisions=("fp32", "int8"), calib=split[0],
                                        outliers=4, smooth_search=SMOOTH_CHOICES),
        tmp_path_factory.mktemp("cvt-13-stressed"), cache, build.build)


def copy_artifacts(folder: Path, where: Path, name: str = "artifacts-copy") -> Path:
    """A private copy of an artifact folder: tests that write into one (CLI runs, damage, rebuilt
    derived files) never touch the session's shared export, so test order does not matter."""
    copy = where / name
    shutil.copytree(folder, copy)
    return copy


@pytest.fixture
def exported_copy(exported: Path, tmp_path: Path) -> Path:
    return copy_artifacts(exported, tmp_path)


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on a read-only mount (a bind mount with ro): permission bits do not stop root,
    a read-only file system does. Skipped where mounting is not allowed."""
    import subprocess

    src, ro = tmp_path / "ro-src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    made = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {made.stderr.strip()}")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=False)


@pytest.fixture(scope="session")
def reference(model: cvt_ref.CvT, batch_224: torch.Tensor) -> np.ndarray:
    """The PyTorch reference's logits on the bundled photos."""
    with torch.inference_mode():
        return model(batch_224).numpy()


@pytest.fixture(scope="module")
def repo(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Triton repository of `exported` (FP32, the python runtime, max batch 8), for serving tests."""
    from cvt_export.triton.repository import RepoOptions, write_repository
    from helpers import triton_or_skip

    triton_or_skip()
    out = tmp_path_factory.mktemp("serve-repo")
    write_repository(exported, out, RepoOptions(name="cvt", precision="fp32", max_batch=8))
    return out
