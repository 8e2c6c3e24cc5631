"""ONNX artifacts of the real cvt-13 on real photographs, run on two real backends.

Oracles: the PyTorch reference (itself pinned to transformers in test_model.py), ONNX Runtime
and OpenVINO as two independent executors, and TensorRT's documented Q/DQ rules re-stated
here rather than imported from the code under test.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import cvt_ref
from cvt_export import artifacts, build, calibration, derive, machine, metrics
from cvt_export import exporter as onnx_export
from cvt_export.build import BuildRequest
from cvt_export.exporter import ExportOptions
from cvt_ref.source import sha256_file
from helpers import assert_user_error, cosine_rows, run_cli

CVT13 = cvt_ref.VARIANTS["cvt-13"]


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT's documented switch for x86 CPUs without VNNI (u8·u8 instead of saturating u8·s8 kernels)
    so.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"pixel_values": x})[0])


def ov_run(path: Path, x: np.ndarray) -> np.ndarray:
    """OpenVINO CPU with FP32 inference precision pinned (its default here would be BF16)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    return np.array(compiled(x)[0], copy=True)


RUNNERS = {"onnxruntime": ort_run, "openvino": ov_run}


# --- FP32 --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.slow)])
def test_fp32_matches_reference_at_batch_1_and_8(exported: Path, batch_224: torch.Tensor,
                                                 reference: np.ndarray, backend: str) -> None:
    run = RUNNERS[backend]
    x = batch_224.numpy()
    singles = np.concatenate([run(exported / "model.onnx", x[i:i + 1]) for i in range(8)])
    batched = run(exported / "model.onnx", x[:8])
    assert np.abs(singles - reference[:8]).max() <= 1e-4
    assert np.abs(batched - reference[:8]).max() <= 1e-4
    assert np.abs(batched - singles).max() <= 1e-5


def test_fp32_graph_is_what_the_issue_asks(exported: Path) -> None:
    proto = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["LayerNormalization"] == 2 * sum(CVT13.depths) + 3 + 1  # blocks, embeddings, head
    assert ops["Gelu"] == sum(CVT13.depths) and "Erf" not in ops
    assert "BatchNormalization" not in ops and "Einsum" not in ops
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("pixel_values", "logits")
    batch_dim = inp.type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 224, 224]
    assert out.type.tensor_type.shape.dim[0].dim_param == batch_dim.dim_param
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 20


