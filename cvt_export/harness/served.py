"""Measure a model served by Triton as clients see it (the harness for a remote backend):
fidelity of the answers, latency and throughput under load, and Triton's own statistics
(queue vs compute time, executed batch sizes).

Two kinds of load, as perf_analyzer offers them:
- closed loop (`LoadSpec("concurrency", c)`): c clients, each sending its next request when its
  last is answered;
- open loop (`LoadSpec("rate", r)`): requests arrive at r per second with exponential gaps (a Poisson
  process, seeded), whether or not earlier ones were answered. Latency counts from the moment a
  request was due, so a server that falls behind shows it (no coordinated omission).

A run is split into measurement windows of equal length; each window's p50/p90/p99 are kept and
the run's spread over windows is reported beside its overall percentiles, with whether the last
windows agree (perf_analyzer's stability rule: three windows within 10%).

The server is probed before any reference work: it must be a Triton server, serve the model,
and take `pixel_values` of the artifact's size and give as many logits as it has classes. Every
request is bounded in time; a request that fails (the server died, a time-out) is counted and
named, never hangs the run. Clients are one per thread and always closed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cvt_export import metrics
from cvt_export.records import (
    ClientLatency,
    Fidelity,
    LoadRun,
    LoadSpec,
    ServedInputs,
    ServedReport,
    ServedTarget,
    ServerStats,
    Spread,
    Window,
)
from cvt_export.runtime import OUTPUT_NAME
from cvt_export.triton import TritonError

TIMEOUT_S = 60.0
STATS_SETTLE_S = 5.0  # longest wait for the server statistics to count every answered request
WINDOWS = 5           # measurement windows per run
STABLE_WINDOWS, STABLE_SPREAD = 3, 0.10
MAX_IN_FLIGHT = 64    # open loop: client threads (requests due while all are busy wait, and it shows)
GIVE_UP_AFTER = 8     # open loop: failed requests after which the rest are not sent (the server is gone)


@dataclass(frozen=True)
class Target:
    url: str
    model: str
    protocol: str = "http"        # http | grpc
    input_name: str = "pixel_values"
    datatype: str = "FP32"

    def client(self) -> Any:
        if "://" in self.url:  # refused here: tritonclient's half-made client would print a
            bare = self.url.split("://", 1)[1].rstrip("/")  # traceback from its destructor
            raise TritonError(f"--url {self.url}: give HOST:PORT without a scheme ({bare})")
        try:
            if self.protocol == "http":
                import tritonclient.http as http

                _quiet_hub()
                return http.InferenceServerClient(self.url, connection_timeout=TIMEOUT_S,
                                                  network_timeout=TIMEOUT_S)
            if self.protocol == "grpc":
                import tritonclient.grpc as grpc

                return grpc.InferenceServerClient(self.url)
        except ImportError:
            raise TritonError("tritonclient is not installed: pip install 'cvt-export[triton]'") from None
        except Exception as e:  # a malformed URL
            raise TritonError(f"--url {self.url}: {type(e).__name__}: {e}") from None
        raise TritonError(f"--protocol {self.protocol!r}: use http or grpc")

    def module(self) -> Any:
        if self.protocol == "http":
            import tritonclient.http as http

            return http
        import tritonclient.grpc as grpc

        return grpc


def _quiet_hub() -> None:
    """The HTTP client runs on gevent, whose hub prints a traceback for a KeyboardInterrupt (Ctrl-C,
    SIGTERM's `startup.Terminated`) that lands while it runs before passing it on: it is passed
    on, unprinted, and the command stops with its one line."""
    from gevent.hub import Hub  # type: ignore[import-untyped]

    if not issubclass(KeyboardInterrupt, Hub.NOT_ERROR):
        Hub.NOT_ERROR = (*Hub.NOT_ERROR, KeyboardInterrupt)


@contextlib.contextmanager
def connected(target: Target) -> Any:
    client = target.client()
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _message(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def infer(target: Target, client: Any, x: np.ndarray) -> np.ndarray:
    module = target.module()
    item = module.InferInput(target.input_name, list(x.shape), target.datatype)
    item.set_data_from_numpy(x)
    kwargs = {"client_timeout": TIMEOUT_S} if target.protocol == "grpc" else {}
    return np.asarray(client.infer(target.model, [item], **kwargs).as_numpy(OUTPUT_NAME), dtype=np.float32)


def _config(client: Any, model: str, protocol: str) -> dict[str, Any]:
    raw = client.get_model_config(model, as_json=True) if protocol == "grpc" else \
        client.get_model_config(model)
    config: dict[str, Any] = raw.get("config", raw)
    return config


def probe(target: Target, image_size: int, classes: int) -> str | None:
    """The served model checked against the artifact folder before any work; returns the precision
    its config says (the python runtime's parameter; None: not a cvt-export runtime, or it does not
    say)."""
    with connected(target) as client:
        try:
            live = client.is_server_live()
        except Exception as e:  # connection refused, DNS, a reset: either client library
            raise TritonError(f"--url {target.url}: no Triton server answers ({_message(e)})") from None
        try:
            meta = client.get_server_metadata()
            name = meta.get("name") if isinstance(meta, dict) else getattr(meta, "name", None)
        except Exception as e:
            raise TritonError(f"--url {target.url}: answers, but not as a Triton server "
                              f"({_message(e)})") from None
        if not live or not name:
            raise TritonError(f"--url {target.url}: answers, but not as a live Triton server")
        try:
            ready = client.is_model_ready(target.model)
        except Exception as e:
            raise TritonError(f"--model {target.model}: {_message(e)}") from None
        if not ready:
            served = _served_models(client, target.protocol)
            raise TritonError(f"--model {target.model}: not served (ready) at {target.url}; it serves "
                              f"{', '.join(served) or 'nothing'}")
        config = _config(client, target.model, target.protocol)
    inputs = {i["name"]: i for i in config.get("input", [])}
    outputs = {o["name"]: o for o in config.get("output", [])}
    if target.input_name not in inputs or OUTPUT_NAME not in outputs:
        raise TritonError(f"--model {target.model}: takes {', '.join(inputs) or 'nothing'} and gives "
                          f"{', '.join(outputs) or 'nothing'}; cvt-bench triton measures a classifier "
                          f"taking {target.input_name} and giving logits (the `-classifier` model of an "
                          "ensemble)")
    dims = [int(d) for d in inputs[target.input_name].get("dims", [])]
    if dims[-3:] != [3, image_size, image_size]:
        raise TritonError(f"--model {target.model}: takes {dims}, the artifact folder's model takes "
                          f"[3, {image_size}, {image_size}]; is --artifacts the folder it was made from?")
    out_dims = [int(d) for d in outputs[OUTPUT_NAME].get("dims", [])]
    if out_dims[-1:] != [classes]:
        raise TritonError(f"--model {target.model}: gives {out_dims[-1] if out_dims else '?'} logits, the "
                          f"artifact folder's model {classes}; is --artifacts the folder it was made from?")
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return params.get("precision") or None


def _served_models(client: Any, protocol: str) -> list[str]:
    with contextlib.suppress(Exception):
        index = client.get_model_repository_index(as_json=True) if protocol == "grpc" else \
            client.get_model_repository_index()
        entries = index.get("models", index) if isinstance(index, dict) else index
        return sorted(str(m["name"]) for m in entries if m.get("state", "READY") == "READY")
    return []


@dataclass(frozen=True)
class _Counters:
    """Triton's cumulative statistics of a model at one moment."""

    queue_ns: float
    compute_ns: float
    requests: int
    batches: dict[int, int]   # batch size -> executions


def _stats(client: Any, model: str, protocol: str) -> _Counters:
    raw = client.get_inference_statistics(model, as_json=True) if protocol == "grpc" else \
        client.get_inference_statistics(model)
    entry = raw["model_stats"][0]
    inference = entry["inference_stats"]

    def ns(key: str) -> float:
        return float(inference.get(key, {}).get("ns", 0))

    return _Counters(queue_ns=ns("queue"), compute_ns=ns("compute_infer") + ns("compute_input")
                     + ns("compute_output"), requests=int(inference.get("success", {}).get("count", 0)),
                     batches={int(b["batch_size"]): int(b["compute_infer"]["count"])
                              for b in entry.get("batch_stats", [])})


@dataclass
class _Record:
    """Per request: when it was due, when its answer came (or None), and what went wrong."""

    due: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent: int = 0   # requests handed to the client (the rest were never sent: the run gave up)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)  # the command is stopping

    def sending(self) -> None:
        with self.lock:
            self.sent += 1

    def add(self, due: float, done: float | None, error: str | None) -> None:
        with self.lock:
            if error is None and done is not None:
                self.due.append(due)
                self.done.append(done)
            else:
                self.errors.append(error or "no answer")


def _closed_loop(target: Target, images: np.ndarray, clients: int, requests: int, record: _Record) -> None:
    def worker(k: int) -> None:
        with connected(target) as client:  # HTTP clients are gevent-based: one per thread, made in it
            for i in range(k, requests, clients):
                if record.stop.is_set():
                    return
                start = time.perf_counter()
                record.sending()
                try:
                    infer(target, client, images[i % len(images)][None])
                    record.add(start, time.perf_counter(), None)
                except Exception as e:
                    record.add(start, None, _message(e))
                    return  # this client stops; the others go on (a dead server fails them all)

    with _clients(clients, record) as pool:
        list(pool.map(worker, range(clients)))


@contextlib.contextmanager
def _clients(threads: int, record: _Record) -> Any:
    """The client threads, told to stop when the command is (Ctrl-C, SIGTERM, an error): they end
    after the request each has in flight instead of sending the rest of the run."""
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        yield pool
    except BaseException:
        record.stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _open_loop(target: Target, images: np.ndarray, rate: float, requests: int, record: _Record,
               seed: int = 0) -> None:
    """Requests due at Poisson arrivals; MAX_IN_FLIGHT client threads take them in order."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, requests)
    due = time.perf_counter() + 0.05 + np.cumsum(gaps)
    lock, nxt = threading.Lock(), [0]

    def worker() -> None:
        with connected(target) as client:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= requests or len(record.errors) >= GIVE_UP_AFTER:
                    return
                if record.stop.wait(max(0.0, due[i] - time.perf_counter())):
                    return
                record.sending()
                try:
                    infer(target, client, images[i % len(images)][None])
                    record.add(float(due[i]), time.perf_counter(), None)
                except Exception as e:
                    record.add(float(due[i]), None, _message(e))

    threads = min(MAX_IN_FLIGHT, requests)
    with _clients(threads, record) as pool:
        for f in [pool.submit(worker) for _ in range(threads)]:
            f.result(timeout=requests * TIMEOUT_S)


def windows(due: list[float], done: list[float], count: int = WINDOWS) -> list[Window]:
    """The run cut into `count` windows of equal length by answer time: each window's answered
    requests per second and latency percentiles."""
    d, a = np.asarray(due), np.asarray(done)
    if a.size < 2 * count:
        count = 1
    edges = np.linspace(a.min(), a.max(), count + 1)
    out = []
    for k in range(count):
        inside = (a >= edges[k]) & ((a < edges[k + 1]) if k < count - 1 else (a <= edges[k + 1]))
        lat = (a[inside] - d[inside]) * 1000
        span = max(edges[k + 1] - edges[k], 1e-9)
        if lat.size == 0:
            out.append(Window(0, 0.0, float("nan"), float("nan"), float("nan")))
            continue
        out.append(Window(int(lat.size), float(lat.size / span), float(np.percentile(lat, 50)),
                          float(np.percentile(lat, 90)), float(np.percentile(lat, 99))))
    return out


def stable(wins: list[Window]) -> bool:
    """The last STABLE_WINDOWS windows' p99 and rate within STABLE_SPREAD of their mean."""
    last = wins[-STABLE_WINDOWS:]
    if len(last) < STABLE_WINDOWS:
        return False
    for values in (np.asarray([w.p99_ms for w in last]), np.asarray([w.per_s for w in last])):
        if not np.isfinite(values).all() or values.mean() <= 0:
            return False
        if np.abs(values - values.mean()).max() > STABLE_SPREAD * values.mean():
            return False
    return True


def run_load(target: Target, images: np.ndarray, load: LoadSpec, requests: int,
             stats_model: str | None = None, seed: int = 0) -> LoadRun:
    """`requests` single-image requests under `load`; failed requests are counted, not raised."""
    if load.value <= 0 or requests < 1:
        raise TritonError("the load (--concurrency, --rate) and the request count must be > 0")
    watch = stats_model or target.model
    with connected(target) as monitor:
        try:
            before = _stats(monitor, watch, target.protocol)
        except Exception as e:
            raise TritonError(f"{target.url}: the server stopped answering ({_message(e)})") from None
        record = _Record()
        start = time.perf_counter()
        if load.kind == "concurrency":
            _closed_loop(target, images, int(load.value), requests, record)
        else:
            _open_loop(target, images, load.value, requests, record, seed)
        elapsed = time.perf_counter() - start
        after = _settled_stats(monitor, watch, target.protocol, before, len(record.done))
    offered = answered = None
    if len(record.done) > 1:
        # The rate requests arrived at and the rate answers left at, each over its own span (a
        # server that keeps up answers at the arrival rate; one that falls behind, at its own).
        n = len(record.done) - 1
        offered = n / max(max(record.due) - min(record.due), 1e-9)
        answered = n / max(max(record.done) - min(record.done), 1e-9)
    latency = wins = spread = steady = None
    if record.done:
        stats = metrics.latency_stats([b - a for a, b in zip(record.due, record.done, strict=True)], batch=1)
        latency = ClientLatency(stats.median_ms, stats.p90_ms, stats.p99_ms, stats.mean_ms)
        wins = windows(record.due, record.done)
        spread = Spread(*((min(p), max(p)) for p in zip(*((w.p50_ms, w.p90_ms, w.p99_ms) for w in wins),
                                                          strict=True)))
        steady = stable(wins)
    server, why = server_deltas(before, after)
    return LoadRun(
        load=load, requests=requests, sent=record.sent,
        answered=len(record.done), failed=len(record.errors), not_sent=requests - record.sent,
        errors=dict(sorted({e: record.errors.count(e) for e in set(record.errors)}.items())),
        seconds=elapsed, images_per_s=len(record.done) / elapsed,
        concurrency=int(load.value) if load.kind == "concurrency" else None,
        rate=load.value if load.kind != "concurrency" else None,
        offered_per_s=offered, answered_per_s=answered, latency_ms=latency,
        windows=None if wins is None else tuple(wins), spread_ms=spread, stable=steady, server=server,
        server_unavailable=why or None)


def server_deltas(before: _Counters, after: _Counters | None) -> tuple[ServerStats | None, str]:
    """Triton's statistics over the run, as differences of its counters, or (None, why) when they
    cannot be: the server stopped answering, or a counter went down (the model was reloaded, a
    stub restarted: its counters began again, and a difference would be negative nonsense)."""
    if after is None:
        return None, "the server stopped answering before its statistics could be read"
    keys = set(before.batches) | set(after.batches)
    executed = {b: after.batches.get(b, 0) - before.batches.get(b, 0) for b in keys}
    done = after.requests - before.requests
    queue, compute = after.queue_ns - before.queue_ns, after.compute_ns - before.compute_ns
    if done < 0 or queue < 0 or compute < 0 or any(n < 0 for n in executed.values()):
        return None, ("the model's statistics went back during the run (it was reloaded or its stub "
                      "restarted), so no difference of them means anything")
    return ServerStats(requests=done, executed_batches={str(b): n for b, n in sorted(executed.items()) if n},
                       queue_ms_per_request=queue / 1e6 / max(done, 1),
                       compute_ms_per_request=compute / 1e6 / max(done, 1)), ""


def _settled_stats(monitor: Any, watch: str, protocol: str, before: _Counters,
                   answered: int) -> _Counters | None:
    """Triton records a request's statistics after its response leaves (inside an ensemble,
    after the ensemble answered): wait, bounded, until every answered request is counted. None
    when the server no longer answers."""
    deadline = time.monotonic() + STATS_SETTLE_S
    try:
        after = _stats(monitor, watch, protocol)
        while after.requests - before.requests < answered and time.monotonic() < deadline:
            time.sleep(0.05)
            after = _stats(monitor, watch, protocol)
    except Exception:
        return None
    return after


def fidelity(target: Target, images: np.ndarray, reference: np.ndarray, names: list[str]) -> Fidelity:
    with connected(target) as client:
        try:
            got = np.concatenate([infer(target, client, images[i][None]) for i in range(len(images))])
        except Exception as e:
            raise TritonError(f"{target.url}: model {target.model} did not answer ({_message(e)})") from None
    return metrics.full_fidelity(reference, got, names)


def bench_served(target: Target, folder: Any, precision: str | None,
                 loads: tuple[LoadSpec, ...] | tuple[int, ...], requests: int,
                 stats_model: str | None = None) -> ServedReport:
    """The served model against the PyTorch reference of the artifact folder it was made from, then
    latency and throughput per load: what `cvt-bench triton` reports. `precision` None: what the
    served model's config says (the python runtime records it), else fp32. A precision that
    disagrees with the config is refused before any work. Stops at the first load with failed
    requests (`failed_at` says which)."""
    from cvt_export import artifacts, machine, precisions, validate
    from cvt_export.harness.bench import load_inputs
    from cvt_export.reference import reference_model

    folder = artifacts.as_folder(folder)
    says = probe(target, folder.variant.image_size, folder.variant.num_classes)
    if precision is None:
        precision = says or precisions.REFERENCE
    elif says and says != precision:
        raise TritonError(f"--precision {precision}: the served model {target.model} runs "
                          f"{says} (its config says); its bounds are the ones that apply")
    inputs = load_inputs(None, None, folder.variant, golden=True)  # the 11 photographs, as before
    reference = validate.reference_logits(reference_model(folder), inputs.images)
    fid = metrics.judged(precision, fidelity(target, inputs.images, reference, inputs.names))
    runs, failed_at = [], None
    for load in (x if isinstance(x, LoadSpec) else LoadSpec("concurrency", x) for x in loads):
        run = run_load(target, inputs.images, load, requests, stats_model)
        runs.append(run)
        if run.failed:
            failed_at = str(load)
            break
    return ServedReport(machine=machine.describe(),
                        target=ServedTarget(target.url, target.model, target.protocol), precision=precision,
                        inputs=ServedInputs(inputs.source, len(inputs.names)),
                        fidelity=fid, runs=tuple(runs), failed_at=failed_at)
