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
from helpers import assert_user_error, cosine_rows, run_cli, triton_or_skip

pytestmark = pytest.mark.slow
TIMEOUT_S = 60.0



@pytest.fixture(scope="module")
def repo(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton-repo")
    for precision in ("fp32", "int8"):
        write_repository(exported, out, RepoOptions(name=f"cvt-{precision}", precision=precision,
                                                    preprocess=True, labels=True, max_batch=16))
    return out


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Any]:
    triton_or_skip()
    from cvt_export.triton.server import Server

    with Server(repo) as running:
        yield running
    assert running.guard is None  # stopped


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
        assert record.files and all(len(v) == 64 for v in record.files.values())
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
    # the python runtime's OpenVINO runner converts its FP16 IR from the FP32 file: both travel
    write_repository(folder, repo, RepoOptions(name="ov-fp16", precision="fp16", python_backend="openvino"))
    carried = sorted(p.name for p in (repo / "ov-fp16" / "1" / "artifacts").glob("*.onnx"))
    assert carried == ["model.fp16.onnx", "model.onnx"], carried
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


@pytest.fixture
def not_triton() -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that is not Triton (it answers 404 to every path)."""
    import http.server
    import threading

    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_cvt_bench_triton_refuses_what_it_cannot_measure_before_any_work(
        server: Any, exported: Path, not_triton: str, tmp_path: Path) -> None:
    """Each case is one line and exit 2, decided by asking the server, before the reference runs."""
    import time

    base = ["--url", server.http_url, "--artifacts", str(exported), "--requests", "4", "--concurrency", "1"]
    cases = [
        (["--model", "nope"], "--model nope: not served"),
        (["--model", "cvt-fp32-classifier", "--precision", "fp64"], "fp64"),
        (["--model", "cvt-int8-classifier", "--precision", "fp32"], "runs int8 (its config says)"),
        (["--model", "cvt-fp32"], "takes image"),  # the ensemble takes encoded bytes
        (["--model", "cvt-fp32-classifier", "--rate", "0"], "--rate '0'"),
        (["--model", "cvt-fp32-classifier", "--concurrency", "0"], "--concurrency '0'"),
        (["--model", "cvt-fp32-classifier", "--protocol", "smtp"], "--protocol 'smtp'"),
    ]
    for args, fragment in cases:
        start = time.monotonic()
        result = run_cli("cvt-bench", "triton", *base, *args, timeout=300)
        assert_user_error(result, fragment)
        assert time.monotonic() - start < 30, args  # refused before the reference model's work
    result = run_cli("cvt-bench", "triton", "--url", not_triton, "--artifacts", str(exported), timeout=120)
    assert_user_error(result, "not as a Triton server")
    # a folder made for another input size than the served model's
    other = tmp_path / "size-160"
    from cvt_export import build
    from cvt_export.build import BuildRequest
    from cvt_export.exporter import ExportOptions

    build.build(BuildRequest("cvt-13", "random:0", options=ExportOptions(image_size=160)), other)
    result = run_cli("cvt-bench", "triton", *base, "--model", "cvt-fp32-classifier", "--artifacts",
                     str(other), timeout=300)
    assert_user_error(result, "takes [3, 224, 224], the artifact folder's model takes [3, 160, 160]")


def test_cvt_bench_triton_fails_when_the_answers_are_outside_the_bounds(server: Any, exported: Path,
                                                                        tmp_path: Path) -> None:
    """Judged against another folder's reference (other weights, same shapes: a wrong --artifacts),
    the served answers are far outside the bounds: exit 1, as a failed gate, after saying so."""
    from cvt_export import build
    from cvt_export.build import BuildRequest

    other = tmp_path / "seed-1"
    build.build(BuildRequest("cvt-13", "random:1"), other)
    args = ["--url", server.http_url, "--model", "cvt-fp32-classifier", "--requests", "4",
            "--concurrency", "1"]
    good = run_cli("cvt-bench", "triton", *args, "--artifacts", str(exported), timeout=300)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "served fp32" in good.stdout and "within bounds" in good.stdout, good.stdout
    bad = run_cli("cvt-bench", "triton", *args, "--artifacts", str(other), timeout=300)
    assert bad.returncode == 1 and "OUTSIDE bounds" in bad.stdout, bad.stdout + bad.stderr


def test_cvt_bench_triton_open_loop_reports_windows(server: Any, exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "open.json"
    result = run_cli("cvt-bench", "triton", "--url", server.http_url, "--model", "cvt-fp32-classifier",
                     "--artifacts", str(exported), "--rate", "4", "--requests", "40", "--json", str(out),
                     timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert run["rate"] == 4 and run["answered"] == 40 and run["failed"] == 0
    assert len(run["windows"]) == 5 and sum(w["requests"] for w in run["windows"]) == 40
    low, high = run["spread_ms"]["p99_ms"]
    assert low <= high and run["latency_ms"]["median_ms"] > 0
    # 40 Poisson arrivals at 4/s take about 10 s; far longer means the arrivals were not open loop
    assert 5 < run["seconds"] < 60, run["seconds"]
