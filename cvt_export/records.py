"""The vocabulary of what the tools write and read, as typed, frozen records.

Each top-level record carries a versioned `schema` ("family/N"): `from_json` reads its own
family at its version or older and refuses a newer version or a foreign file with one line
(a `RecordError`); `to_json` writes the current version. Nested records are plain fields. A
field is added once, here, and every reader and renderer gets it by name, checked by mypy.

A field's `metadata` may say how it is spelled in the file: `json` (the key, when it is not a
Python name, e.g. "pass"), `omit` (left out of the file while it is None, as the writer leaves
it out), `empty` (None written and read as `{}`), `rest` (a dict field that keeps the keys the
record does not name, so a file of another minor version is rewritten without losing them).

Records: the artifact folder's manifest (and the sidecars backends keep beside its files), the
accuracy pass (its shards and its report), cvt-bench's report, its recommendation, the profile,
the regression gate's baseline, `cvt-bench triton`'s report, deploy's record, a Triton
repository's record, and tune's per-configuration figures.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

from cvt_ref.errors import CvtError
from cvt_ref.source import Activation

R = TypeVar("R", bound="Record")
T = TypeVar("T")


class RecordError(CvtError):
    """A file that is not the record it should be: foreign, newer, truncated or malformed."""


class NewerRecord(RecordError):
    """A record of a schema version newer than this cvt-export reads: the file is not damaged,
    this tool is too old for it (the remedy is an upgrade, not a rewrite)."""


def _convert(hint: Any, value: Any, where: str) -> Any:
    """JSON value -> the field's declared type (nested records, tuples, optionals, plain values)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None:
            if len(options) == len(typing.get_args(hint)):
                raise RecordError(f"{where}: null where a value is required")
            return None
        for option in options[:-1]:  # the first that takes the value
            try:
                return _convert(option, value, where)
            except RecordError:
                pass
        return _convert(options[-1], value, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise RecordError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        item = args[0]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        args = typing.get_args(hint)
        if args:
            return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecordError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint in (int, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise RecordError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    return value  # Any


def _build(cls: type[Any], data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    known = {f.metadata.get("json", f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        key = f.metadata.get("json", f.name)
        if not f.init:
            continue
        if f.metadata.get("rest"):
            kwargs[f.name] = {k: v for k, v in data.items() if k not in known and k != "schema"}
            continue
        if f.metadata.get("empty") and data.get(key) == {}:
            kwargs[f.name] = None
        elif key in data:
            kwargs[f.name] = _convert(hints[f.name], data[key], f"{where}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{where}: missing field {key!r}")
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {"schema": value.schema()} if isinstance(value, Record) else {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.metadata.get("rest"):
                out.update(_plain(v))
                continue
            if v is None and f.metadata.get("omit"):
                continue
            out[f.metadata.get("json", f.name)] = {} if v is None and f.metadata.get("empty") else _plain(v)
        return out
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Record:
    """A top-level record: a file of its own, with a versioned schema."""

    FAMILY: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "record"

    @classmethod
    def schema(cls) -> str:
        return f"{cls.FAMILY}/{cls.VERSION}"

    def to_json(self) -> dict[str, Any]:
        return typing.cast(dict[str, Any], _plain(self))

    @classmethod
    def from_json(cls: type[R], data: object, where: str = "") -> R:
        where = where or cls.WHAT
        if not isinstance(data, dict):
            raise RecordError(f"{where}: not a {cls.WHAT} (expected a JSON object)")
        schema = data.get("schema")
        family, _, version = str(schema).partition("/")
        if family != cls.FAMILY or not version.isdigit():
            raise RecordError(f"{where}: not a {cls.WHAT} (schema {schema!r}, expected {cls.schema()!r})")
        if int(version) > cls.VERSION:
            raise NewerRecord(f"{where}: written by a newer cvt-export ({schema}; this one reads "
                              f"{cls.schema()} and older): upgrade cvt-export")
        return typing.cast(R, _build(cls, data, where))

    @classmethod
    def read(cls: type[R], path: Path) -> R:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise RecordError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecordError(f"{path}: not a {cls.WHAT} ({type(e).__name__}: {e})") from None
        return cls.from_json(data, str(path))


# --- the accuracy pass -----------------------------------------------------------------------

@dataclass(frozen=True)
class ShardRecord(Record):
    """What a finished shard file holds: written after the file, so a file without its record,
    or whose bytes do not hash to `sha256`, is never taken as finished."""

    FAMILY: ClassVar[str] = "cvt-accuracy-shard"
    WHAT: ClassVar[str] = "cvt-bench accuracy shard record"

    shard: str        # the key of the shard's images (names, sizes, modification times)
    row: str          # "images", "reference", or "BACKEND-PRECISION"
    row_key: str      # what produced it (model content, artifact file, preprocessing)
    images: int
    file: str         # the .npz beside this record
    sha256: str       # of that file's bytes
    executed: str = ""  # what really ran (the runner's report), for a report made from shards alone


@dataclass(frozen=True)
class Paired:
    """A row's top-1 accuracy against the reference's on the same images."""

    n: int
    lost: int             # right on the reference, wrong on this row
    gained: int           # wrong on the reference, right on this row
    difference: float     # row - reference, as a share of n
    difference_ci: tuple[float, ...]
    p_value: float        # exact McNemar
    within_noise: bool


@dataclass(frozen=True)
class ClassLoss:
    label: int
    name: str
    images: int
    reference_correct: int
    row_correct: int
    net_lost: int


@dataclass(frozen=True)
class RowAccuracy:
    """One row of the accuracy pass (the reference included)."""

    backend: str
    precision: str
    status: str = "ok"                 # ok | skipped | error
    reason: str = ""
    executed: str = ""
    n: int = 0
    top1: float | None = None          # labelled folders only
    top1_ci: tuple[float, ...] = ()
    top5: float | None = None
    top5_ci: tuple[float, ...] = ()
    top1_agreement: float | None = None  # with the reference's top-1 (every folder)
    top1_agreement_ci: tuple[float, ...] = ()
    top5_contains_reference: float | None = None  # the reference's top-1 among this row's top 5
    cosine_min: float | None = None    # logits against the reference's, per image
    cosine_p5: float | None = None
    worst_image: str = ""
    paired: Paired | None = None       # labelled folders only; None for the reference
    classes_lost: tuple[ClassLoss, ...] = ()


@dataclass(frozen=True)
class DatasetInfo:
    source: str
    images: int
    labelled: bool
    label_note: str
    classes: int
    shards: int
    shard_size: int
    shards_reused: int
    reference_cached: int      # images whose reference outputs came from the cache
    reference_cache: str
    unreadable: int = 0        # images that could not be read (left out of every figure)
    unreadable_files: tuple[str, ...] = ()  # the first of them, "name: reason"


@dataclass(frozen=True)
class PartRate:
    """What one part of the pass (the reference or a row) did in this run."""

    name: str
    images: int            # images it computed (the reference: those not in the cache)
    seconds: float         # its own time inside the pass
    decoded_per_s: float | None = None  # the same runner, after the pass, on a batch already decoded


@dataclass(frozen=True)
class Throughput:
    """How close the pass came to its parts' own speed on decoded tensors (one machine only)."""

    images: int            # images through the pass in this run
    seconds: float         # the stream, first batch to last (setup, compiling, the summary excluded)
    decode_wait: float     # of which waiting for decoded batches
    parts: tuple[PartRate, ...] = ()
    efficiency: float | None = None  # sum over parts of images / decoded_per_s, over seconds

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class ClusterInfo:
    """Where a pass ran when it ran on a Ray cluster."""

    address: str
    nodes: int            # nodes an actor was placed on
    lost: int             # nodes lost mid-pass
    shards_redone: int    # shards that went back to the queue with a lost node
    shards_by_node: dict[str, int] = field(default_factory=dict)  # node id -> shards it finished


@dataclass(frozen=True)
class AccuracyReport(Record):
    """`cvt-bench accuracy`'s accuracy.json (fields documented in docs/accuracy.md)."""

    FAMILY: ClassVar[str] = "cvt-accuracy"
    WHAT: ClassVar[str] = "cvt-bench accuracy report"

    created: str
    machine: Machine
    variant: str
    weights: str
    artifacts: str
    model_key: str
    preprocessing: str
    dataset: DatasetInfo
    reference: RowAccuracy
    rows: tuple[RowAccuracy, ...] = field(default_factory=tuple)
    seconds: float = 0.0
    workers: int = 0
    batch: int = 0
    cluster: ClusterInfo | None = None
    time: dict[str, float] = field(default_factory=dict)  # seconds: wall, decode_wait, reference, each row
    throughput: Throughput | None = None   # None on a cluster and when nothing ran in this run


# --- cvt-bench's report (report.json, schema cvt-bench/1) ---------------------------------------

OMIT: Any = {"omit": True}


@dataclass(frozen=True)
class LatencyStats:
    """One batch size's timings: milliseconds, and images/s at the median."""

    iterations: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    stdev_ms: float
    images_per_s: float
    median_ci_ms: tuple[float, ...] | None = None   # 95% interval of the median (older files: none)
    modes_ms: tuple[float, ...] | None = None       # both clusters' medians when bimodal
    rounds: int | None = field(default=None, metadata=OMIT)  # interleaved rounds (tune), when timed so

    @property
    def interval(self) -> tuple[float, float]:
        """The median's 95% interval (a point where the file has none)."""
        lo, hi = self.median_ci_ms or (self.median_ms, self.median_ms)
        return float(lo), float(hi)


@dataclass(frozen=True)
class HeldFidelity:
    """metrics.fidelity()'s summary of logits against the reference's (held-out images, a file's
    validation, a SmoothQuant candidate), with top-1 accuracy against labels when known (tune)."""

    cosine_min: float
    max_abs: float
    top1_agreement: float
    n: int
    cosine_p5: float
    top1_agreement_ci: tuple[float, ...]
    top1: float | None = field(default=None, metadata=OMIT)
    top1_ci: tuple[float, ...] | None = field(default=None, metadata=OMIT)
    top1_drop: float | None = field(default=None, metadata=OMIT)  # accuracy points lost vs the reference


@dataclass(frozen=True)
class RoleFidelity:
    """Fidelity on the images of one role (selection, confirmation, or both: held_out)."""

    cosine_min: float
    max_abs: float
    top1_agreement: float
    n: int = 0
    cosine_p5: float | None = None
    top1_agreement_ci: tuple[float, ...] | None = None
    images: int = 0

    @classmethod
    def of(cls, fid: HeldFidelity, images: int) -> RoleFidelity:
        return cls(fid.cosine_min, fid.max_abs, fid.top1_agreement, fid.n, fid.cosine_p5,
                   fid.top1_agreement_ci, images)


@dataclass(frozen=True)
class Fidelity:
    """A row's logits against the reference's, on every input, then per role."""

    max_abs: float
    mean_abs: float
    cosine_min: float
    cosine_mean: float
    top1_agreement: float
    top5_agreement: float
    kl_mean: float
    kl_max: float
    worst_image: str
    worst_cosine: float
    n: int = 0
    cosine_p5: float | None = field(default=None, metadata=OMIT)
    top1_agreement_ci: tuple[float, ...] | None = field(default=None, metadata=OMIT)
    bounds: dict[str, float] | None = field(default=None, metadata=OMIT)
    passed: bool = field(default=True, metadata={"json": "pass"})
    broken: tuple[str, ...] = ()
    held_out: RoleFidelity | None = field(default=None, metadata=OMIT)
    selection: RoleFidelity | None = field(default=None, metadata=OMIT)
    confirmation: RoleFidelity | None = field(default=None, metadata=OMIT)

    @property
    def judged(self) -> RoleFidelity | Fidelity:
        """What decides: the selection images (older reports: the held-out images, else all)."""
        return self.selection or self.held_out or self

    @property
    def stated(self) -> RoleFidelity | Fidelity:
        """What a recommendation states: the confirmation images when there are some."""
        return self.confirmation or self.judged


@dataclass(frozen=True)
class Accuracy:
    top1: float
    top5: float
    n: int = 0
    top1_ci: tuple[float, ...] | None = None


@dataclass(frozen=True)
class DriftPoint:
    point: str            # "stage S block B", or "logits"
    cosine_min: float
    error: float          # 1 - cosine_min
    rel_max_abs: float


@dataclass(frozen=True)
class Floor:
    """A row's distance from its runtime's GEMM limit, measured in the same run."""

    gemm_gmac_per_s: float
    limit_shape: tuple[int, ...]
    macs_per_image: float
    gemm_macs_per_image: float | None = field(default=None, metadata=OMIT)  # older files: the total only
    conv_macs_per_image: float | None = field(default=None, metadata=OMIT)
    ms: dict[str, float] = field(default_factory=dict)      # batch -> the floor
    times: dict[str, float] = field(default_factory=dict)   # batch -> median / floor


@dataclass(frozen=True)
class Row:
    """One backend x precision of a cvt-bench run."""

    backend: str
    precision: str
    status: str = "ok"                 # ok | skipped | error
    reason: str = ""
    executed: str = ""
    device: str = ""
    artifact: str = ""
    first_inference_s: float | None = None
    peak_rss_mb: float | None = None
    fidelity: Fidelity | None = field(default=None, metadata={"empty": True})
    accuracy: Accuracy | None = None
    batch_consistency_max_abs: float | None = None      # each image alone vs in the largest batch
    batch_consistency_cosine_min: float | None = field(default=None, metadata=OMIT)  # older files: none
    latency: dict[str, LatencyStats] = field(default_factory=dict)   # batch -> timings
    speedup: dict[str, float] = field(default_factory=dict)          # batch -> baseline / this
    drift: tuple[DriftPoint, ...] = ()
    drift_located: str | None = None
    floor: Floor | None = field(default=None, metadata={"empty": True})  # {}: not measured

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Weights:
    spec: str
    kind: str = ""
    sha256: str | None = None
    activation: Activation | None = field(default=None, metadata=OMIT)  # older folders: none recorded


@dataclass(frozen=True)
class ModelSummary:
    """What a report or a record says of the artifact folder it measured."""

    variant: str
    weights: Weights
    artifacts: str
    onnx_sha256: str


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int | None
    isa: tuple[str, ...]
    os: str = ""
    python: str = ""
    libraries: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RoleSize:
    inputs: int
    sources: int


@dataclass(frozen=True)
class Inputs:
    source: str
    images: int
    labelled: bool
    accuracy_note: str = ""
    sha256: str = ""
    held_out_note: str = ""
    roles: dict[str, RoleSize] | None = None
    image_size: int = 224


@dataclass(frozen=True)
class BenchSettings:
    """What the run was asked for (cvt-bench's options, as `harness.bench.BenchConfig` holds them)."""

    backends: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()
    batches: tuple[int, ...] = (1, 8)
    variant: str = "cvt-13"
    weights: str | None = None
    artifacts: str | None = None
    dataset: str | None = None
    limit: int | None = None
    golden: bool | None = field(default=None, metadata=OMIT)  # older files: not recorded
    warmup: int = 3
    iters: int | None = None
    seconds: float = 2.0
    threads: int | None = None
    strict: bool = False
    drift_images: int = 4


@dataclass(frozen=True)
class Baseline:
    backend: str
    precision: str


@dataclass(frozen=True)
class PassedOver:
    """A row faster than the pick that the budget kept out."""

    backend: str
    precision: str
    median_ms: float
    why: str


@dataclass(frozen=True)
class StatedFidelity:
    cosine_min: float | None = None
    cosine_p5: float | None = None
    top1_agreement: float | None = None
    top1_agreement_ci: tuple[float, ...] | None = None
    images: int | None = None


@dataclass(frozen=True)
class Pick:
    """The row a recommendation picks for one objective."""

    backend: str
    precision: str
    executed: str
    artifacts: str
    images_per_s: float | None = field(default=None, metadata=OMIT)  # throughput objectives
    median_ms: float | None = None     # older files: latency only
    median_ci_ms: tuple[float, ...] | None = None
    bimodal_ms: tuple[float, ...] | None = None
    batch: int = 1
    why: str = ""
    tied_with: tuple[str, ...] = ()
    cosine_min: float | None = None
    top1_agreement: float | None = None
    confirmation: StatedFidelity | None = None
    passed_over: tuple[PassedOver, ...] = ()
    onnx_sha256: str | None = field(default=None, metadata=OMIT)  # in recommendation.json


@dataclass(frozen=True)
class Recommendation(Record):
    """recommendation.json: the configuration to deploy per objective (harness/recommend.py)."""

    FAMILY: ClassVar[str] = "cvt-recommendation"
    WHAT: ClassVar[str] = "cvt-bench recommendation"

    created: str
    machine: Machine
    model: ModelSummary
    budget: str | tuple[str, ...]   # the --budget bounds, or a sentence: each precision's bounds
    judged_on: str
    roles: dict[str, RoleSize] | None = None
    objectives: dict[str, Pick | None] = field(default_factory=dict)
    unmet: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchReport(Record):
    """cvt-bench's report.json (fields documented in docs/benchmark.md)."""

    FAMILY: ClassVar[str] = "cvt-bench"
    WHAT: ClassVar[str] = "cvt-bench report"

    created: str
    machine: Machine
    model: ModelSummary
    inputs: Inputs
    settings: BenchSettings
    baseline: Baseline
    results: tuple[Row, ...] = ()
    recommendation: Recommendation | None = field(default=None, metadata=OMIT)

    @property
    def batches(self) -> list[str]:
        return [str(b) for b in self.settings.batches]

    @property
    def ran(self) -> list[Row]:
        return [r for r in self.results if r.ok]


# --- cvt-bench profile (profile-BACKEND-PRECISION.json, schema cvt-profile/1) ----------------------

@dataclass(frozen=True)
class OpGroup:
    """Operators of one type (the GEMMs as one group) in a profiled run."""

    group: str
    ms: float
    share: float                  # of the operators' time
    nodes: int
    ops: tuple[str, ...]
    precisions: dict[str, float]  # the precision a kernel ran in -> its ms


@dataclass(frozen=True)
class BatchProfile:
    run_ms: float                 # the whole inference (the median profiled run)
    runs: int
    kernels_ms: float
    gemm_ms: float
    gemm_share: float
    by_op: tuple[OpGroup, ...]
    top_non_gemm: tuple[str, ...]
    by_block: dict[str, float]
    gemm_by_block: dict[str, float]
    by_precision: dict[str, float]
    gemm_floor_ms: float          # the model's matrix products at the GEMM limit
    gemm_vs_floor: float
    floor_ms: float | None = field(default=None, metadata=OMIT)  # every multiply-add (older files: none)
    run_vs_floor: float = 0.0
    block_gemm_floor_ms: dict[str, float] = field(default_factory=dict)

    def stage_gemm_vs_floor(self) -> dict[str, float]:
        """Per stage ("stage S"), its blocks' GEMM time over their matrix products at the limit."""
        spent: dict[str, list[float]] = {}
        for block, floor in self.block_gemm_floor_ms.items():
            if block.startswith("stage "):
                pair = spent.setdefault(" ".join(block.split()[:2]), [0.0, 0.0])
                pair[0] += self.gemm_by_block.get(block, 0.0)
                pair[1] += floor
        return {stage: ms / floor for stage, (ms, floor) in spent.items()}


@dataclass(frozen=True)
class GemmLimitFigure:
    shape: tuple[int, ...]
    gmac_per_s: float


@dataclass(frozen=True)
class ProfileReport(Record):
    """`cvt-bench profile`'s file: where one backend x precision spends its time, per batch size."""

    FAMILY: ClassVar[str] = "cvt-profile"
    WHAT: ClassVar[str] = "cvt-bench profile"

    created: str
    machine: Machine
    artifacts: str
    backend: str
    precision: str
    executed: str
    gemm_limit: GemmLimitFigure
    gemm_macs_per_image: float
    conv_macs_per_image: float | None = field(default=None, metadata=OMIT)  # older files: none
    batches: dict[str, BatchProfile] = field(default_factory=dict)


# --- the artifact folder's manifest (artifacts.MANIFEST) ----------------------------------------
# Read by `artifacts.ArtifactFolder` alone, which hands these records out. kw_only: the fields are
# in the file's order; `rest` keeps what an earlier or later writer added that is not named here.

REST: Any = {"rest": True}


@dataclass(frozen=True, kw_only=True)
class Outliers:
    """cvt_ref's function-preserving outlier stress: channels per site, seed, factor range."""

    channels: int
    seed: int
    low: float | None = field(default=None, metadata=OMIT)
    high: float | None = field(default=None, metadata=OMIT)
    share: float | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True, kw_only=True)
class ExportSource:
    """What was exported: two folders with the same identity hold the same model."""

    IDENTITY: ClassVar[tuple[str, ...]] = ("variant", "image_size", "num_classes", "weights",
                                           "weights_sha256", "activation", "outliers", "opset", "batch")

    variant: str
    image_size: int | None = None
    num_classes: int | None = None
    weights: str
    weights_sha256: str | None = None
    activation: Activation | None = None
    opset: int | None = None
    outliers: Outliers | None = None
    batch: int | str = "dynamic"
    tools: dict[str, str] = field(default_factory=dict)
    cvt_export: str | None = field(default=None, metadata=OMIT)
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)

    def changes(self, new: ExportSource) -> list[str]:
        """What an export of `new` would change about a folder exported from this."""
        def shown(s: ExportSource, k: str) -> Any:
            v = getattr(s, k)
            return _plain(v) if dataclasses.is_dataclass(v) else v
        return [f"{k} {shown(self, k)} → {shown(new, k)}" for k in self.IDENTITY
                if getattr(self, k) != getattr(new, k)]

    def same_model(self, new: ExportSource) -> bool:
        return not self.changes(new)


@dataclass(frozen=True, kw_only=True)
class ExportSettings:
    exporter: str = ""
    opset: int | None = None
    batch: int | None = None
    image_size: int | None = None
    batchnorm: str = ""
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    image_size: int
    resize: int
    crop: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """The images INT8 calibrated on and the keys of its cached ranges (folders exported before
    fingerprints or request keys lack them)."""

    source: str | None = None            # "bundled photos" or the --calib folder
    images: int | None = None
    asked: int | None = None             # --calib-size
    sha256: str | None = None            # of the set (names and bytes)
    method: str | None = None
    cache_key: str | None = None
    request_key: str | None = field(default=None, metadata=OMIT)
    files: tuple[str, ...] = ()
    digests: tuple[str, ...] = ()
    fingerprints: tuple[str, ...] = field(default=(), metadata=OMIT)
    distinct: int | None = field(default=None, metadata=OMIT)
    minimum: int | None = field(default=None, metadata=OMIT)
    warning: str | None = field(default=None, metadata=OMIT)
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)

    @property
    def key(self) -> str | None:
        """What an export asked for (options and images): the request key, or the cache key of a
        folder exported before request keys."""
        return self.request_key or self.cache_key


@dataclass(frozen=True)
class TensorSpec:
    """An input or output as the artifact declares it: a str dimension is dynamic (e.g. "batch")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if isinstance(self.shape[0], int) else None


@dataclass(frozen=True, kw_only=True)
class GraphSummary:
    opset: int | None = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    nodes: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    initializers: int = 0
    parameters: int = 0
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True, kw_only=True)
class Validation:
    """A file's fidelity against PyTorch at export (FP32: max-abs per batch size; derived files:
    cosine, top-1, max-abs on the named photos, with the bounds it was held to)."""

    backend: str = ""
    cosine_min: float | None = field(default=None, metadata=OMIT)
    max_abs: float | dict[str, float] | None = None
    top1_agreement: float | None = None
    n: int | None = field(default=None, metadata=OMIT)
    cosine_p5: float | None = field(default=None, metadata=OMIT)
    top1_agreement_ci: tuple[float, ...] | None = field(default=None, metadata=OMIT)
    images: int | None = None
    on: str | None = field(default=None, metadata=OMIT)
    bounds: dict[str, float] = field(default_factory=dict)
    broken: tuple[str, ...] | None = field(default=None, metadata=OMIT)
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True, kw_only=True)
class SmoothSearch:
    """The SmoothQuant strength search of an INT8 export: each candidate strength's fidelity on the
    selection images, which were tied, which was chosen and by what rule."""

    chosen: str
    on: str
    by: str
    tied: tuple[str, ...] = ()
    candidates: dict[str, HeldFidelity] = field(default_factory=dict)
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True, kw_only=True)
class Policy:
    """How a derived file was made: what is quantized or kept in float, and (INT8) the options
    it was calibrated with, its migration and the strength search."""

    quantized_ops: tuple[str, ...] | None = field(default=None, metadata=OMIT)
    method: str | None = field(default=None, metadata=OMIT)
    percentile: float | None = field(default=None, metadata=OMIT)
    quantize_outputs: bool | None = field(default=None, metadata=OMIT)
    depthwise: bool | None = field(default=None, metadata=OMIT)
    attention: bool | None = field(default=None, metadata=OMIT)
    smooth: float | None = field(default=None, metadata=OMIT)
    keep: tuple[str, ...] | None = field(default=None, metadata=OMIT)
    smoothing: dict[str, Any] | None = field(default=None, metadata=OMIT)
    fp32_ops: tuple[str, ...] | None = field(default=None, metadata=OMIT)
    fp32_nodes: str | None = field(default=None, metadata=OMIT)
    io: str | None = field(default=None, metadata=OMIT)
    fp32: str | None = field(default=None, metadata=OMIT)
    activations: str | None = field(default=None, metadata=OMIT)
    weights: str | None = field(default=None, metadata=OMIT)
    bias: str | None = field(default=None, metadata=OMIT)
    quantized_inputs_of: dict[str, int] | None = field(default=None, metadata=OMIT)
    dynamic_matmuls: int | None = field(default=None, metadata=OMIT)
    smooth_search: SmoothSearch | None = field(default=None, metadata=OMIT)
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True, kw_only=True)
class TunedConfiguration:
    """One configuration `cvt-export tune` measured: the blocks it keeps in float, its fidelity on the
    selection images (which decide) and the confirmation images (which check), its speed at the
    objective's batch (interleaved rounds), and whether the budget held on both."""

    name: str                      # fp32 | fp16 | bf16 | int8 | mixed (k float) ...
    precision: str
    float_blocks: tuple[str, ...] = ()
    within_budget: bool = False
    fidelity: HeldFidelity
    confirmation: HeldFidelity
    speed: LatencyStats | None = None
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True, kw_only=True)
class TuneDecisions:
    """What `cvt-export tune` decided (tune.json, and the mix's manifest entry): the budget and
    objective, the held-out images' roles, each block's sensitivity, every configuration measured
    and the one chosen."""

    backend: str
    objective: str
    budget: tuple[str, ...]
    margin: float = 0.0
    held_out: str = ""
    roles: dict[str, RoleSize] = field(default_factory=dict)
    search: str = ""
    sensitivity: dict[str, float] = field(default_factory=dict)
    configs: tuple[TunedConfiguration, ...] = ()
    chosen: str | None = None
    message: str = ""
    machine: Machine | None = None
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One precision's ONNX file: its hash and size, its external-data files, its graph, what it
    was made from, how, and its fidelity at export."""

    precision: str
    sha256: str
    bytes: int | None = field(default=None, metadata=OMIT)
    data_files: dict[str, str] = field(default_factory=dict)
    graph: GraphSummary | None = field(default=None, metadata=OMIT)
    # the FP32 file's sha256 (a derived file's)
    made_from: str | None = field(default=None, metadata={"json": "from", "omit": True})
    int8_from: str | None = field(default=None, metadata=OMIT)  # tune's mix: the INT8 file's sha256
    calibration: Calibration | None = field(default=None, metadata=OMIT)
    policy: Policy | None = field(default=None, metadata=OMIT)
    validation: Validation | None = field(default=None, metadata=OMIT)
    probes: dict[str, str] | None = field(default=None, metadata=OMIT)
    # tune's decisions (the mix); as written, a dictionary, where a release before 2026-11-30 wrote
    # them in an earlier form (no confirmation images, no margin)
    tune: TuneDecisions | dict[str, Any] | None = field(default=None, metadata=OMIT)
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True, kw_only=True)
class IrEntry:
    """An OpenVINO IR made from one of the folder's ONNX files."""

    made_from: str = field(metadata={"json": "from"})   # that ONNX file's sha256
    onnx: str
    openvino: str = ""
    nncf: str | None = field(default=None, metadata=OMIT)         # an NNCF-quantized IR: its version
    calibration: str | None = field(default=None, metadata=OMIT)  # and its calibration set's sha256
    sha256: dict[str, str] = field(default_factory=dict)
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """An artifact folder's `manifest.json`: `schema` is a plain integer (the folder's format)."""

    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "artifact folder manifest"

    schema: int = 1
    created: str | None = field(default=None, metadata=OMIT)
    source: ExportSource
    variant: str
    weights: Weights
    labels: tuple[str, ...] | None = field(default=None, metadata=OMIT)
    export: ExportSettings | None = field(default=None, metadata=OMIT)
    preprocess: Preprocess | None = field(default=None, metadata=OMIT)
    calibration: Calibration | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)
    irs: dict[str, IrEntry] | None = field(default=None, metadata={"json": "openvino", "omit": True})
    scratch_of: str | None = field(default=None, metadata=OMIT)  # tune's scratch: the folder it works for
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)

    @classmethod
    def from_json(cls, data: object, where: str = "") -> Manifest:
        where = where or cls.WHAT
        if not isinstance(data, dict):
            raise RecordError(f"{where}: not an {cls.WHAT} (expected a JSON object)")
        schema = data.get("schema")
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise RecordError(f"{where}: not an {cls.WHAT} (schema {schema!r}, expected {cls.VERSION})")
        if schema > cls.VERSION:
            raise NewerRecord(f"{where}: written by a newer cvt-export (manifest schema {schema}; this one "
                              f"reads {cls.VERSION} and older): upgrade cvt-export")
        return typing.cast(Manifest, _build(cls, data, where))

    def to_json(self) -> dict[str, Any]:
        return typing.cast(dict[str, Any], _plain(self))

    def entry(self, name: str) -> FileEntry | None:
        return self.files.get(name)


