"""Where the milliseconds go: time per operator type and per block from the runtime's own counters.

ONNX Runtime's profiler and OpenVINO's performance counters time every operator of the graph the
runtime really runs (after its fusions), name the kernel and say what precision it ran in. This
groups them: by operator type (the GEMMs — MatMul, Gemm, FullyConnected and their quantized
forms — as one group, with their share of the time), by block (the runtime's node names matched
to the exported graph's blocks through the probe points; nodes the runtime made itself are
counted as "not attributed"), and by kernel precision. The figures are those of the profiled run
whose whole inference time was the median, so that the parts add up to one real inference.

What a profile says is the record `records.ProfileReport` (profile-BACKEND-PRECISION.json,
schema `cvt-profile/1`); docs/benchmark.md says what each figure means.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import cvt_ref
from cvt_export import machine, precisions
from cvt_export.artifacts import ArtifactFolder, atomic_write
from cvt_export.backends import ATTENTION, BackendError, GemmLimit, Profile, Profiling, get_backend
from cvt_export.records import BatchProfile, Floor, GemmLimitFigure, LatencyStats, OpGroup, ProfileReport
from cvt_export.render.report import network_order
from cvt_ref.errors import CvtError

SCHEMA = ProfileReport.schema()
GEMM_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                      "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul", "FullyConnected"})
PROFILED = ("ort", "openvino")  # runners with the Profiling protocol
GEMM_ATEN = frozenset({"mm", "addmm", "bmm", "baddbmm"})
CONV_ATEN = frozenset({"convolution"})
LIMIT_SHAPE = (1576, 384, 1536)  # cvt-13's stage-2 MLP at batch 8 (197 tokens x 8, 384 -> 1536)
NOT_ATTRIBUTED = "not attributed"
GEMM_GROUP = "GEMM"  # the matrix-product kernels' group, whatever each runtime calls them
HEAD = "head"


def gemm(op: str) -> bool:
    """A matrix-product kernel: the ONNX and ORT GEMMs, OpenVINO's FullyConnected in all its forms
    (FullyConnectedQuantizedLegacy, FullyConnectedCompressed...) and a fused attention kernel."""
    return op in GEMM_OPS or op.startswith("FullyConnected") or op == ATTENTION


def attribute(profile: Profile, blocks: dict[str, str]) -> dict[str, str]:
    """Runtime node -> the block it computes: by its own name or a source layer it was made from
    (the earliest block where they name several), else by what it feeds (a layout reorder, a
    normalization the runtime rebuilt under its own name), like `probes.node_blocks`: the first
    block whose output depends on it."""
    rank = {b: i for i, b in enumerate(network_order(sorted(set(blocks.values()))))}

    def earliest(found: list[str]) -> str | None:
        return min(found, key=rank.__getitem__) if found else None

    def direct(node: str) -> str | None:
        return earliest([blocks[n] for n in (node, *profile.names.get(node, ())) if n in blocks])

    owner: dict[str, str] = {}
    for node in reversed(list(profile.consumers)):  # consumers before their producers
        block = direct(node) or earliest([owner[c] for c in profile.consumers[node] if c in owner])
        if block is not None:
            owner[node] = block
    for o in profile.ops:
        block = owner.get(o.node) or direct(o.node)
        if block is not None:
            owner[o.node] = block
    return owner


@dataclass
class _Group:
    """One operator group's kernels as they are added up."""

    ms: float = 0.0
    nodes: int = 0
    ops: set[str] = field(default_factory=set)
    precisions: dict[str, float] = field(default_factory=dict)


