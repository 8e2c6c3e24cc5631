"""The accuracy pass: a whole image folder through the reference and every row, streamed.

images listed (sorted) ─► shards (content-defined, so adding or removing a file redoes one)
  ─► decode workers (processes, a bounded queue of uint8 batches) ─► each batch through the
  reference (from the cache when it has the image) and every row, once
  ─► per row and shard, an .npz of per-image results and its record (hash) ─► statistics.

Memory holds a few batches and the per-image top-5s, whatever the folder's size. A re-run with the
same command trusts a shard file only when its record names the same images and the same model
and the file's bytes hash to the recorded sha256; everything else is redone. The reference's
logits are cached by (model content, preprocessing, image content) in SQLite, which survives a
kill mid-write, so a second artifact folder of the same model, or a resumed pass, skips them.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import multiprocessing
import os
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import cvt_ref
from cvt_export import artifacts, machine, metrics, precisions
from cvt_export.artifacts import ArtifactFolder
from cvt_export.backends import BackendError, BackendUnavailable, Runner, get_backend, why_not
from cvt_export.calibration import spread
from cvt_export.harness.bench import folder_labels
from cvt_export.harness.decoding import decode, watch_parent
from cvt_export.records import (
    AccuracyReport,
    DatasetInfo,
    PartRate,
    RecordError,
    RowAccuracy,
    ShardRecord,
    Throughput,
)
from cvt_export.reference import reference_model
from cvt_ref.errors import CvtError
from cvt_ref.preprocess import PREPROCESS_VERSION, list_images, normalize

log = logging.getLogger(__name__)

TOP = 5
UNREADABLE_LISTED = 20  # unreadable files named in the report (all are counted)
SHARDS = "shards"
# A shard's parts, each a .npz of arrays: its images (names, labels, digests, whether each decoded),
# the reference's results, and each row's under its own name. DECODE_WAIT: the time the pass waited
# for decoded batches, beside each part's own time.
IMAGES_PART, REFERENCE_PART, DECODE_WAIT = "images", "reference", "decode_wait"
REFERENCE = ("torch", "fp32")
# The reference runs at most this many images at a time, whatever --batch: eager PyTorch holds
# every activation of the call (cvt-13's first-stage attention alone is ~10 MB per image), and its
# speed per image is the same from 8 up. What the rows are timed and batched at is --batch.
REFERENCE_CHUNK = 8


class AccuracyError(CvtError):
    """Bad input to the accuracy pass: no images, an unknown row, a batch of 0..."""


@dataclass(frozen=True)
class PassConfig:
    dataset: Path
    out: Path
    rows: tuple[tuple[str, str], ...] = ()  # (backend, precision) besides the reference
    batch: int = 16
    workers: int = 1          # decode processes; 0 decodes in this process
    shard_size: int = 256     # images per shard, on average
    reference_cache: Path | None = None  # default: OUT/reference-cache.sqlite
    limit: int | None = None
    threads: int | None = None

    def check(self) -> None:
        if self.batch < 1:
            raise AccuracyError(f"--batch {self.batch}: must be >= 1")
        if self.workers < 0:
            raise AccuracyError(f"--workers {self.workers}: use 0 (decode here) or more")
        if self.shard_size < 1:
            raise AccuracyError(f"--shard-size {self.shard_size}: must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise AccuracyError(f"--limit {self.limit}: must be >= 1")
        if not self.dataset.is_dir():
            raise AccuracyError(f"--dataset {self.dataset}: no such folder")

    @property
    def cache_path(self) -> Path:
        return self.reference_cache or self.out / "reference-cache.sqlite"


# --- what is there: images, shards ------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    path: Path
    name: str      # relative to the dataset folder
    stat: str      # size and modification time: a changed file changes its shard's key
    label: int     # -1: none


@dataclass(frozen=True)
class Shard:
    key: str
    entries: tuple[Entry, ...]

    @property
    def folder(self) -> str:
        return f"{SHARDS}/{self.key[:20]}"


def list_entries(cfg: PassConfig, variant: cvt_ref.Variant, labels: list[str]) -> tuple[list[Entry], str]:
    paths = list_images(cfg.dataset)
    if not paths:
        raise AccuracyError(f"--dataset {cfg.dataset}: holds no images")
    if cfg.limit:
        paths = spread(paths, cfg.limit)
    found, note = folder_labels(paths, cfg.dataset, variant, labels)
    entries = []
    for i, p in enumerate(paths):
        st = p.stat()
        entries.append(Entry(p, p.relative_to(cfg.dataset).as_posix(), f"{st.st_size}:{st.st_mtime_ns}",
                             int(found[i]) if found is not None else -1))
    return entries, note


def plan_shards(entries: Sequence[Entry], size: int) -> list[Shard]:
    """Content-defined shards: one ends after an image whose name hashes to 0 mod `size` (or at
    4x `size`), so a file added or removed changes the key of its own shard only."""
    shards, current = [], []
    for e in entries:
        current.append(e)
        h = int.from_bytes(hashlib.sha256(e.name.encode()).digest()[:8], "big")
        if h % size == 0 or len(current) >= 4 * size:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    out = []
    for group in shards:
        key = hashlib.sha256()
        for e in group:
            key.update(f"{e.name}\0{e.stat}\0{e.label}\n".encode())
        out.append(Shard(key.hexdigest(), tuple(group)))
    return out


# --- decoding in worker processes ----------------------------------------------------------------

Decoded = tuple[np.ndarray, list[str], list[tuple[int, str]]]
QUIET_TRACKER = "ignore::UserWarning:multiprocessing.resource_tracker"


class Decoder:
    """Batches decoded by `workers` processes, at most 2 per worker in flight, in order."""

    def __init__(self, workers: int, variant: cvt_ref.Variant) -> None:
        self.variant = variant
        self.pool: cf.ProcessPoolExecutor | None = None
        self.depth = 2 * max(1, workers)
        if workers:
            # multiprocessing's resource tracker (a process of its own, started with this one's -W
            # options) removes the pool's semaphores when the pass is killed with -9, and then
            # prints a UserWarning about them under the command's output: the removal is the
            # point, the warning noise
            if QUIET_TRACKER not in sys.warnoptions:
                sys.warnoptions.append(QUIET_TRACKER)
            self.pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=watch_parent, initargs=(os.getpid(),))

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def batches(self, jobs: Sequence[Sequence[Path]]) -> Iterator[Decoded]:
        if self.pool is None:
            for paths in jobs:
                yield decode(paths, self.variant)
            return
        pending: collections.deque[cf.Future[Decoded]] = collections.deque()
        queued = iter(jobs)
        for paths in queued:
            pending.append(self.pool.submit(decode, paths, self.variant))
            if len(pending) >= self.depth:
                break
        while pending:
            done = pending.popleft().result()
            nxt = next(queued, None)
            if nxt is not None:
                pending.append(self.pool.submit(decode, nxt, self.variant))
            yield done


# --- the reference's cache -------------------------------------------------------------------------

class ReferenceCache:
    """Reference logits by sha256(model content, preprocessing, image content), in SQLite."""

    def __init__(self, path: Path, scope: str, classes: int) -> None:
        self.path, self.scope, self.classes = path, scope, classes
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path)
            self.db.execute("CREATE TABLE IF NOT EXISTS logits (key TEXT PRIMARY KEY, value BLOB)")
            self.db.commit()
        except OSError:
            raise  # said in one line by the command line, with the path
        except sqlite3.OperationalError as e:  # a full disk, a read-only folder: SQLite's words
            with contextlib.suppress(OSError):
                if path.stat().st_size == 0:
                    path.unlink()  # the empty file sqlite made is not left behind
            raise AccuracyError(f"--reference-cache {path}: cannot write it ({e}); free some space or "
                                "choose another file") from None
        except sqlite3.DatabaseError as e:
            raise AccuracyError(f"--reference-cache {path}: not a usable cache ({e}); "
                                "choose another file") from None

    def key(self, digest: str) -> str:
        return hashlib.sha256(f"{self.scope}\0{digest}".encode()).hexdigest()

    def get(self, digests: Sequence[str]) -> dict[int, np.ndarray]:
        """Logits found, by position in `digests` (an entry of another class count is not one)."""
        keys = [self.key(d) for d in digests]
        marks = ",".join("?" * len(keys))
        found = dict(self.db.execute(f"SELECT key, value FROM logits WHERE key IN ({marks})", keys))
        out = {}
        for i, k in enumerate(keys):
            blob = found.get(k)
            if blob is not None and len(blob) == 4 * self.classes:
                out[i] = np.frombuffer(blob, dtype=np.float32)
        return out

    def put(self, digests: Sequence[str], logits: np.ndarray) -> None:
        rows = [(self.key(d), np.ascontiguousarray(x, dtype=np.float32).tobytes())
                for d, x in zip(digests, logits, strict=True)]
        try:
            self.db.executemany("INSERT OR REPLACE INTO logits VALUES (?, ?)", rows)
            self.db.commit()
        except sqlite3.OperationalError as e:  # a full disk, a read-only file: SQLite's words
            raise AccuracyError(f"--reference-cache {self.path}: cannot write it ({e}); free some space "
                                "or choose another file") from None

    def close(self) -> None:
        self.db.close()


def model_key(model: Any, variant: cvt_ref.Variant) -> str:
    """The reference's content: every parameter and buffer, and the variant it is built as."""
    h = hashlib.sha256(repr(variant).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    h.update(str(getattr(model, "activation", "")).encode())
    return h.hexdigest()


def preprocessing_key(variant: cvt_ref.Variant) -> str:
    return (f"v{PREPROCESS_VERSION} {variant.image_size}px {variant.crop} resize {variant.resize_size} "
            f"mean {variant.mean} std {variant.std}")


# --- per-shard files ------------------------------------------------------------------------------

def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    data = buf.getvalue()
    artifacts.atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def write_part(out: Path, shard: Shard, row: str, row_key: str, arrays: dict[str, np.ndarray],
               executed: str = "") -> None:
    """The file first, then its record: a kill between the two leaves a file that is not trusted."""
    folder = out / shard.folder
    folder.mkdir(parents=True, exist_ok=True)
    digest = _save_npz(folder / f"{row}.npz", arrays)
    rows = len(next(iter(arrays.values())))
    rec = ShardRecord(shard.key, row, row_key, rows, f"{row}.npz", digest, executed)
    artifacts.atomic_write(folder / f"{row}.json", json.dumps(rec.to_json(), indent=1) + "\n")


def read_part(out: Path, shard: Shard, row: str, row_key: str) -> dict[str, np.ndarray] | None:
    """A finished part, or None: no record, another shard's or model's, or bytes that do not match."""
    folder = out / shard.folder
    try:
        rec = ShardRecord.read(folder / f"{row}.json")
    except RecordError:
        return None
    if (rec.shard, rec.row, rec.row_key, rec.file) != (shard.key, row, row_key, f"{row}.npz"):
        return None
    try:
        data = (folder / rec.file).read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != rec.sha256:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if any(len(v) != rec.images for v in arrays.values()):
        return None
    return arrays


def row_results(logits: np.ndarray, ref: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: top-5 classes and probabilities, cosine and max-abs against the reference."""
    top = metrics.topk(logits, TOP).astype(np.int32)
    prob = np.exp(metrics.log_softmax(logits))
    return {"top5": top, "prob5": np.take_along_axis(prob, top, axis=1).astype(np.float32),
            "cosine": metrics.cosine(ref, logits),
            "max_abs": np.abs(ref.astype(np.float64) - logits.astype(np.float64)).max(axis=1)}


# --- the pass ------------------------------------------------------------------------------------

@dataclass
class Row:
    backend: str
    precision: str
    key: str
    runner: Runner | None = None
    status: str = "ok"
    reason: str = ""
    executed: str = ""

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.precision}"


@dataclass
class Progress:
    images: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)


def open_rows(folder: ArtifactFolder, cfg: PassConfig) -> list[Row]:
    rows = []
    for backend, precision in dict.fromkeys(cfg.rows):
        if (backend, precision) == REFERENCE:
            continue
        b = get_backend(backend)
        reads = precisions.reads(precision)  # the file the row runs (bf16: the FP32 file)
        file_key = folder.sha256(reads) if folder.has(reads) else ""
        row = Row(b.name, precision, hashlib.sha256(f"{b.name} {precision} {file_key}".encode()).hexdigest())
        why = why_not(b, precision)
        if why:
            row.status, row.reason = "skipped", why
        rows.append(row)
    return rows


class Evaluator:
    """The reference and the rows' runners, opened once; evaluates one shard at a time. The pass
    holds one in this process; on a Ray cluster each node's actor holds its own."""

    def __init__(self, folder: ArtifactFolder, rows: Sequence[Row], *, batch: int, workers: int,
                 threads: int | None, model: Any | None = None) -> None:
        self.folder, self.batch, self.threads = folder, batch, threads
        self.variant = folder.variant
        self.model = model if model is not None else reference_model(folder)
        self.rows = {r.name: r for r in rows}
        self.stack = contextlib.ExitStack()
        self.decoder = self.stack.enter_context(Decoder(workers, self.variant))
        self.last: np.ndarray | None = None  # the last full batch, normalized: for `decoded_rates`

    def close(self) -> None:
        self.stack.close()

    def start(self, name: str) -> Row:
        """The row's runner, compiled on first use; a row that cannot run says why."""
        row = self.rows[name]
        if row.runner is None and row.status == "ok":
            try:
                row.runner = self.stack.enter_context(
                    get_backend(row.backend).compile(self.folder, row.precision, threads=self.threads))
                row.executed = row.runner.info.executed
            except BackendError as e:
                row.status = "skipped" if isinstance(e, BackendUnavailable) else "error"
                row.reason = str(e)
        return row

    def evaluate(self, shard: Shard, wanted: Sequence[str],
                 known: Callable[[list[str]], dict[int, np.ndarray]],
                 fresh: Callable[[list[str], np.ndarray], None],
                 done: Callable[[int], None] = lambda n: None) -> Parts:
        """One shard (what a Ray node is handed); `stream` says what happens to its images."""
        return next(self.stream([shard], wanted, known, fresh, done))[1]

    def stream(self, shards: Sequence[Shard], wanted: Sequence[str],
               known: Callable[[list[str]], dict[int, np.ndarray]],
               fresh: Callable[[list[str], np.ndarray], None],
               done: Callable[[int], None] = lambda n: None) -> Iterator[tuple[Shard, Parts]]:
        """Every image of the shards that decodes through the reference (unless `known` has its
        logits; new ones go to `fresh`) and the `wanted` rows that can run, each shard's results
        handed back as soon as its last image is through. Batches run across shard boundaries (a
        shard's last few images share a batch with the next shard's first): a row never sees a
        short batch but the very last one. An image that does not decode is recorded with why."""
        rows = [r for r in (self.start(name) for name in wanted) if r.status == "ok"]
        names = [REFERENCE_PART, *(r.name for r in rows)]
        flat = [(k, e) for k, sh in enumerate(shards) for e in sh.entries]
        jobs = [flat[i:i + self.batch] for i in range(0, len(flat), self.batch)]
        acc = [_ShardResults(names) for _ in shards]
        batches = self.decoder.batches([[e.path for _, e in job] for job in jobs])
        for job in jobs:
            t0 = time.perf_counter()
            pixels, sums, failed = next(batches)
            took = Took()
            took.add(DECODE_WAIT, time.perf_counter() - t0)
            reasons = dict(failed)
            it = iter(sums)
            digests = ["" if i in reasons else next(it) for i in range(len(job))]
            results: dict[str, dict[str, np.ndarray]] = {}
            cached = np.zeros(len(sums), dtype=bool)
            if len(sums):
                ref = self._reference(normalize(pixels, self.variant), sums, known, fresh, took)
                if len(ref.x) == self.batch:
                    self.last = ref.x
                cached[list(ref.cached)] = True
                results[REFERENCE_PART] = row_results(ref.logits, ref.logits)
                for r in rows:
                    assert r.runner is not None
                    t0 = time.perf_counter()
                    got = r.runner(ref.x)
                    took.add(r.name, time.perf_counter() - t0)
                    results[r.name] = row_results(got, ref.logits)
            decoded = np.cumsum([i not in reasons for i in range(len(job))]) - 1  # position among decoded
            for k in dict.fromkeys(k for k, _ in job):
                mine = [i for i, (kk, _) in enumerate(job) if kk == k]
                ok = [int(decoded[i]) for i in mine if i not in reasons]
                acc[k].add([digests[i] for i in mine], [reasons.get(i, "") for i in mine],
                           {name: {f: v[ok] for f, v in res.items()} for name, res in results.items()},
                           int(cached[ok].sum()), took, len(mine) / len(job))
                if acc[k].count == len(shards[k].entries):
                    yield shards[k], acc[k].parts(shards[k], rows, self.rows)
            done(len(job))
        for k, sh in enumerate(shards):
            if not sh.entries:
                yield sh, acc[k].parts(sh, rows, self.rows)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """The reference's logits, REFERENCE_CHUNK images at a time."""
        import torch

        with torch.inference_mode():
            return np.concatenate([self.model(torch.from_numpy(x[i:i + REFERENCE_CHUNK])).numpy()
                                   for i in range(0, len(x), REFERENCE_CHUNK)])

    def decoded_rates(self, names: Sequence[str], seconds: float = 3.0) -> dict[str, float]:
        """Images/s of each part's runner on the pass's last full batch, already decoded and
        normalized: what the part does with nothing else to do. The median of up to 8 calls (at
        least 2, then as many as fit in `seconds`): one slow call on a shared machine does not
        decide it. Empty when no full batch went through."""
        if self.last is None:
            return {}
        x, out = self.last, {}
        for name in names:
            runner = self.rows[name].runner if name in self.rows else None
            if name == REFERENCE_PART:
                call = self.reference
            elif runner is not None:
                call = runner
            else:
                continue
            times: list[float] = []
            while len(times) < 8 and (len(times) < 2 or sum(times) < seconds):
                t0 = time.perf_counter()
                call(x)
                times.append(time.perf_counter() - t0)
            out[name] = len(x) / statistics.median(times)
        return out

    def _reference(self, x: np.ndarray, sums: list[str], known: Callable[[list[str]], dict[int, np.ndarray]],
                   fresh: Callable[[list[str], np.ndarray], None], took: Took) -> Batch:
        have = known(sums)
        missing = [i for i in range(len(sums)) if i not in have]
        ref = np.empty((len(sums), self.variant.num_classes), dtype=np.float32)
        for i, v in have.items():
            ref[i] = v
        if missing:
            t0 = time.perf_counter()
            ref[missing] = self.reference(x[missing])
            took.add(REFERENCE_PART, time.perf_counter() - t0)
            fresh([sums[i] for i in missing], ref[missing])
        return Batch(x, ref, tuple(have))


@dataclass
class Batch:
    x: np.ndarray         # normalized inputs
    logits: np.ndarray    # the reference's
    cached: tuple[int, ...] = ()  # positions whose logits came from the cache


@dataclass
class Took:
    """Where a shard's time went (seconds): waiting for decoded batches, the reference, each row."""

    seconds: dict[str, float] = field(default_factory=dict)
    cached: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # images each part computed

    def add(self, what: str, s: float) -> None:
        self.seconds[what] = self.seconds.get(what, 0.0) + s

    def merge(self, parts: Parts) -> None:
        self.cached += parts.cached
        for k, v in parts.seconds.items():
            self.add(k, v)
        for name, arrays in parts.arrays.items():
            if name != IMAGES_PART:
                n = len(arrays["top5"]) - (parts.cached if name == REFERENCE_PART else 0)
                self.counts[name] = self.counts.get(name, 0) + n


EMPTY: dict[str, np.ndarray] = {"top5": np.zeros((0, TOP), np.int32), "prob5": np.zeros((0, TOP), np.float32),
         "cosine": np.zeros(0), "max_abs": np.zeros(0)}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A row's per-batch results as one set of arrays (empty ones when no image of the shard decoded)."""
    return {k: np.concatenate([p[k] for p in parts]) for k in EMPTY} if parts else dict(EMPTY)


class _ShardResults:
    """One shard's results as its batches come through (a batch may hold two shards' images)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.digests: list[str] = []
        self.errors: list[str] = []
        self.arrays: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in names}
        self.took = Took()

    @property
    def count(self) -> int:
        return len(self.digests)

    def add(self, digests: list[str], errors: list[str], results: dict[str, dict[str, np.ndarray]],
            cached: int, took: Took, share: float) -> None:
        self.digests += digests
        self.errors += errors
        for name, res in results.items():
            self.arrays[name].append(res)
        self.took.cached += cached
        for what, s in took.seconds.items():
            self.took.add(what, s * share)

    def parts(self, shard: Shard, rows: Sequence[Row], every: dict[str, Row]) -> Parts:
        out = {name: _concat(ps) for name, ps in self.arrays.items()}
        out[IMAGES_PART] = {"name": np.asarray([e.name for e in shard.entries]),
                         "sha256": np.asarray([bytes.fromhex(d) if d else bytes(32) for d in self.digests]
                                              ).view(np.uint8).reshape(-1, 32),
                         "label": np.asarray([e.label for e in shard.entries], dtype=np.int64),
                         "ok": np.asarray([not e for e in self.errors], dtype=bool),
                         "error": np.asarray(self.errors, dtype=str)}
        return Parts(out, self.took.cached, {r.name: r.executed for r in rows},
                     {name: (r.status, r.reason) for name, r in every.items() if r.status != "ok"},
                     self.took.seconds)


@dataclass
class Parts:
    """One shard's results: arrays per part (IMAGES_PART, REFERENCE_PART, each row's name)."""

    arrays: dict[str, dict[str, np.ndarray]]
    cached: int                   # images whose reference logits were known
    executed: dict[str, str]      # per row: what really ran
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # row -> (status, reason)
    seconds: dict[str, float] = field(default_factory=dict)  # decode_wait, reference, each row


@dataclass
class Plan:
    """What a pass must do: the shards, and per shard the parts not yet finished."""

    shards: list[Shard]
    todo: dict[str, list[str]]    # shard key -> row names to run (the reference always runs)
    ref_key: str

    @property
    def finished_images(self) -> int:
        return sum(len(sh.entries) for sh in self.shards if sh.key not in self.todo)

    def runs(self) -> list[tuple[list[Shard], list[str]]]:
        """The unfinished shards, consecutive ones that want the same rows together (one stream)."""
        out: list[tuple[list[Shard], list[str]]] = []
        for shard in self.shards:
            if shard.key not in self.todo:
                continue
            wanted = self.todo[shard.key]
            if out and out[-1][1] == wanted:
                out[-1][0].append(shard)
            else:
                out.append(([shard], wanted))
        return out

    def missing(self, out: Path, rows: Sequence[Row]) -> None:
        for shard in self.shards:
            wanted = [r.name for r in rows
                      if r.status == "ok" and read_part(out, shard, r.name, r.key) is None]
            if wanted or any(read_part(out, shard, part, self.ref_key) is None
                             for part in (IMAGES_PART, REFERENCE_PART)):
                self.todo[shard.key] = wanted


def save(out: Path, shard: Shard, parts: Parts, rows: Sequence[Row], ref_key: str) -> None:
    keys = {r.name: r.key for r in rows}
    arrays = dict(parts.arrays)
    write_part(out, shard, IMAGES_PART, ref_key, arrays.pop(IMAGES_PART))
    write_part(out, shard, REFERENCE_PART, ref_key, arrays.pop(REFERENCE_PART))
    for name, got in arrays.items():
        write_part(out, shard, name, keys[name], got, parts.executed.get(name, ""))
    for r in rows:
        r.executed = parts.executed.get(r.name, r.executed)
        if r.name in parts.failed and r.status == "ok":
            r.status, r.reason = parts.failed[r.name]


@dataclass
class Setup:
    """What every pass, local or on a cluster, starts from."""

    entries: list[Entry]
    note: str
    plan: Plan
    rows: list[Row]
    model: Any
    model_key: str
    preprocessing: str


def setup(cfg: PassConfig, folder: ArtifactFolder) -> Setup:
    cfg.check()
    entries, note = list_entries(cfg, folder.variant, folder.labels)
    model = reference_model(folder)
    mkey, prep = model_key(model, folder.variant), preprocessing_key(folder.variant)
    plan = Plan(plan_shards(entries, cfg.shard_size), {},
                hashlib.sha256(f"{mkey}\0{prep}".encode()).hexdigest())
    same_results(cfg, plan.ref_key)
    rows = open_rows(folder, cfg)
    plan.missing(cfg.out, rows)
    return Setup(entries, note, plan, rows, model, mkey, prep)


def same_results(cfg: PassConfig, ref_key: str) -> None:
    """An --out that holds another pass's results (another model, preprocessing or dataset) is
    refused, never mixed with this one's or overwritten."""
    try:
        earlier = AccuracyReport.read(cfg.out / "accuracy.json")
    except RecordError:
        earlier = None
    if earlier is not None and Path(earlier.dataset.source).resolve() != cfg.dataset.resolve():
        raise AccuracyError(f"--out {cfg.out}: holds the accuracy of {earlier.dataset.source}, not "
                            f"{cfg.dataset}; choose another folder")
    for record in sorted((cfg.out / SHARDS).glob("*/reference.json"))[:1]:
        try:
            key = ShardRecord.read(record).row_key
        except RecordError:
            continue
        if key != ref_key:
            raise AccuracyError(f"--out {cfg.out}: holds results of another model or preprocessing "
                                f"({earlier.variant + ' ' + earlier.weights if earlier else 'its shards'}); "
                                "choose another folder")


def run(cfg: PassConfig, folder: ArtifactFolder, progress: Callable[[Progress], None] = lambda p: None
        ) -> AccuracyReport:
    s = setup(cfg, folder)
    state = Progress(s.plan.finished_images, len(s.entries))
    took = Took()
    throughput = None
    if s.plan.todo:
        cache = ReferenceCache(cfg.cache_path, s.plan.ref_key, folder.variant.num_classes)
        evaluator = Evaluator(folder, s.rows, batch=cfg.batch, workers=cfg.workers, threads=cfg.threads,
                              model=s.model)
        try:
            def done(n: int) -> None:
                state.images += n
                progress(state)

            with folder.lock():  # derived files (optimized graphs, IRs) are made here, then the
                for row in s.rows:  # lock goes: an hours-long pass does not block the folder
                    evaluator.start(row.name)  # compiled before the clock: the stream is timed
            t0 = time.perf_counter()
            for shards, wanted in s.plan.runs():
                for shard, parts in evaluator.stream(shards, wanted, cache.get, cache.put, done):
                    took.merge(parts)
                    save(cfg.out, shard, parts, s.rows, s.plan.ref_key)
            streamed = time.perf_counter() - t0
            throughput = measure(evaluator, took, state.images - s.plan.finished_images, streamed)
        finally:
            evaluator.close()
            cache.close()
    progress(state)
    return dataclasses.replace(finish(cfg, folder, s, took, state.started), throughput=throughput)


def measure(evaluator: Evaluator, took: Took, images: int, seconds: float) -> Throughput:
    """The stream's speed against its parts' own speed on decoded tensors, in the same run."""
    counts = {name: n for name, n in took.counts.items() if name in took.seconds}
    rates = evaluator.decoded_rates([name for name, n in counts.items() if n])
    parts = tuple(PartRate(name, n, round(took.seconds[name], 2),
                           round(rates[name], 2) if name in rates else None)
                  for name, n in counts.items())
    ideal = sum(p.images / p.decoded_per_s for p in parts if p.decoded_per_s)
    complete = all(p.decoded_per_s for p in parts if p.images)
    return Throughput(images, round(seconds, 2), round(took.seconds.get(DECODE_WAIT, 0.0), 2), parts,
                      round(ideal / seconds, 3) if seconds and complete and parts else None)


def finish(cfg: PassConfig, folder: ArtifactFolder, s: Setup, took: Took, started: float) -> AccuracyReport:
    info = DatasetInfo(str(cfg.dataset), len(s.entries), s.note == "", s.note,
                       len({e.label for e in s.entries if e.label >= 0}), len(s.plan.shards),
                       cfg.shard_size, len(s.plan.shards) - len(s.plan.todo), took.cached,
                       str(cfg.cache_path))
    reference = Row(*REFERENCE, s.plan.ref_key, executed="fp32 (PyTorch eager)")
    report = summarize(cfg, folder, s.plan.shards, reference, s.rows, s.model_key, s.preprocessing, info,
                       started)
    spent = {"wall": report.seconds, **{k: round(v, 2) for k, v in took.seconds.items()}}
    return dataclasses.replace(report, time=spent)


# --- statistics ------------------------------------------------------------------------------------

def _gather(out: Path, shards: Sequence[Shard], row: str, key: str) -> dict[str, np.ndarray] | None:
    parts = [read_part(out, s, row, key) for s in shards]
    if any(p is None for p in parts):
        return None
    return {k: np.concatenate([p[k] for p in parts if p is not None]) for k in parts[0] or {}}


def _row_stats(row: Row, got: dict[str, np.ndarray], ref: dict[str, np.ndarray],
               images: dict[str, np.ndarray], labelled: bool, names: list[str],
               is_reference: bool) -> RowAccuracy:
    n = len(got["top5"])
    top1, ref_top1 = got["top5"][:, 0], ref["top5"][:, 0]
    agree = float((top1 == ref_top1).mean())
    contains = float((got["top5"] == ref_top1[:, None]).any(axis=1).mean())
    worst = int(np.argmin(got["cosine"]))
    stats = RowAccuracy(
        row.backend, row.precision, executed=row.executed, n=n, top1_agreement=agree,
        top1_agreement_ci=tuple(metrics.wilson(agree * n, n)), top5_contains_reference=contains,
        cosine_min=float(got["cosine"].min()), cosine_p5=float(np.percentile(got["cosine"], 5)),
        worst_image=images["name"][worst].item())
    if not labelled:
        return stats
    labels = images["label"]
    correct, ref_correct = top1 == labels, ref_top1 == labels
    top5 = float((got["top5"] == labels[:, None]).any(axis=1).mean())
    acc = float(correct.mean())
    stats = dataclasses.replace(stats, top1=acc, top1_ci=tuple(metrics.wilson(acc * n, n)), top5=top5,
                                top5_ci=tuple(metrics.wilson(top5 * n, n)))
    if is_reference:
        return stats
    return dataclasses.replace(stats, paired=metrics.paired_accuracy(ref_correct, correct),
                               classes_lost=tuple(metrics.class_losses(labels, ref_correct, correct, names)))


def summarize(cfg: PassConfig, folder: ArtifactFolder, shards: Sequence[Shard], reference: Row,
              rows: list[Row], mkey: str, prep: str, info: DatasetInfo, started: float) -> AccuracyReport:
    everything = _gather(cfg.out, shards, IMAGES_PART, reference.key)
    ref = _gather(cfg.out, shards, REFERENCE_PART, reference.key)
    if everything is None or ref is None:
        raise AccuracyError("the pass ended with shards missing: run the same command again to finish them")
    ok = everything["ok"]
    if not ok.any():
        raise AccuracyError(f"--dataset {cfg.dataset}: none of its {len(ok)} images could be read "
                            f"({everything['error'][0]})")
    images = {k: v[ok] for k, v in everything.items()}
    bad = [f"{n}: {e}" for n, e in zip(everything["name"][~ok], everything["error"][~ok], strict=True)]
    info = dataclasses.replace(info, unreadable=len(bad), unreadable_files=tuple(bad[:UNREADABLE_LISTED]))
    labelled = info.labelled
    names = folder.labels
    ref_row = _row_stats(reference, ref, ref, images, labelled, names, True)
    out = []
    for row in rows:
        got = _gather(cfg.out, shards, row.name, row.key) if row.status == "ok" else None
        if got is None:
            out.append(RowAccuracy(row.backend, row.precision, row.status if row.status != "ok" else "error",
                                   row.reason or "no results", row.executed))
            continue
        if not row.executed:  # nothing ran this time: what ran when the shards were made
            with contextlib.suppress(RecordError):
                rec = ShardRecord.read(cfg.out / shards[0].folder / f"{row.name}.json")
                row.executed = rec.executed
        out.append(_row_stats(row, got, ref, images, labelled, names, False))
    return AccuracyReport(
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), machine=machine.describe(),
        variant=folder.variant_name, weights=folder.weights_spec, artifacts=str(folder.path),
        model_key=mkey, preprocessing=prep, dataset=info, reference=ref_row, rows=tuple(out),
        seconds=round(time.monotonic() - started, 1), workers=cfg.workers, batch=cfg.batch)