def parse(cls: type[T], data: object, where: str) -> T:
    """A nested record (a manifest's file entry, its source) from its JSON object; a RecordError
    that names `where` when it is not one."""
    return typing.cast(T, _build(cls, data, where))


def as_json(value: Any) -> Any:
    """A nested record (or a value holding records) as the JSON its file holds."""
    return _plain(value)


# --- files a backend keeps beside the artifacts (each beside the file it describes) -----------

@dataclass(frozen=True, kw_only=True)
class OptimizedGraph:
    """ONNX Runtime's saved optimized graph: the artifact it was optimized from, and its own hash."""

    made_from: str = field(metadata={"json": "from"})
    sha256: str


@dataclass(frozen=True, kw_only=True)
class EngineProfile:
    """A TensorRT engine's optimization profile (batch sizes) and workspace."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    workspace_gib: float | None = None


@dataclass(frozen=True, kw_only=True)
class EngineRecord:
    """A TensorRT engine's sidecar: what it was built from, how, where, and its own hash."""

    key: str
    onnx: str
    onnx_sha256: str
    build: EngineProfile = field(default_factory=EngineProfile)
    gpu: str = ""
    compute_capability: str = ""
    tensorrt: str = ""
    sha256: str = ""


def read_sidecar(cls: type[T], path: Path) -> T | None:
    """A backend's sidecar record, or None when it is missing, unreadable or not that record (the
    file it describes is then made again)."""
    try:
        return parse(cls, json.loads(path.read_text()), str(path))
    except (OSError, ValueError, RecordError):
        return None