def test_metadata_and_manifest_describe_the_files(exported: Path) -> None:
    proto = onnx.load(str(exported / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["cvt.variant"] == "cvt-13" and meta["cvt.weights"] == "random:0"
    assert meta["cvt.image_size"] == "224"
    pre = json.loads(meta["cvt.preprocess"])
    assert pre["resize"] == 256 and pre["mean"] == [0.485, 0.456, 0.406]
    labels = json.loads(meta["cvt.labels"])
    assert len(labels) == 1000 and labels[0] == cvt_ref.imagenet_labels()[0]
    assert "onnxruntime" in json.loads(meta["cvt.tools"])

    manifest = artifacts.ArtifactFolder.open(exported).manifest
    assert set(manifest.files) == {"model.onnx", "model.fp16.onnx", "model.int8.onnx"}
    for name, entry in manifest.files.items():
        assert entry.sha256 == sha256_file(exported / name) and entry.graph is not None
        file_proto = onnx.load(str(exported / name), load_external_data=False)
        assert entry.graph.ops == dict(Counter(n.op_type for n in file_proto.graph.node))
        assert entry.graph.inputs[0].dtype == "float32"
    assert manifest.calibration is not None and manifest.calibration.images == 6
    assert not list(exported.glob(".staging-*")) and not list(exported.glob("*.tmp"))


# --- FP16 --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", RUNNERS)
def test_fp16_fidelity(exported: Path, batch_224: torch.Tensor, reference: np.ndarray,
                       backend: str) -> None:
    got = RUNNERS[backend](exported / "model.fp16.onnx", batch_224.numpy())
    cos = cosine_rows(reference, got)
    print(f"fp16 on {backend}: cosine min {cos.min():.7f}, max-abs {np.abs(got - reference).max():.2e}")
    assert cos.min() >= 0.9999
    assert (got.argmax(1) == reference.argmax(1)).all()


def test_fp16_file_follows_the_precision_policy(exported: Path) -> None:
    proto = onnx.load(str(exported / "model.fp16.onnx"))
    graph = proto.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             [*graph.input, *graph.output, *onnx.shape_inference.infer_shapes(proto).graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert types["pixel_values"] == fp32 and types["logits"] == fp32
    weights = [types[i] for n in graph.node if n.op_type in ("MatMul", "Conv") for i in n.input[1:2]]
    assert weights and all(t == fp16 for t in weights)
    for n in graph.node:
        if n.op_type in ("LayerNormalization", "Softmax", "Gemm"):
            assert types[n.input[0]] == fp32, f"{n.op_type} {n.name} does not run in FP32"


# --- INT8 --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", RUNNERS)
def test_int8_fidelity_on_held_out_photos(exported: Path, model: cvt_ref.CvT,
                                          split: tuple[Path, list[Path]], backend: str) -> None:
    if backend == "openvino" and not machine.int8_dot_exact():
        pytest.skip(f"OpenVINO INT8 saturates on a CPU without VNNI/AMX ({', '.join(machine.isa())})")
    held = cvt_ref.preprocess_batch(list(split[1]), CVT13).numpy()
    with torch.inference_mode():
        ref = model(torch.from_numpy(held)).numpy()
    got = RUNNERS[backend](exported / "model.int8.onnx", held)
    cos = cosine_rows(ref, got)
    print(f"int8 on {backend}: cosine min {cos.min():.5f} on {len(held)} held-out photos")
    assert cos.min() >= 0.995


def _initializer(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))


def test_int8_qdq_follows_tensorrt_explicit_quantization_rules(exported: Path) -> None:
    """TensorRT developer guide, 'Explicit Quantization': symmetric INT8 (zero point 0), Q/DQ
    on the inputs of the layers to run in INT8, per-channel weight scales on the output axis."""
    proto = onnx.load(str(exported / "model.int8.onnx"))
    producer = {o: n for n in proto.graph.node for o in n.output}
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        scale, zero = _initializer(proto, n.input[1]), _initializer(proto, n.input[2])
        assert zero.dtype == np.int8 and not zero.any(), n.name
        assert np.isfinite(scale).all() and (scale > 0).all(), n.name

    def dequantized(name: str) -> bool:
        return name in producer and producer[name].op_type == "DequantizeLinear"

    for n in proto.graph.node:
        depthwise = n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
        if n.op_type == "MatMul" or (n.op_type == "Conv" and not depthwise):
            assert dequantized(n.input[0]) and dequantized(n.input[1]), f"{n.name} not INT8"
            weight_dq = producer[n.input[1]]
            if weight_dq.input[0] in {t.name for t in proto.graph.initializer}:
                w = _initializer(proto, weight_dq.input[0])
                axis = next((a.i for a in weight_dq.attribute if a.name == "axis"), 1) % w.ndim
                assert w.dtype == np.int8
                assert axis == (0 if n.op_type == "Conv" else w.ndim - 1), n.name
                assert _initializer(proto, weight_dq.input[1]).size == w.shape[axis]
        elif n.op_type in ("LayerNormalization", "Softmax", "Gelu", "Add", "Gemm") or depthwise:
            assert not any(dequantized(i) for i in n.input), f"{n.op_type} {n.name} fed by DQ"
    assert derive.tensorrt_qdq_problems(proto) == []


def test_qdq_rule_check_catches_an_asymmetric_zero_point(exported: Path) -> None:
    proto = onnx.load(str(exported / "model.int8.onnx"))
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear")
    zp = next(t for t in proto.graph.initializer if t.name == dq.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(zp).shape, 3, np.int8), zp.name))
    assert any("zero point" in p for p in derive.tensorrt_qdq_problems(proto))


def _scales(path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path))
    return {n.input[0]: _initializer(proto, n.input[1]) for n in proto.graph.node
            if n.op_type == "QuantizeLinear"}


@pytest.mark.slow
def test_calibration_cache_is_reused_and_keyed(exported: Path, split: tuple[Path, list[Path]],
                                               tmp_path: Path, cache: Path) -> None:
    manifest = json.loads((exported / "manifest.json").read_text())
    key = manifest["calibration"]["cache_key"]
    cached = calibration.cache_path(key)
    assert cached.parent.parent == cache and cached.is_file()
    # Tamper with the cached ranges: a rebuild that really reads the cache must show them.
    data = json.loads(cached.read_text())
    for tensor in data["data"].values():
        for bound in ("lowest", "highest"):
            tensor[bound]["data"] = [2 * v for v in tensor[bound]["data"]]
    cached.write_text(json.dumps(data))
    out = tmp_path / "again"
    shutil.copytree(exported, out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "files": {
        k: v for k, v in manifest["files"].items() if k != "model.int8.onnx"}}))
    result = build.build(BuildRequest("cvt-13", "random:0", precisions=("int8",), calib=split[0]), out)
    assert result.calibrated is False and "model.onnx" in result.reused
    before, after = _scales(exported / "model.int8.onnx"), _scales(out / "model.int8.onnx")
    act = [k for k in before if before[k].size == 1 and not k.endswith("_quantized")]
    assert act and all(np.allclose(after[k], 2 * before[k], rtol=1e-3) for k in act)
    # Another method is another key: it calibrates.
    other = build.build(BuildRequest("cvt-13", "random:0", precisions=("int8",), calib=split[0],
                                     int8=derive.Int8Options(method="percentile")), out)
    assert other.calibrated is True


