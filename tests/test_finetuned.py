"""The paths users walk: a fine-tuned head (10 classes, its own labels), sharded and original-format
saves, and a custom image size, from checkpoint to export, benchmark and regression gate.

The oracle is transformers' CvtForImageClassification built with num_labels=10 and the labels
below, its weights set in its own parameter space (conftest.scramble)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import scramble
from test_model import original_state_dict

import cvt_ref
from cvt_export import build, regress
from cvt_export.artifacts import ArtifactFolder
from cvt_export.backends import get_backend
from cvt_export.harness import bench
from helpers import cosine_rows, int8_backends, run_cli

pytestmark = pytest.mark.slow

LABELS = ["apple", "bicycle", "cat", "dog", "espresso", "fern", "gravel", "hubble", "icicle", "jet"]


@pytest.fixture(scope="module")
def hf10() -> torch.nn.Module:
    from transformers import CvtConfig, CvtForImageClassification

    config = CvtConfig(**{**cvt_ref.get_variant("cvt-13").hf_config(), "num_labels": 10},
                       id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    return scramble(CvtForImageClassification(config), 7)


@pytest.fixture(scope="module")
def folder10(hf10: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cvt13-10")
    hf10.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def oracle10(hf10: torch.nn.Module, batch_224: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return hf10(pixel_values=batch_224).logits.numpy()


def test_a_10_class_transformers_folder_loads_with_its_labels(folder10: Path, oracle10: np.ndarray,
                                                              batch_224: torch.Tensor) -> None:
    model = cvt_ref.create_model("cvt-13", folder10)
    assert model.variant.num_classes == 10
    assert model.weights is not None and cvt_ref.class_names(10, model.weights.id2label) == LABELS
    with torch.inference_mode():
        ours = model(batch_224).numpy()
    assert ours.shape == (len(batch_224), 10)
    assert np.abs(ours - oracle10).max() <= 1e-4


def test_predict_prints_the_checkpoints_own_labels(folder10: Path, oracle10: np.ndarray,
                                                   photos: list[Path]) -> None:
    result = run_cli("cvt-export", "predict", str(photos[0]), "--weights", str(folder10), "--top", "20",
                     "--json")
    assert result.returncode == 0, result.stderr
    top = json.loads(result.stdout)["results"][0]["top"]
    assert len(top) == 10  # --top 20 on a 10-class head shows the 10
    assert top[0]["label"] == LABELS[int(np.argmax(oracle10[0]))]


def test_sharded_and_original_format_10_class_checkpoints(hf10: torch.nn.Module, oracle10: np.ndarray,
                                                          batch_224: torch.Tensor, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    hf10.save_pretrained(sharded, max_shard_size="20MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    pth = tmp_path / "CvT-13-10cls.pth"
    torch.save({"state_dict": original_state_dict(hf10)}, pth)
    for weights, activation, labels in ((sharded, None, LABELS),
                                        (pth, "gelu", [f"class {i}" for i in range(10)])):
        model = cvt_ref.create_model("cvt-13", weights, activation=activation)  # type: ignore[arg-type]
        assert model.weights is not None
        assert cvt_ref.class_names(model.variant.num_classes, model.weights.id2label) == labels
        with torch.inference_mode():
            assert np.abs(model(batch_224).numpy() - oracle10).max() <= 1e-4, weights


@pytest.fixture(scope="module")
def exported10(folder10: Path, split: tuple[Path, list[Path]],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported10")
    build.build(build.BuildRequest("cvt-13", str(folder10), precisions=("fp32", "fp16", "int8"),
                                   calib=split[0]), out)
    return out


def test_export_gives_10_logits_matching_transformers(exported10: Path, oracle10: np.ndarray,
                                                      batch_224: torch.Tensor, photos: list[Path],
                                                      split: tuple[Path, list[Path]]) -> None:
    manifest = ArtifactFolder.open(exported10).manifest
    assert manifest.labels == tuple(LABELS) and manifest.source.num_classes == 10
    proto = onnx.load(str(exported10 / "model.onnx"), load_external_data=False)
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out_dims][1] == 10
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["cvt.labels"]) == LABELS
    x = batch_224.numpy()
    held = [photos.index(p) for p in split[1]]
    for backend in ("ort", "openvino"):
        for precision in ("fp32", "fp16", "int8"):
            if precision == "int8" and backend not in int8_backends():
                continue
            with get_backend(backend).compile(exported10, precision) as run:
                got = run(x)
            assert got.shape == (len(x), 10)
            if precision == "fp32":
                assert np.abs(got - oracle10).max() <= 1e-4, backend
            else:
                rows = held if precision == "int8" else list(range(len(x)))
                floor = 0.995 if precision == "int8" else 0.999
                assert cosine_rows(got[rows], oracle10[rows]).min() >= floor, (backend, precision)


def test_bench_and_regress_on_the_finetuned_export(exported10: Path, oracle10: np.ndarray,
                                                   photos: list[Path], tmp_path: Path) -> None:
    dataset = tmp_path / "val"
    for i in range(4):  # each photo in the folder of transformers' own top-1 label for it
        folder = dataset / LABELS[int(np.argmax(oracle10[i]))]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[i], folder / photos[i].name)
    cfg = bench.BenchConfig(backends=("ort", "openvino"), precisions=("fp32", "int8"), batches=(1, 2),
                            artifacts=exported10, dataset=dataset, warmup=0, iters=1)
    rep = bench.run(cfg)
    assert rep.inputs.labelled
    rows = {(r.backend, r.precision): r for r in rep.results}
    expected = {key: "ok" if key != ("openvino", "int8") or "openvino" in int8_backends() else "skipped"
                for key in rows}
    assert {k: r.status for k, r in rows.items()} == expected, [r.reason for r in rows.values()]
    for key in (("torch", "fp32"), ("ort", "fp32"), ("openvino", "fp32")):
        acc = rows[key].accuracy
        assert acc is not None and (acc.top1, acc.top5) == (1.0, 1.0), key
    baseline = tmp_path / "baseline.json"
    quick = {"backends": ("ort",), "precisions": ("fp32", "int8"), "iters": 1}
    made = regress.run(baseline, update=True, artifacts_dir=exported10, max_slowdown=None, **quick)
    assert made.updated
    assert regress.decode(regress.load_baseline(baseline).reference.logits).shape[1] == 10
    again = regress.run(baseline, update=False, artifacts_dir=exported10, max_slowdown=None, **quick)
    assert again.findings == []


def test_a_custom_image_size_runs_export_bench_and_regress(tmp_path: Path) -> None:
    art = tmp_path / "a160"
    steps = [
        ("cvt-export", "onnx", "--image-size", "160", "--precision", "fp32,int8", "--smooth", "0.5",
         "--out", str(art)),
        ("cvt-bench", "--backend", "all", "--precision", "fp32,int8", "--batch", "1,2",
         "--iters", "1", "--warmup", "0", "--limit", "30", "--artifacts", str(art)),
        ("cvt-bench", "regress", "--update", "--baseline", str(tmp_path / "b160.json"), "--artifacts",
         str(art), "--iters", "1", "--backend", "ort,openvino", "--precision", "fp32,int8"),
        ("cvt-bench", "regress", "--baseline", str(tmp_path / "b160.json"), "--artifacts", str(art),
         "--iters", "1", "--backend", "ort,openvino", "--precision", "fp32,int8"),
    ]
    for tool, *args in steps:
        result = run_cli(tool, *args, cwd=tmp_path)
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
    report = json.loads((art / "report" / "report.json").read_text())
    assert report["inputs"]["image_size"] == 160
    ran = {(r["backend"], r["precision"]): r["status"] for r in report["results"]}
    assert ran[("torch", "int8")] == "skipped"  # no such path in PyTorch
    assert all(ran[(b, p)] == "ok" for b in ("ort", "openvino") for p in ("fp32", "int8")
               if p == "fp32" or b in int8_backends())
    if "openvino" not in int8_backends():
        assert ran[("openvino", "int8")] == "skipped"