def summarize(profile: Profile, blocks: dict[str, str], floors: Floors) -> BatchProfile:
    """A profile's figures: total kernel time, the GEMM share, the operator groups by time (the
    GEMMs as one), the three costliest non-GEMM groups, time per block and per precision; and
    how far the run and its GEMMs are from the `floors` at its batch."""
    total = sum(o.ms for o in profile.ops)
    groups: dict[str, _Group] = {}
    for o in profile.ops:
        g = groups.setdefault(GEMM_GROUP if gemm(o.op) else o.op, _Group())
        g.ms += o.ms
        g.nodes += 1
        g.ops.add(o.op)
        g.precisions[o.precision or "?"] = g.precisions.get(o.precision or "?", 0.0) + o.ms
    by_op = tuple(OpGroup(name, g.ms, g.ms / total if total else 0.0, g.nodes, tuple(sorted(g.ops)),
                          g.precisions) for name, g in sorted(groups.items(), key=lambda kv: -kv[1].ms))
    by_block: dict[str, float] = {}
    gemm_by_block: dict[str, float] = {}
    by_precision: dict[str, float] = {}
    owner = attribute(profile, blocks)
    for o in profile.ops:
        key = owner.get(o.node, NOT_ATTRIBUTED)
        by_block[key] = by_block.get(key, 0.0) + o.ms
        if gemm(o.op):
            gemm_by_block[key] = gemm_by_block.get(key, 0.0) + o.ms
        by_precision[o.precision or "?"] = by_precision.get(o.precision or "?", 0.0) + o.ms
    gemm_ms = groups[GEMM_GROUP].ms if GEMM_GROUP in groups else 0.0
    return BatchProfile(
        run_ms=profile.run_ms, runs=profile.runs, kernels_ms=total,
        gemm_ms=gemm_ms, gemm_share=gemm_ms / total if total else 0.0,
        by_op=by_op, top_non_gemm=tuple(g.group for g in by_op if g.group != GEMM_GROUP)[:3],
        by_block={b: by_block[b] for b in network_order(list(by_block))},
        gemm_by_block={b: gemm_by_block[b] for b in network_order(list(gemm_by_block))},
        by_precision=by_precision, gemm_floor_ms=floors.gemm_ms, gemm_vs_floor=gemm_ms / floors.gemm_ms,
        # the whole inference against all its multiply-adds (convolutions too) at the limit
        floor_ms=floors.whole_ms, run_vs_floor=profile.run_ms / floors.whole_ms,
        # each block's GEMMs against that block's own matrix products at the limit: where the
        # GEMMs themselves fall short of the rate (cvt-13's stage 1: K = 64)
        block_gemm_floor_ms=floors.by_block)


@dataclass(frozen=True)
class Floors:
    """One batch's floors at the GEMM limit: the model's matrix products, all its multiply-adds,
    and each block's matrix products (milliseconds)."""

    gemm_ms: float
    whole_ms: float
    by_block: dict[str, float]

    @classmethod
    def at(cls, work: Work, batch: int, rate: float) -> Floors:
        return cls(floor_ms(work.gemm, batch, rate), floor_ms(work.total, batch, rate),
                   {b: floor_ms(m, batch, rate) for b, m in work.gemm_by_block.items() if m})