# --- the regression gate's baseline (reports/baseline/VARIANT.json) ------------------------------

@dataclass(frozen=True, kw_only=True)
class EncodedArray:
    """A float32 array as the baseline stores it: little-endian bytes in base64, with its shape."""

    dtype: str = "float32"
    shape: tuple[int, ...]
    base64: str


@dataclass(frozen=True)
class BaselineMachine:
    cpu: str = ""
    cores: int | None = None
    isa: tuple[str, ...] = ()
    libraries: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BaselineExport:
    """The export options the baseline's artifacts were made with."""

    image_size: int | None = None
    opset: int | None = None
    batch: int | str | None = "dynamic"


@dataclass(frozen=True, kw_only=True)
class GoldenInputs:
    recipe: str = ""
    images: int
    sha256: str


@dataclass(frozen=True)
class BaselineReference:
    logits: EncodedArray


@dataclass(frozen=True)
class BaselineFidelity:
    max_abs: float
    cosine_min: float
    top1_agreement: float


@dataclass(frozen=True)
class Tolerance:
    """What today's run must meet: a maximum max-abs, minimum cosine and top-1 agreement."""

    max_abs_max: float | None = field(default=None, metadata=OMIT)
    cosine_min_min: float | None = field(default=None, metadata=OMIT)
    top1_agreement_min: float | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True, kw_only=True)