# --- the folder ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_failed_validation_leaves_the_previous_export_valid(exported: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "keep"
    shutil.copytree(exported, out)
    (out / ".staging-from-a-killed-export").mkdir()  # a writer killed mid-way leaves this
    before = {p.name: sha256_file(p) for p in out.iterdir() if p.is_file()}
    monkeypatch.setitem(metrics.BOUNDS["fp32"], "max_abs", 1e-12)  # any real export now "fails"
    with pytest.raises(onnx_export.ExportError, match="differs from PyTorch"):
        build.build(BuildRequest("cvt-13", "random:1", force=True), out)
    assert {p.name: sha256_file(p) for p in out.iterdir() if p.is_file()} == before
    assert not list(out.glob(".staging-*"))
    empty = tmp_path / "fresh"
    with pytest.raises(onnx_export.ExportError):
        build.build(BuildRequest("cvt-13", "random:1"), empty)
    assert artifacts.ArtifactFolder.existing(empty) is None
    assert not list(empty.glob("*.onnx"))


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    with (out / artifacts.LOCK).open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(artifacts.ArtifactError, match="another cvt-export command"):
            build.build(BuildRequest("cvt-13", "random:0"), out)


# --- every variant, and the options ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", list(cvt_ref.VARIANTS))
def test_every_variant_exports_and_validates(name: str, tmp_path: Path) -> None:
    variant = cvt_ref.VARIANTS[name].with_depths(1, 1, 1)
    model = cvt_ref.create_model(variant, "random:3")
    path = tmp_path / "model.onnx"
    onnx_export.export_fp32(model, variant, path, ExportOptions())
    images = cvt_ref.preprocess_batch(cvt_ref.bundled_photos()[:3], variant).numpy()
    with torch.inference_mode():
        ref = model(torch.from_numpy(images)).numpy()
    assert np.abs(ort_run(path, images) - ref).max() <= 1e-4
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[2:]] == [variant.image_size] * 2


@pytest.mark.heavy
def test_opset_17_fixed_batch_and_image_size(tmp_path: Path) -> None:
    variant = CVT13.with_depths(1, 1, 1)
    model = cvt_ref.create_model(variant, "random:4")
    sized = variant.at_size(160)
    path = tmp_path / "model.onnx"
    onnx_export.export_fp32(model, sized, path, ExportOptions(opset=17, batch=3, image_size=160))
    proto = onnx.load(str(path))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [3, 3, 160, 160]
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["LayerNormalization"] == 2 * 3 + 3 + 1 and "Gelu" not in ops  # Gelu is opset 20
    x = np.random.default_rng(0).standard_normal((3, 3, 160, 160)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(ort_run(path, x) - ref).max() <= 1e-4
    assert np.abs(ov_run(path, x) - ref).max() <= 1e-4


# --- the command line --------------------------------------------------------------------

@pytest.mark.slow
def test_cli_exports_then_adds_a_precision_without_exporting_again(tmp_path: Path) -> None:
    out = tmp_path / "art"
    first = run_cli("cvt-export", "onnx", "--variant", "cvt-13", "--weights", "random:0",
                    "--out", str(out), env={"CVT_EXPORT_CACHE": str(tmp_path / "cache")})
    assert first.returncode == 0, first.stderr
    assert "model.onnx" in first.stdout and "made" in first.stdout
    onnx_sha = sha256_file(out / "model.onnx")
    second = run_cli("cvt-export", "onnx", "--variant", "cvt-13", "--weights", "random:0",
                     "--precision", "fp16", "--out", str(out))
    assert second.returncode == 0, second.stderr
    assert sha256_file(out / "model.onnx") == onnx_sha
    files = artifacts.ArtifactFolder.open(out).files()
    assert set(files) == {"model.onnx", "model.fp16.onnx"}
    assert files["model.fp16.onnx"].made_from == onnx_sha


@pytest.mark.slow
def test_cli_bad_inputs_give_one_line_and_exit_2(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    bad_weights = tmp_path / "w.safetensors"
    bad_weights.write_bytes(os.urandom(256))
    no_images = tmp_path / "no-images"
    no_images.mkdir()
    (no_images / "notes.txt").write_text("not an image")
    out = str(tmp_path / "out")
    cases = [
        (["--variant", "cvt-99"], "unknown variant 'cvt-99'"),
        (["--weights", str(bad_weights), "--out", out], "w.safetensors"),
        (["--out", str(a_file)], "is a file"),
        (["--precision", "int8", "--calib", str(no_images), "--out", out], "holds no images"),
        (["--precision", "int8", "--calib", str(tmp_path / "missing"), "--out", out], "no such folder"),
        (["--precision", "int4", "--out", out], "--precision"),
        (["--opset", "13", "--out", out], "--opset 13"),
        (["--batch", "0", "--out", out], "--batch 0"),
        (["--precision", "int8", "--smooth", "1.5", "--out", out], "--smooth '1.5'"),
        (["--precision", "int8", "--smooth", "strong", "--out", out], "--smooth 'strong'"),
    ]
    for args, fragment in cases:
        assert_user_error(run_cli("cvt-export", "onnx", *args), fragment)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path).glob("out/*.onnx"))