def _flop_counts(folder: ArtifactFolder, model: Any) -> tuple[Any, dict[str, dict[Any, int]]]:
    """The reference architecture (`model`, or the folder's) and PyTorch's FLOP counts per module
    for one image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if model is None:
        model = cvt_ref.create_model(folder.variant, "random:0").eval()
    x = torch.zeros(1, 3, folder.variant.image_size, folder.variant.image_size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return model, counter.get_flop_counts()


def _macs(counts: dict[str, dict[Any, int]], module: str, aten: frozenset[str]) -> float:
    return sum(float(v) for op, v in counts.get(module, {}).items() if str(op).split(".")[1] in aten) / 2


@dataclass(frozen=True)
class Work:
    """A model's multiply-adds per image: in its matrix products (its Linear layers, the attention
    MatMuls and the classifier) per block ("stage S block B"; the classifier is HEAD), and in its
    convolutions (the patch embeddings and the depthwise q/k/v projections). Every one of them
    takes at least 1 / (GEMM limit) seconds, so `total` at that rate is the floor no inference
    can beat."""

    gemm_by_block: dict[str, float]
    conv: float

    @property
    def gemm(self) -> float:
        return sum(self.gemm_by_block.values())

    @property
    def total(self) -> float:
        return self.gemm + self.conv


def work(folder: ArtifactFolder, model: Any = None) -> Work:
    """The model's work from one run of PyTorch's FLOP counter on the reference architecture
    (`model`: the folder's reference model when the caller has it loaded already)."""
    from cvt_export.probes import probe_key

    model, counts = _flop_counts(folder, model)
    root = type(model).__name__
    by_block = {probe_key(s, b): _macs(counts, f"{root}.stages.{s}.blocks.{b}", GEMM_ATEN)
                for s, stage in enumerate(model.stages) for b in range(len(stage.blocks))}
    by_block[HEAD] = _macs(counts, "Global", GEMM_ATEN) - sum(by_block.values())  # the classifier
    return Work(gemm_by_block=by_block, conv=_macs(counts, "Global", CONV_ATEN))


def gemm_macs_by_block(folder: ArtifactFolder, model: Any = None) -> dict[str, float]:
    """Multiply-adds per image in the model's matrix products, per block (`Work.gemm_by_block`)."""
    return work(folder, model).gemm_by_block


def gemm_macs(folder: ArtifactFolder, model: Any = None) -> float:
    """Multiply-adds per image in the model's matrix products (`Work.gemm`)."""
    return work(folder, model).gemm


def floor_ms(macs: float, batch: int, rate: float) -> float:
    """The time `batch` images' `macs` multiply-adds each take at `rate` GMAC/s."""
    return macs * batch / (rate * 1e9) * 1000


def gemm_floor(runner: GemmLimit, macs: Work, latency: Mapping[str, LatencyStats], runs: int = 10) -> Floor:
    """A benchmark row's distance from its own floor: the runtime's GEMM limit measured now, in
    the row's precision and settings, and per batch the floor (every multiply-add of the model at
    that rate) and the row's median over it."""
    rate = runner.gemm_rate(*LIMIT_SHAPE, runs=runs)
    ms = {b: floor_ms(macs.total, int(b), rate) for b in latency}
    return Floor(gemm_gmac_per_s=rate, limit_shape=LIMIT_SHAPE, macs_per_image=macs.total,
                 gemm_macs_per_image=macs.gemm, conv_macs_per_image=macs.conv,
                 ms=ms, times={b: latency[b].median_ms / ms[b] for b in latency})


def inputs(folder: ArtifactFolder, batch: int) -> np.ndarray:
    """`batch` of the bundled photographs, preprocessed for the folder's model (cycled if fewer)."""
    photos = cvt_ref.bundled_photos()
    x = cvt_ref.preprocess_batch(list(photos[:batch]), folder.variant).numpy()
    return np.resize(x, (batch, *x.shape[1:])) if len(x) < batch else x


def run(folder: ArtifactFolder, backend: str, precision: str, batches: tuple[int, ...], runs: int,
        threads: int | None = None, progress: Any = lambda s: None) -> ProfileReport:
    if runs < 1 or not batches or min(batches) < 1:
        raise CvtError("profile: --runs and every --batch must be >= 1")
    be = get_backend(backend)
    if be.name not in PROFILED:
        raise BackendError(f"{be.name}: its runtime reports no time per operator here (profiles: "
                           f"{', '.join(PROFILED)})")
    precision = precisions.parse_one(precision, be.precisions)
    with folder.lock():  # an IR or optimized graph may be made beside the files
        runner = be.compile(folder, precision, threads=threads)
    assert isinstance(runner, Profiling)
    import onnx

    graph = folder.onnx(precisions.reads(precision), check_hash=False)
    proto = onnx.load(str(graph), load_external_data=False)
    from cvt_export import probes

    blocks = probes.node_blocks(proto, folder.probes)
    blocks.update({n.name: HEAD for n in proto.graph.node if n.name not in blocks})
    shape = "x".join(map(str, LIMIT_SHAPE))
    progress(f"{be.name} {precision}: this CPU's GEMM limit on one {shape} MatMul")
    rate = runner.gemm_rate(*LIMIT_SHAPE, runs=max(runs, 10))
    model_work = work(folder)
    figures = {}
    for i, batch in enumerate(batches, 1):
        progress(f"{be.name} {precision} batch {batch} ({i}/{len(batches)})")
        figures[str(batch)] = summarize(runner.profile(inputs(folder, batch), runs), blocks,
                                        Floors.at(model_work, batch, rate))
    return ProfileReport(
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), machine=machine.describe(),
        artifacts=str(folder.path), backend=be.name, precision=precision, executed=runner.info.executed,
        gemm_limit=GemmLimitFigure(LIMIT_SHAPE, rate), gemm_macs_per_image=model_work.gemm,
        conv_macs_per_image=model_work.conv, batches=figures)


def write(report: ProfileReport, out: Path) -> list[Path]:
    """The record, its Markdown and its chart (cvt_export/render/profile.py) in `out`."""
    from cvt_export.render.profile import markdown, plot

    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile-{report.backend}-{report.precision}"
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    atomic_write(paths[0], json.dumps(report.to_json(), indent=2) + "\n")
    atomic_write(paths[1], markdown(report))
    plot(report, paths[2])
    return paths