class BaselineRow:
    fidelity: BaselineFidelity
    tolerance: Tolerance
    executed: str = ""
    latency_batch: int
    median_ms: float


@dataclass(frozen=True, kw_only=True)
class RegressBaseline(Record):
    """The golden inputs' recipe and hash, the reference logits for them, each artifact's graph
    signature, and per BACKEND/PRECISION the fidelity figures with tolerances and a latency."""

    FAMILY: ClassVar[str] = "cvt-regress"
    WHAT: ClassVar[str] = "cvt-regress baseline"

    created: str = ""
    machine: BaselineMachine | None = field(default=None, metadata=OMIT)  # the first baselines: none
    variant: str
    weights: str
    export: BaselineExport
    inputs: GoldenInputs
    reference: BaselineReference
    graphs: dict[str, GraphSummary]
    results: dict[str, BaselineRow]



@dataclass(frozen=True)
class RegressFinding:
    """One thing the gate found: a regression ("fail") or a difference a reviewer must accept
    ("change")."""

    kind: str
    what: str
    detail: str
    text: str  # the line the console prints


@dataclass(frozen=True, kw_only=True)
class RegressResult(Record):
    """The gate's result (`cvt-bench regress --json`, and its Markdown job summary): the verdict and
    exit code, every finding, and the information lines."""

    FAMILY: ClassVar[str] = "cvt-regress-result"
    WHAT: ClassVar[str] = "cvt-regress result"

    baseline: str
    verdict: str
    exit_code: int
    updated: bool
    findings: tuple[RegressFinding, ...] = ()
    info: tuple[str, ...] = ()


