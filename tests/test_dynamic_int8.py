"""Dynamic INT8 (`int8dyn`): ONNX Runtime's run-time activation scales, a row of the precision
table. Oracles: the PyTorch reference's logits, the FP32 graph's own Linear layers, and ONNX
Runtime run here directly on the files (not through the project's runner)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import copy_artifacts

from cvt_export import metrics, precisions
from cvt_export.artifacts import ArtifactFolder
from helpers import cosine_rows, run_cli

pytestmark = pytest.mark.slow


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.x64quantprecision", "1")  # exact INT8 sums without VNNI too
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def test_dynamic_int8_is_made_when_asked_and_runs_on_onnx_runtime_only(
        exported: Path, batch_224: torch.Tensor, reference: np.ndarray, tmp_path: Path) -> None:
    folder = copy_artifacts(exported, tmp_path)
    # the calibration images are gone since the export: a file that needs none is still made
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["calibration"]["source"] = str(tmp_path / "deleted-calibration-images")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "report"
    done = run_cli("cvt-bench", "--backend", "ort,openvino,tensorrt", "--precision", "int8,int8dyn",
                   "--artifacts", str(folder), "--batch", "1,4", "--iters", "2", "--warmup", "0",
                   "--limit", "40", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "quantizing to dynamic INT8" in done.stderr
    results = json.loads((out / "report.json").read_text())["results"]
    rows = {(r["backend"], r["precision"]): r for r in results}
    assert rows["ort", "int8dyn"]["status"] == "ok", rows["ort", "int8dyn"]["reason"]
    for backend in ("openvino", "tensorrt"):  # TensorRT needs static scales; OpenVINO: docs/int8-and-tune.md
        assert rows[backend, "int8dyn"]["status"] == "skipped", backend
        assert f"{backend} has no int8dyn path" in rows[backend, "int8dyn"]["reason"]
    # every Linear layer (a MatMul with a constant weight in the FP32 graph) runs on INT8 at run-time scales
    fp32 = onnx.load(str(folder / "model.onnx"))
    weights = {i.name for i in fp32.graph.initializer}
    linear = sum(1 for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in weights)
    dyn = onnx.load(str(folder / "model.int8dyn.onnx"))
    assert sum(n.op_type == "MatMulInteger" for n in dyn.graph.node) == linear > 0
    assert not any(n.op_type == "QuantizeLinear" for n in dyn.graph.node)  # nothing calibrated
    policy = ArtifactFolder.open(folder).entry("int8dyn").policy
    assert policy is not None and policy.dynamic_matmuls == linear
    # against the PyTorch reference, run by ONNX Runtime directly: within the row's bound
    x = batch_224.numpy()
    got = np.concatenate([_run(folder / "model.int8dyn.onnx", x[i:i + 4]) for i in range(0, len(x), 4)])
    assert cosine_rows(reference, got).min() >= metrics.BOUNDS["int8dyn"]["cosine_min"]
    # the catch: an image's answer depends on its batch-mates (static INT8's does not)
    for name, moves in (("model.int8dyn.onnx", True), ("model.int8.onnx", False)):
        alone, together = _run(folder / name, x[:1]), _run(folder / name, x[:4])[:1]
        assert (float(np.abs(alone - together).max()) > 1e-3) is moves, name
    assert rows["ort", "int8dyn"]["batch_consistency_cosine_min"] < 0.99999
    assert rows["ort", "int8"]["batch_consistency_max_abs"] < 1e-4
    # the default run leaves it out until it is made; once made, it runs by default
    assert "int8dyn" not in precisions.DEFAULT_EXPORT and precisions.get("int8dyn").opt_in
    again = run_cli("cvt-bench", "--backend", "torch,ort", "--artifacts", str(folder), "--batch", "1",
                    "--iters", "1", "--warmup", "0", "--limit", "12", "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    ran = {r["precision"] for r in json.loads((tmp_path / "again" / "report.json").read_text())["results"]}
    assert "int8dyn" in ran
