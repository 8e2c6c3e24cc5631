"""Measure a model served by Triton as clients see it (the harness for a remote backend):
fidelity of the answers, latency and throughput per concurrency, and Triton's own statistics
(queue vs compute time, executed batch sizes).

Requests are bounded in number (and each in time); the clients are threads of this process,
so on a small machine they compete with the server for the same cores (the report says how
many there are).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvt_export import metrics
from cvt_export.triton import TritonError

TIMEOUT_S = 60.0
STATS_SETTLE_S = 5.0  # longest wait for the server statistics to count every answered request


@dataclass(frozen=True)
class Target:
    url: str
    model: str
    protocol: str = "http"        # http | grpc
    input_name: str = "pixel_values"
    datatype: str = "FP32"

    def client(self) -> Any:
        try:
            if self.protocol == "http":
                import tritonclient.http as http

                return http.InferenceServerClient(self.url, connection_timeout=TIMEOUT_S,
                                                  network_timeout=TIMEOUT_S)
            if self.protocol == "grpc":
                import tritonclient.grpc as grpc

                return grpc.InferenceServerClient(self.url)
        except ImportError:
            raise TritonError("tritonclient is not installed: pip install 'cvt-export[triton]'") from None
        raise TritonError(f"--protocol {self.protocol!r}: use http or grpc")

    def module(self) -> Any:
        if self.protocol == "http":
            import tritonclient.http as http

            return http
        import tritonclient.grpc as grpc

        return grpc


def infer(target: Target, client: Any, x: np.ndarray) -> np.ndarray:
    module = target.module()
    item = module.InferInput(target.input_name, list(x.shape), target.datatype)
    item.set_data_from_numpy(x)
    kwargs = {"client_timeout": TIMEOUT_S} if target.protocol == "grpc" else {}
    return np.asarray(client.infer(target.model, [item], **kwargs).as_numpy("logits"), dtype=np.float32)


def _stats(client: Any, model: str, protocol: str) -> dict[str, Any]:
    raw = client.get_inference_statistics(model, as_json=True) if protocol == "grpc" else \
        client.get_inference_statistics(model)
    entry = raw["model_stats"][0]
    inference = entry["inference_stats"]

    def ns(key: str) -> float:
        return float(inference.get(key, {}).get("ns", 0))

    return {"queue_ns": ns("queue"), "compute_ns": ns("compute_infer") + ns("compute_input")
            + ns("compute_output"), "requests": int(inference.get("success", {}).get("count", 0)),
            "batches": {int(b["batch_size"]): int(b["compute_infer"]["count"])
                        for b in entry.get("batch_stats", [])}}


def run_concurrency(target: Target, images: np.ndarray, concurrency: int, requests: int,
                    stats_model: str | None = None) -> dict[str, Any]:
    """`requests` single-image requests spread over `concurrency` client threads."""
    if concurrency < 1 or requests < 1:
        raise TritonError("--concurrency and the request count must be >= 1")
    monitor = target.client()
    watch = stats_model or target.model
    before = _stats(monitor, watch, target.protocol)
    latencies: list[float] = []

    def worker(k: int) -> list[float]:
        client = target.client()  # HTTP clients are gevent-based: one per thread, made in it
        times = []
        for i in range(k, requests, concurrency):
            start = time.perf_counter()
            infer(target, client, images[i % len(images)][None])
            times.append(time.perf_counter() - start)
        return times

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for times in pool.map(worker, range(concurrency), timeout=requests * TIMEOUT_S):
            latencies.extend(times)
    elapsed = time.perf_counter() - start
    # Triton records a request's statistics after its response leaves (inside an ensemble, after
    # the ensemble answered): wait, bounded, until every answered request is counted.
    deadline = time.monotonic() + STATS_SETTLE_S
    after = _stats(monitor, watch, target.protocol)
    while after["requests"] - before["requests"] < len(latencies) and time.monotonic() < deadline:
        time.sleep(0.05)
        after = _stats(monitor, watch, target.protocol)
    executed = {b: after["batches"].get(b, 0) - before["batches"].get(b, 0) for b in after["batches"]}
    done = after["requests"] - before["requests"]
    stats = metrics.latency_stats(latencies, batch=1)
    return {
        "concurrency": concurrency, "requests": len(latencies), "seconds": elapsed,
        "images_per_s": len(latencies) / elapsed,
        "latency_ms": {k: stats[k] for k in ("median_ms", "p90_ms", "p99_ms", "mean_ms")},
        "server": {"requests": done, "executed_batches": {b: n for b, n in sorted(executed.items()) if n},
                   "queue_ms_per_request": (after["queue_ns"] - before["queue_ns"]) / 1e6 / max(done, 1),
                   "compute_ms_per_request":
                       (after["compute_ns"] - before["compute_ns"]) / 1e6 / max(done, 1)},
    }


def fidelity(target: Target, images: np.ndarray, reference: np.ndarray, names: list[str]) -> dict[str, Any]:
    client = target.client()
    got = np.concatenate([infer(target, client, images[i][None]) for i in range(len(images))])
    return metrics.full_fidelity(reference, got, names)


def bench_served(target: Target, folder: Any, precision: str, concurrency: tuple[int, ...], requests: int,
                 stats_model: str | None = None) -> dict[str, Any]:
    """The served model against the PyTorch reference of the artifact folder it was made from, then
    latency and throughput per concurrency: what `cvt-bench triton` reports."""
    from cvt_export import artifacts, machine, validate
    from cvt_export.backends.torch import reference_model
    from cvt_export.harness.bench import load_inputs

    folder = artifacts.as_folder(folder)
    inputs = load_inputs(None, None, folder.variant, golden=True)  # the 11 photographs, as before
    reference = validate.reference_logits(reference_model(folder), inputs.images)
    fid = fidelity(target, inputs.images, reference, inputs.names)
    broken = metrics.within_bounds(precision, fid)
    return {
        "schema": "cvt-bench-triton/1", "machine": machine.describe(),
        "target": {"url": target.url, "model": target.model, "protocol": target.protocol},
        "precision": precision, "inputs": {"source": inputs.source, "images": len(inputs.names)},
        "fidelity": {**fid, "bounds": dict(metrics.BOUNDS[precision]), "broken": broken, "pass": not broken},
        "runs": [run_concurrency(target, inputs.images, c, requests, stats_model) for c in concurrency],
    }