# --- `cvt-bench triton`'s report (a served model measured like a backend) -----------------------

@dataclass(frozen=True)
class ServedTarget:
    url: str
    model: str
    protocol: str = "http"


@dataclass(frozen=True)
class ServedInputs:
    source: str
    images: int


@dataclass(frozen=True)
class ClientLatency:
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float


@dataclass(frozen=True)
class ServerStats:
    """Triton's own statistics over a run, as differences of its counters."""

    requests: int
    executed_batches: dict[str, int]
    queue_ms_per_request: float
    compute_ms_per_request: float


@dataclass(frozen=True)
class Spread:
    """Each latency percentile's lowest and highest over a run's windows."""

    p50_ms: tuple[float, ...]
    p90_ms: tuple[float, ...]
    p99_ms: tuple[float, ...]


@dataclass(frozen=True)
class LoadSpec:
    """A load level: closed loop (`concurrency` clients) or open loop (`rate` requests per second)."""

    kind: str      # concurrency | rate
    value: float   # clients, or requests per second

    def __str__(self) -> str:
        return f"concurrency {self.value:g}" if self.kind == "concurrency" else f"{self.value:g} req/s"


@dataclass(frozen=True)
class Window:
    """One measurement window of a run (equal lengths by answer time)."""

    requests: int
    per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float


