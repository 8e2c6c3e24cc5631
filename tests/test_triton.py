"""Triton: repositories checked against Triton's own schema and the model files, and a real
tritonserver (PyPI's nvidia-pytriton binary) serving cvt-13 FP32 and INT8 on 127.0.0.1.

Oracles: the PyTorch reference's logits and its top-5 labels (what `predict` prints), and each
image's single-request answer for the concurrent run. Every request has a time-out; the number of
requests is fixed; the server is stopped by its context manager whatever happens."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import copy_artifacts

import cvt_ref
from cvt_export.triton import TritonError
from cvt_export.triton.repository import RepoOptions, parse_config, validate_repository, write_repository
from helpers import assert_user_error, cosine_rows, run_cli

pytestmark = pytest.mark.slow
TIMEOUT_S = 60.0


def _server_or_skip() -> None:
    from cvt_export.triton.server import triton_home

    try:
        triton_home()
    except TritonError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def repo(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton-repo")
    for precision in ("fp32", "int8"):
        write_repository(exported, out, RepoOptions(name=f"cvt-{precision}", precision=precision,
                                                    preprocess=True, labels=True, max_batch=16))
    return out


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Any]:
    _server_or_skip()
    from cvt_export.triton.server import Server

    with Server(repo) as running:
        yield running
    assert running.process is None  # stopped


def _bytes(path: Path) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)[None]


def _infer(server: Any, protocol: str, model: str, image: np.ndarray, class_count: int = 0,
           datatype: str = "UINT8", input_name: str = "image") -> Any:
    if protocol == "http":
        import tritonclient.http as client
        url = server.http_url
    else:
        import tritonclient.grpc as client  # type: ignore[no-redef]
        url = server.grpc_url
    conn = client.InferenceServerClient(url, **({"network_timeout": TIMEOUT_S} if protocol == "http" else {}))
    item = client.InferInput(input_name, list(image.shape), datatype)
    item.set_data_from_numpy(image)
    outputs = [client.InferRequestedOutput("logits", class_count=class_count)]
    kwargs = {"client_timeout": TIMEOUT_S} if protocol == "grpc" else {}
    return conn.infer(model, [item], outputs=outputs, **kwargs).as_numpy("logits")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_logits_and_labels_match_the_reference(server: Any, protocol: str, photos: list[Path],
                                                      reference: np.ndarray, exported: Path,
                                                      split: tuple[Path, list[Path]]) -> None:
    from cvt_export.backends import get_backend

    labels = cvt_ref.imagenet_labels()
    held = [photos.index(p) for p in split[1]]
    pixels = cvt_ref.preprocess_batch(list(photos), "cvt-13").numpy()
    with get_backend("ort").compile(exported, "int8") as run:  # the same file, in-process, one by one
        in_process_int8 = np.concatenate([run(pixels[i:i + 1]) for i in range(len(pixels))])
    for precision in ("fp32", "int8"):
        got = np.concatenate([_infer(server, protocol, f"cvt-{precision}", _bytes(p)) for p in photos])
        assert got.shape == reference.shape
        if precision == "fp32":
            assert np.abs(got - reference).max() <= 1e-4
        else:
            assert cosine_rows(got[held], reference[held]).min() >= 0.995
        for i, photo in enumerate(photos):
            top = _infer(server, protocol, f"cvt-{precision}", _bytes(photo), class_count=5)[0]
            served = [entry.decode().split(":", 2)[2] for entry in top]
            assert served == [labels[j] for j in np.argsort(-got[i])[:5]]  # the extension's own labels
            # FP32: what `predict` prints (the PyTorch reference's top-5). INT8: the same file run
            # in-process (random weights give flat logits whose INT8 top-5 order differs from FP32's
            # on 6 of the 11 photos, served or not).
            oracle = reference[i] if precision == "fp32" else in_process_int8[i]
            assert served == [labels[j] for j in np.argsort(-oracle)[:5]], (precision, photo.name)


def test_concurrent_requests_are_batched_and_answered_once(server: Any, photos: list[Path]) -> None:
    import tritonclient.http as client

    single = {p.name: _infer(server, "http", "cvt-fp32", _bytes(p)) for p in photos}
    work = [photos[i % len(photos)] for i in range(240)]

    def one(path: Path) -> tuple[str, np.ndarray]:
        return path.name, _infer(server, "http", "cvt-fp32", _bytes(path))

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(one, work, timeout=600))
    assert len(answers) == len(work)
    for name, logits in answers:
        assert np.abs(logits - single[name]).max() <= 1e-4, name
    stats = client.InferenceServerClient(server.http_url).get_inference_statistics("cvt-fp32-classifier")
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["model_stats"][0]["batch_stats"]}
    assert max(sizes) > 1, sizes  # dynamic batching put several requests in one execution
    assert sum(size * count for size, count in sizes.items()) >= len(work) + len(photos)


def test_bad_requests_get_an_error_and_the_server_keeps_serving(server: Any, photos: list[Path],
                                                                batch_224: Any) -> None:
    from tritonclient.utils import InferenceServerException

    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "cvt-fp32", "image": np.frombuffer(b"not an image" * 8, np.uint8)[None]},
         "cannot read it as an image"),
        ({"model": "cvt-fp32", "image": np.zeros((1, 16), np.float32), "datatype": "FP32"}, "FP32"),
        ({"model": "cvt-fp32-classifier", "image": np.zeros((1, 3, 100, 100), np.float32),
          "datatype": "FP32", "input_name": "pixel_values"}, "shape"),
        ({"model": "cvt-fp32-classifier", "image": np.full((1, 3, 224, 224), np.nan, np.float32),
          "datatype": "FP32", "input_name": "pixel_values"}, "NaN"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(InferenceServerException) as info:
            _infer(server, "http", **kwargs)
        assert fragment in str(info.value), str(info.value)
        assert _infer(server, "http", "cvt-fp32", _bytes(photos[0])).shape == (1, 1000)


def test_native_runtime_repositories_are_checked(exported: Path, tmp_path: Path) -> None:
    """Generated and validated here (schema + model files); not served here: the PyPI server has
    no onnxruntime/openvino/tensorrt backends and there is no GPU."""
    folder = copy_artifacts(exported, tmp_path)
    repo = tmp_path / "native"
    for runtime, precision, extra in (("onnxruntime", "int8", {}), ("openvino", "fp32", {}),
                                      ("onnxruntime", "fp16", {"gpu": True, "accelerator": "tensorrt"})):
        name = f"{runtime}-{precision}"
        record = write_repository(folder, repo, RepoOptions(name=name, runtime=runtime,  # type: ignore[arg-type]
                                                            precision=precision, labels=True, **extra))
        config = parse_config(repo / name / "config.pbtxt")
        assert config.max_batch_size == 32 and list(config.output[0].dims) == [1000]
        assert record["files"] and all(len(v) == 64 for v in record["files"].values())
    config = parse_config(repo / "onnxruntime-fp16" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx"
    assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert parse_config(repo / "openvino-fp32" / "config.pbtxt").backend == "openvino"
    # a typo in a field name, and dims that disagree with the model file, are refused
    bad = repo / "onnxruntime-int8" / "config.pbtxt"
    good = bad.read_text()
    bad.write_text(good.replace("max_batch_size", "max_batch_sise"))
    with pytest.raises(TritonError, match="not a valid Triton ModelConfig"):
        parse_config(bad)
    bad.write_text(good.replace("dims: 1000", "dims: 1001"))
    with pytest.raises(TritonError, match=r"logits dims \[1001\]"):
        validate_repository(repo, ["onnxruntime-int8"])
    with pytest.raises(TritonError, match="runner runs fp32, fp16, int8"):  # ORT has no BF16 path
        write_repository(folder, repo, RepoOptions(name="bf16", precision="bf16"))
    shutil.rmtree(repo)
    # TensorRT engines are made by `cvt-export trt`, which needs TensorRT and a GPU
    result = run_cli("cvt-export", "triton", "--artifacts", str(folder), "--runtime", "tensorrt",
                     "--precision", "fp16", "--out", str(repo))
    assert_user_error(result, "tensorrt")


def test_cvt_bench_triton_measures_the_served_model(server: Any, exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "served.json"
    result = run_cli("cvt-bench", "triton", "--url", server.http_url, "--model", "cvt-int8-classifier",
                     "--artifacts", str(exported), "--precision", "int8", "--concurrency", "1,4",
                     "--requests", "24", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["fidelity"]["pass"] and report["fidelity"]["cosine_min"] >= 0.995
    assert [r["concurrency"] for r in report["runs"]] == [1, 4]
    assert all(r["requests"] == 24 and r["server"]["requests"] == 24 for r in report["runs"])
    assert_user_error(run_cli("cvt-bench", "triton", "--url", "127.0.0.1:1", "--artifacts", str(exported)),
                      "no Triton server answers")
