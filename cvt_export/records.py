"""The vocabulary of what the tools write and read, as typed, frozen records.

Each top-level record carries a versioned `schema` ("family/N"): `from_json` reads its own
family at its version or older and refuses a newer version or a foreign file with one line
(a `RecordError`); `to_json` writes the current version. Nested records are plain fields. A
field is added once, here, and every reader and renderer gets it by name, checked by mypy.

Records so far: the accuracy pass (its shards and its report). The manifest and the latency
report are still dicts owned by `artifacts` and `harness.report` (issue #29 moves them here).
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

R = TypeVar("R", bound="Record")


class RecordError(CvtError):
    """A file that is not the record it should be: foreign, newer, truncated or malformed."""


def _convert(hint: Any, value: Any, where: str) -> Any:
    """JSON value -> the field's declared type (nested records, tuples, optionals, plain values)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None:
            if len(options) == len(typing.get_args(hint)):
                raise RecordError(f"{where}: null where a value is required")
            return None
        return _convert(options[0], value, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        item = args[0]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        args = typing.get_args(hint)
        if args and isinstance(args[1], type) and dataclasses.is_dataclass(args[1]):
            return {k: _build(args[1], v, f"{where}.{k}") for k, v in value.items()}
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
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{where}: missing field {f.name!r}")
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
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
        return {"schema": self.schema(), **_plain(self)}

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
            raise RecordError(f"{where}: written by a newer cvt-export ({schema}; this one reads "
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
    WHAT: ClassVar[str] = "accuracy shard record"

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
    WHAT: ClassVar[str] = "accuracy report"

    created: str
    machine: dict[str, Any]
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