@dataclass(frozen=True, kw_only=True)
class LoadRun:
    """One load level: closed loop (`concurrency` clients) or open loop (`rate` per second)."""

    load: LoadSpec | None = field(default=None, metadata=OMIT)   # version 1: not recorded
    requests: int
    sent: int | None = field(default=None, metadata=OMIT)        # version 1: every request was sent
    answered: int | None = field(default=None, metadata=OMIT)    # version 1: every request answered
    failed: int = 0
    not_sent: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float
    images_per_s: float
    concurrency: int | None = field(default=None, metadata=OMIT)
    rate: float | None = field(default=None, metadata=OMIT)
    offered_per_s: float | None = field(default=None, metadata=OMIT)
    answered_per_s: float | None = field(default=None, metadata=OMIT)
    latency_ms: ClientLatency | None = field(default=None, metadata=OMIT)
    windows: tuple[Window, ...] | None = field(default=None, metadata=OMIT)
    spread_ms: Spread | None = field(default=None, metadata=OMIT)
    stable: bool | None = field(default=None, metadata=OMIT)
    server: ServerStats | None = None
    server_unavailable: str | None = field(default=None, metadata=OMIT)
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)

    @property
    def label(self) -> str:
        return f"{self.concurrency} clients" if self.concurrency is not None else f"{self.rate:g}/s"

    @property
    def answered_of_sent(self) -> tuple[int, int]:
        """(answered, sent): every request, for a report of the first version."""
        sent = self.requests if self.sent is None else self.sent
        return (sent - self.failed if self.answered is None else self.answered), sent


