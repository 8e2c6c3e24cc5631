"""Every weights source, and every way a checkpoint can be wrong (API and CLI)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cvt_ref
from helpers import assert_user_error, run_cli

CVT13 = cvt_ref.VARIANTS["cvt-13"]


@pytest.fixture(scope="module")
def folder(hf_folder: Callable[[cvt_ref.Variant], Path]) -> Path:
    return hf_folder(CVT13)


@pytest.fixture(scope="module")
def hf_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def x(batch_224: torch.Tensor) -> torch.Tensor:
    return batch_224[:2]


@pytest.fixture(scope="module")
def expected(folder: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return cvt_ref.create_model("cvt-13", folder)(x)


def logits(weights: str | Path, x: torch.Tensor, variant: str = "cvt-13") -> torch.Tensor:
    with torch.inference_mode():
        return cvt_ref.create_model(variant, weights)(x)


# --- sources that load -------------------------------------------------------------------

def test_folder_with_pytorch_model_bin(tmp_path: Path, folder: Path, hf_state: dict[str, torch.Tensor],
                                       x: torch.Tensor, expected: torch.Tensor) -> None:
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    torch.save(hf_state, tmp_path / "pytorch_model.bin")
    assert torch.equal(logits(tmp_path, x), expected)


def test_bare_safetensors_and_bin(tmp_path: Path, folder: Path, hf_state: dict[str, torch.Tensor],
                                  x: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(logits(folder / "model.safetensors", x), expected)
    torch.save(hf_state, tmp_path / "weights.bin")
    assert torch.equal(logits(tmp_path / "weights.bin", x), expected)


def test_native_keys_and_wrapped_module_prefixed_checkpoints(tmp_path: Path, folder: Path,
                                                             x: torch.Tensor, expected: torch.Tensor) -> None:
    native = cvt_ref.create_model("cvt-13", folder).state_dict()
    save_file(native, tmp_path / "native.safetensors")
    model = cvt_ref.create_model("cvt-13", tmp_path / "native.safetensors")
    assert model.weights is not None and model.weights.kind == "native"
    assert torch.equal(logits(tmp_path / "native.safetensors", x), expected)
    # a DDP training script's checkpoint: {"state_dict": {"module.<key>": ...}, "epoch": 3}
    torch.save({"state_dict": {f"module.{k}": v for k, v in native.items()}, "epoch": 3},
               tmp_path / "ddp.pth")
    assert torch.equal(logits(tmp_path / "ddp.pth", x), expected)


def test_weights_source_records_hash_and_labels(folder: Path) -> None:
    import hashlib

    model = cvt_ref.create_model("cvt-13", folder)
    assert model.weights is not None
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert model.weights.sha256 == digest
    assert model.weights.path == folder / "model.safetensors"


def test_checkpoint_labels_are_used_when_present(tmp_path: Path, folder: Path) -> None:
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): f"thing {i}" for i in range(1000)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = cvt_ref.create_model("cvt-13", tmp_path)
    assert model.weights is not None and model.weights.id2label is not None
    names = cvt_ref.class_names(1000, model.weights.id2label)
    assert names[7] == "thing 7"
    assert cvt_ref.class_names(1000, None)[0] == "tench, Tinca tinca"
    assert cvt_ref.imagenet_synsets()[0] == "n01440764" and len(set(cvt_ref.imagenet_synsets())) == 1000


def _hub_cache(root: Path, folder: Path, repo: str = "microsoft/cvt-13") -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0" * 39 + "1"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, snapshot / name)
    return root


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("cvt-export", *args, env=env)


@pytest.mark.slow
def test_hub_id_loads_from_the_hub_cache_offline(tmp_path: Path, folder: Path) -> None:
    """The real huggingface_hub code path, with the cache as the hub would have left it."""
    cache = _hub_cache(tmp_path / "hub", folder)
    photo = str(cvt_ref.bundled_photos()[0])
    via_hub = _cli("predict", photo, "--weights", "microsoft/cvt-13", "--json",
                   env={"HF_HUB_CACHE": str(cache)})
    via_folder = _cli("predict", photo, "--weights", str(folder), "--json")
    assert via_hub.returncode == 0, via_hub.stderr
    assert json.loads(via_hub.stdout)["results"] == json.loads(via_folder.stdout)["results"]


@pytest.mark.slow
def test_hub_id_offline_and_not_cached_fails_fast(tmp_path: Path) -> None:
    start = time.monotonic()
    result = _cli("predict", "--weights", "microsoft/cvt-13",
                  env={"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert time.monotonic() - start < 60  # a torch import, not a network time-out
    assert result.returncode == 2
    assert "microsoft/cvt-13" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


# --- sources that must be refused ----------------------------------------------------------

class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned-by-checkpoint",))


def _bad_checkpoints(root: Path, folder: Path,
                     hf_state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """name -> (weights spec, a fragment the one-line message must contain)."""
    cases: dict[str, tuple[str, str]] = {}

    def save(name: str, state: dict[str, torch.Tensor]) -> str:
        path = root / f"{name}.safetensors"
        save_file(state, path)
        return str(path)

    missing = dict(hf_state)
    del missing["classifier.weight"]
    cases["missing key"] = (save("missing", missing), "1 missing: head.weight")
    unexpected = {**hf_state, "cvt.encoder.stages.0.extra.weight": torch.zeros(3)}
    cases["unexpected key"] = (save("unexpected", unexpected),
                              "1 unexpected: cvt.encoder.stages.0.extra.weight; the architecture is right")
    # the head's rows set the class count (a fine-tuned head); a bias of another length is refused
    reshaped = {**hf_state, "classifier.weight": torch.zeros(21841, 384)}
    cases["mis-shaped head"] = (save("reshaped", reshaped), "head.bias [1000] vs [21841]")
    # cvt-13 weights asked to be cvt-21: the message names the variants they would fit
    cases["another variant (keys)"] = (str(folder / "model.safetensors") + "|cvt-21",
                                       "these weights fit cvt-13, cvt-13-384, cvt-13-384-22k")
    cases["another variant (config)"] = (str(folder) + "|cvt-21",
                                         "it fits cvt-13, cvt-13-384, cvt-13-384-22k")
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(4096))
    cases["corrupt safetensors"] = (str(corrupt), "not a readable safetensors file")
    good_bin = root / "good.bin"
    torch.save(hf_state, good_bin)
    truncated = root / "truncated.bin"
    truncated.write_bytes(good_bin.read_bytes()[: good_bin.stat().st_size // 3])
    cases["truncated .bin"] = (str(truncated), "not a readable PyTorch checkpoint")
    evil = root / "evil.pth"
    with evil.open("wb") as f:
        pickle.dump({"state_dict": hf_state, "payload": _RunsCode()}, f)
    cases["pickle that runs code"] = (str(evil), "arbitrary code")
    cases["no such path"] = (str(root / "nope.safetensors"), "no such file or folder")
    (root / "empty-folder").mkdir()
    cases["folder without config"] = (str(root / "empty-folder"), "without config.json")
    no_weights = root / "config-only"
    no_weights.mkdir()
    shutil.copy(folder / "config.json", no_weights / "config.json")
    cases["folder without weights"] = (str(no_weights), "holds no model.safetensors or pytorch_model.bin")
    other_model = root / "bert"
    other_model.mkdir()
    (other_model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases["another model type"] = (str(other_model), "model_type is 'bert'")
    not_cvt = {"encoder.layer.0.weight": torch.zeros(2)}
    cases["not a CvT state dict"] = (save("notcvt", not_cvt), "keys look like no CvT checkpoint")
    cases["bad random seed"] = ("random:abc", "seed must be a non-negative integer")
    return cases


BAD = ["missing key", "unexpected key", "mis-shaped head", "another variant (keys)",
       "another variant (config)", "corrupt safetensors", "truncated .bin", "pickle that runs code",
       "no such path", "folder without config", "folder without weights", "another model type",
       "not a CvT state dict", "bad random seed"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, folder: Path,
        hf_state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    cases = _bad_checkpoints(tmp_path_factory.mktemp("bad"), folder, hf_state)
    assert sorted(cases) == sorted(BAD)
    return cases


def _spec(entry: tuple[str, str]) -> tuple[str, str, str]:
    spec, fragment = entry
    weights, _, variant = spec.partition("|")
    return weights, variant or "cvt-13", fragment


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_raises_weights_error(case: str, bad: dict[str, tuple[str, str]],
                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    weights, variant, fragment = _spec(bad[case])
    with pytest.raises(cvt_ref.WeightsError) as info:
        cvt_ref.create_model(variant, weights)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned-by-checkpoint").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_gives_one_line_and_exit_2(case: str, bad: dict[str, tuple[str, str]],
                                                  tmp_path: Path) -> None:
    weights, variant, fragment = _spec(bad[case])
    photo = str(cvt_ref.bundled_photos()[0])
    result = run_cli("cvt-export", "predict", photo, "--variant", variant, "--weights", weights,
                     cwd=tmp_path)
    assert_user_error(result, fragment)
    assert not (tmp_path / "pwned-by-checkpoint").exists()


@pytest.mark.slow
def test_unknown_variant_and_unreadable_image_in_the_cli(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for args, fragment in ((["--variant", "cvt-99"], "unknown variant 'cvt-99'"),
                           ([str(broken)], "cannot read it as an image"),
                           ([str(tmp_path / "missing.jpg")], "no such file")):
        assert_user_error(_cli("predict", *args), fragment)