def test_calibration_set_counts_and_warns(tmp_path: Path, photos: list[Path]) -> None:
    for p in photos[:3]:
        shutil.copy(p, tmp_path / p.name)
    chosen, warning = calibration.calibration_set(tmp_path, 2)
    assert len(chosen.paths) == 2 and warning is None
    chosen, warning = calibration.calibration_set(tmp_path, 5)
    assert len(chosen.paths) == 3 and warning is not None and "5 images asked" in warning
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(cvt_ref.ImageError, match=r"broken\.jpg"):  # refused before any export work
        calibration.calibration_set(tmp_path)


@pytest.mark.slow
def test_qdq_rule_check_flags_quantized_outputs(tmp_path: Path, photos: list[Path]) -> None:
    """ORT's default placement (Q/DQ on outputs too) leaves DQs that reach LayerNorm: flagged."""
    variant = CVT13.with_depths(1, 1, 1)
    model = cvt_ref.create_model(variant, "random:5")
    fp32 = tmp_path / "model.onnx"
    onnx_export.export_fp32(model, variant, fp32, ExportOptions())
    images = cvt_ref.preprocess_batch(photos[:4], variant).numpy()
    ours, naive = tmp_path / "ours.onnx", tmp_path / "naive.onnx"
    derive.to_int8(fp32, ours, images, derive.Int8Options(), tmp_path / "c1.json")
    with pytest.raises(onnx_export.ExportError, match="TensorRT would refuse"):
        derive.to_int8(fp32, naive, images, derive.Int8Options(quantize_outputs=True),
                          tmp_path / "c2.json")
    derive.to_int8(fp32, naive, images, derive.Int8Options(quantize_outputs=True),
                      tmp_path / "c2.json", tensorrt_rules=False)
    problems = derive.tensorrt_qdq_problems(onnx.load(str(naive)))
    assert any("reaches" in p and "LayerNormalization" in p for p in problems)


@pytest.mark.heavy
def test_calibration_counts_its_images(tmp_path: Path, photos: list[Path]) -> None:
    """INT8 calibration says how far it is, one step per image ONNX Runtime actually reads, so a
    log shows "(k/N, about T s left)" for a long calibration (the cache hit reads none)."""
    variant = CVT13.with_depths(1, 1, 1)
    fp32 = tmp_path / "model.onnx"
    onnx_export.export_fp32(cvt_ref.create_model(variant, "random:5"), variant, fp32, ExportOptions())
    images = cvt_ref.preprocess_batch(photos[:3], variant).numpy()
    heard: list[str] = []
    derive.to_int8(fp32, tmp_path / "q.onnx", images, derive.Int8Options(), tmp_path / "c.json",
                      progress=heard.append)
    assert heard == [f"calibrating INT8 on 3 images ({k}/3)" for k in (1, 2, 3)]
    heard.clear()
    made = derive.to_int8(fp32, tmp_path / "q2.onnx", images, derive.Int8Options(), tmp_path / "c.json",
                             progress=heard.append)
    assert heard == [] and not made.calibrated