@dataclass(frozen=True)
class ServedReport(Record):
    """The served model's answers against the PyTorch reference, then latency and throughput per
    load level; `failed_at` names the load whose requests failed (the run stops there)."""

    FAMILY: ClassVar[str] = "cvt-bench-triton"
    VERSION: ClassVar[int] = 2
    WHAT: ClassVar[str] = "cvt-bench triton report"

    machine: Machine
    target: ServedTarget
    precision: str
    inputs: ServedInputs
    fidelity: Fidelity
    runs: tuple[LoadRun, ...]
    failed_at: str | None = None
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)  # version 1: in-process figures


# --- `cvt-export deploy`'s record (NAME.deploy.json) ----------------------------------------------
# Read by the renderer and the command line; `cvt_export.deploy` builds it as it searches.

@dataclass(frozen=True)
class ServedFidelity:
    """The served answers against the reference on the images a step checks (empty: not checked)."""

    cosine_min: float | None = field(default=None, metadata=OMIT)
    cosine_mean: float | None = field(default=None, metadata=OMIT)
    max_abs: float | None = field(default=None, metadata=OMIT)
    n: int | None = field(default=None, metadata=OMIT)
    top1_agreement: float | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True)
class ServedConfiguration:
    backend: str
    precision: str
    instances: int
    max_batch: int
    queue_us: int
    preferred: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class OpenLoopRun:
    """One open-loop run at the SLO's rate: the SLO's percentile, p99, rates, whether it met it."""

    percentile_ms: float | None = field(default=None, metadata=OMIT)
    p99_ms: float | None = field(default=None, metadata=OMIT)
    answered: int | None = field(default=None, metadata=OMIT)
    failed: int | None = field(default=None, metadata=OMIT)
    achieved_rate: float | None = field(default=None, metadata=OMIT)
    offered_rate: float | None = field(default=None, metadata=OMIT)
    spread_ms: Spread | None = field(default=None, metadata=OMIT)
    stable: bool | None = field(default=None, metadata=OMIT)
    met_rounds: int | None = field(default=None, metadata=OMIT)   # rounds that met it (of several)
    round_percentiles_ms: tuple[float, ...] | None = field(default=None, metadata=OMIT)
    meets: bool | None = field(default=None, metadata=OMIT)   # None: not measured
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True, kw_only=True)
class Candidate(OpenLoopRun):
    candidate: ServedConfiguration
    label: str
    fidelity: ServedFidelity = field(default_factory=ServedFidelity)
    within_budget: bool = False
    error: str | None = field(default=None, metadata=OMIT)    # why it was not measured


@dataclass(frozen=True)
class DeploySearch:
    how: str
    candidates: tuple[Candidate, ...]
    selection_images: int
    requests_per_candidate: int


@dataclass(frozen=True, kw_only=True)
class ConfirmRound(OpenLoopRun):
    round: int | None = field(default=None, metadata=OMIT)
    requests: int | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True, kw_only=True)
class ConfirmedConfiguration(OpenLoopRun):
    configuration: str
    fidelity: ServedFidelity = field(default_factory=ServedFidelity)
    within_budget: bool = False
    rounds: tuple[ConfirmRound, ...] = ()
    met_rounds: int = 0
    held: bool | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True, kw_only=True)
class Confirmation(OpenLoopRun):
    """The separate confirmation run: version 1 measured the chosen configuration alone; later ones
    interleave it with the default configuration over `rounds` rounds."""

    images: int = 0
    requests: int = 0
    fidelity: ServedFidelity | None = field(default=None, metadata=OMIT)
    within_budget: bool | None = field(default=None, metadata=OMIT)
    rounds: int | None = field(default=None, metadata=OMIT)
    configurations: dict[str, ConfirmedConfiguration] | None = field(default=None, metadata=OMIT)
    written: str | None = field(default=None, metadata=OMIT)       # which configuration: chosen | default
    written_configuration: str | None = field(default=None, metadata=OMIT)
    written_candidate: ServedConfiguration | None = field(default=None, metadata=OMIT)
    why: str | None = field(default=None, metadata=OMIT)
    written_repository_fidelity: ServedFidelity | None = field(default=None, metadata=OMIT)
    held: bool = False


@dataclass(frozen=True, kw_only=True)
class SustainedStep:
    """One rate of a sustained-rate ladder, judged like the confirmation (rounds, medians)."""

    rate: float
    percentile_ms: float
    p99_ms: float | None = field(default=None, metadata=OMIT)
    achieved_rate: float | None = field(default=None, metadata=OMIT)
    failed: int | None = field(default=None, metadata=OMIT)
    met_rounds: int | None = field(default=None, metadata=OMIT)
    round_percentiles_ms: tuple[float, ...] | None = field(default=None, metadata=OMIT)
    meets: bool
    rest: dict[str, Any] = field(default_factory=dict, metadata=REST)


@dataclass(frozen=True)
class Sustained:
    """The highest rate a configuration sustains under the bound, up a ladder of rates."""

    configuration: str
    highest_rate: float | None
    steps: tuple[SustainedStep, ...]
    ladder_factor: float | None = field(default=None, metadata=OMIT)


@dataclass(frozen=True)
class DeployRecord(Record):
    FAMILY: ClassVar[str] = "cvt-deploy"
    WHAT: ClassVar[str] = "cvt-export deploy record"

    machine: Machine
    slo: str
    budget: tuple[str, ...]
    artifacts: str
    search: DeploySearch
    chosen: Candidate | None = None
    confirmation: Confirmation | None = None
    sustained: dict[str, Sustained] | None = field(default=None, metadata=OMIT)  # none: nothing chosen
    seconds: float | None = field(default=None, metadata=OMIT)


# --- a Triton model repository's record (NAME.cvt-repository.json) --------------------------------

@dataclass(frozen=True, kw_only=True)
class RepositoryRecord:
    """What `cvt-export triton` wrote under one name: its model folders, options, the artifact it
    was made from, that file's fidelity at export, and every file's sha256. `schema` is a plain
    integer, as the first version wrote it."""

    schema: int = 1
    name: str
    models: tuple[str, ...]
    options: dict[str, Any]
    source: ExportSource
    artifact: str
    onnx: str
    onnx_sha256: str
    fidelity: Validation | None = None
    files: dict[str, str] = field(default_factory=dict)
    replaced: tuple[str, ...] = ()
