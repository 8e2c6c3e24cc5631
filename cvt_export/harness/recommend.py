"""The configuration to deploy, per objective, from one cvt-bench report: `recommendation.json`.

Among the exported artifacts' rows (not PyTorch eager, the reference) that ran and are within
the budget (the user's `--budget`, else each row's own precision bounds) on the report's
*selection* images, the fastest at batch 1 (median latency) and at batch 8 (images/s). A row
is faster only when the 95% intervals of the medians separate; the rows that no other row is
faster than in that sense are tied for fastest, and the tie goes to the most faithful (selection
cosine), said so. The figures the file states are the *confirmation* images', which decided nothing.
Calibration images never decide. `cvt-export triton --from-recommendation` reads the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cvt_export import metrics, precisions
from cvt_export.artifacts import ArtifactFolder, atomic_write
from cvt_export.records import (
    BenchReport,
    Fidelity,
    PassedOver,
    Pick,
    Recommendation,
    RoleFidelity,
    Row,
    StatedFidelity,
)
from cvt_ref.errors import CvtError

SCHEMA = Recommendation.schema()
DEPLOYABLE = ("ort", "openvino", "tensorrt")  # PyTorch eager is the reference, not a deployment
OBJECTIVES = {"latency-b1": ("1", "median_ms"), "throughput-b8": ("8", "images_per_s")}


def judged(row: Row) -> RoleFidelity | Fidelity | None:
    """The fidelity that decides: on the selection images when the report has them (reports of
    older versions: the held-out images, else all)."""
    return row.fidelity.judged if row.fidelity else None


def broken(row: Row, budgets: Sequence[metrics.Budget]) -> str:
    """What keeps a row outside the budget on the selection images ("" when nothing does), e.g.
    "cosine_min 0.9922 < 0.995" (each precision's bounds) or "misses cosine>=0.999" (a --budget)."""
    fid = judged(row)
    if fid is None:
        return "no fidelity figures"
    if budgets:
        found = [f"misses {b}" for b in budgets if not b.holds(fid)]
    else:
        found = metrics.within_bounds(row.precision, fid)
    return ", ".join([*found, *_batch_dependence(row, budgets)])


def _batch_floor(precision: str, budgets: Sequence[metrics.Budget]) -> float | None:
    """The cosine a row is held to: the --budget's, else the precision's bound."""
    if budgets:
        return max((b.value for b in budgets if b.metric == "cosine"), default=None)
    return metrics.BOUNDS[precision].get("cosine_min")


def _batch_dependence(row: Row, budgets: Sequence[metrics.Budget]) -> list[str]:
    """A dynamic precision's answer for an image moves with the other images of its batch (and,
    served with dynamic batching, with other users' requests): held to the cosine it is held to
    against the reference, between each image alone and in the run's largest batch."""
    cos = row.batch_consistency_cosine_min
    floor = _batch_floor(row.precision, budgets)
    if not precisions.get(row.precision).dynamic or cos is None or floor is None or cos >= floor:
        return []
    return [f"batch dependence: cosine {cos:.6g} between an image alone and in a batch < {floor:g}"]


def within(row: Row, budgets: Sequence[metrics.Budget]) -> bool:
    return not broken(row, budgets)


def pick_fastest(rows: Sequence[Row], batch: str) -> tuple[Row, list[Row]]:
    """The row to deploy and the rows tied for fastest (it included): those that no other row
    beats beyond the noise (`metrics.unbeaten`; the demo's ORT FP32 [98.6, 102.5] ms and ORT FP16
    [92.1, 94.1] both overlapped OpenVINO's bimodal [75, 138], and FP16 beats FP32)."""
    tied = metrics.unbeaten(rows, lambda r: r.latency[batch].interval)

    def cosine(r: Row) -> float:
        fid = judged(r)
        return float("-inf") if fid is None else fid.cosine_min

    return max(tied, key=cosine), tied


def unmet(report: BenchReport, batch: str, budgets: Sequence[metrics.Budget] = ()) -> str:
    """Why no row serves an objective at `batch`: the batch size was not timed, no deployable row
    ran, or the rows that ran at it are outside the budget (each named with what it breaks)."""
    ran = _deployable(report)
    if not ran:
        return "no deployable row (ONNX Runtime, OpenVINO, TensorRT) ran"
    timed = [r for r in ran if batch in r.latency]
    if not timed:
        batches = sorted({int(b) for r in ran for b in r.latency})
        return (f"batch {batch} was not timed (this run: --batch {','.join(map(str, batches))}; "
                f"add {batch} to time it)")
    return f"no row timed at batch {batch} is within the budget: " + "; ".join(
        f"{r.name} ({broken(r, budgets)})" for r in timed)


def _deployable(report: BenchReport) -> list[Row]:
    """The rows that ran and that a deployment could use (not the PyTorch reference)."""
    return [r for r in report.ran if r.backend in DEPLOYABLE]


def _pick(report: BenchReport, best: Row, tied: list[Row], objective: str,
          budgets: Sequence[metrics.Budget]) -> Pick:
    batch, key = OBJECTIVES[objective]
    fid, shown = judged(best), best.fidelity.stated if best.fidelity else None
    others = [r.name for r in tied if r is not best]
    why = ("fastest beyond the noise (95% intervals of the median separate from every other row's)"
           if not others else f"tied with {', '.join(others)} (no row is faster than these beyond the "
           "noise: 95% intervals of the median); the most faithful of them on the selection images")
    if precisions.get(best.precision).dynamic and best.batch_consistency_cosine_min is not None:
        largest = max(int(b) for b in report.batches)
        why += (f"; its activation scales come from each batch: an image's answer alone and in a batch "
                f"of {largest} agree to cosine {best.batch_consistency_cosine_min:.6f} (within the bound "
                "it is held to; served with dynamic batching, other requests move it too)")
    stats = best.latency[batch]
    passed_over = [PassedOver(r.backend, r.precision, r.latency[batch].median_ms, broken(r, budgets))
                   for r in _deployable(report) if batch in r.latency
                   and r.latency[batch].median_ms < stats.median_ms and not within(r, budgets)]
    return Pick(
        backend=best.backend, precision=best.precision, executed=best.executed,
        artifacts=report.model.artifacts,
        images_per_s=stats.images_per_s if key == "images_per_s" else None,
        median_ms=stats.median_ms, median_ci_ms=stats.interval, bimodal_ms=stats.modes_ms,
        batch=int(batch), why=why, tied_with=tuple(others),
        cosine_min=fid.cosine_min if fid else None, top1_agreement=fid.top1_agreement if fid else None,
        confirmation=None if shown is None else StatedFidelity(
            shown.cosine_min, shown.cosine_p5, shown.top1_agreement, shown.top1_agreement_ci,
            shown.images if isinstance(shown, RoleFidelity) else None),
        passed_over=tuple(sorted(passed_over, key=lambda r: r.median_ms)))  # faster, outside the budget


def recommend(report: BenchReport, budgets: Sequence[metrics.Budget] = ()) -> Recommendation:
    rows = [r for r in _deployable(report) if within(r, budgets)]
    chosen: dict[str, Pick | None] = {}
    reasons: dict[str, str] = {}
    for objective, (batch, _) in OBJECTIVES.items():
        timed = [r for r in rows if batch in r.latency]
        if not timed:
            chosen[objective] = None
            reasons[objective] = unmet(report, batch, budgets)
            continue
        best, tied = pick_fastest(timed, batch)
        chosen[objective] = _pick(report, best, tied, objective, budgets)
    inputs = report.inputs
    return Recommendation(
        created=report.created, machine=report.machine, model=report.model,
        budget=tuple(str(b) for b in budgets) or "each precision's bounds (cvt_export.metrics.BOUNDS)",
        judged_on=inputs.held_out_note or f"{inputs.images} images", roles=inputs.roles,
        objectives=chosen, unmet=reasons)


def write(rec: Recommendation, path: Path) -> None:
    """The file, with each pick's artifact folder relative to the file itself (so the pair can be
    moved or checked out elsewhere together) and the export's FP32 sha256 to check it by."""
    where = path.resolve().parent
    objectives = {name: None if pick is None else dataclasses.replace(
        pick, artifacts=os.path.relpath(Path(pick.artifacts).resolve(), where),
        onnx_sha256=rec.model.onnx_sha256) for name, pick in rec.objectives.items()}
    data = dataclasses.replace(rec, objectives=objectives).to_json()
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def _field(pick: Mapping[str, Any], key: str, path: Path, objective: str) -> str:
    value = pick.get(key)
    if not isinstance(value, str) or not value:
        raise CvtError(f"--from-recommendation {path}: {objective}.{key} is missing or not a string; "
                       "re-run cvt-bench to write it again")
    return value


@dataclasses.dataclass(frozen=True)
class Recommended:
    """What a recommendation.json picked for one objective, checked: the folder, opened."""

    folder: ArtifactFolder
    backend: str
    precision: str


def read(path: Path, objective: str) -> Recommended:
    """The pick for one objective from a recommendation.json: every field checked, the artifact
    folder resolved against the file's own folder, opened and matched by its FP32 sha256."""

    if objective not in OBJECTIVES:
        raise CvtError(f"--objective {objective!r}: use {', '.join(OBJECTIVES)}")
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CvtError(f"--from-recommendation {path}: cannot read it ({e})") from None
    if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
        raise CvtError(f"--from-recommendation {path}: not a {SCHEMA} file (written by cvt-bench)")
    objectives = rec.get("objectives")
    if not isinstance(objectives, dict) or objective not in objectives:
        raise CvtError(f"--from-recommendation {path}: has no {objective!r} entry; re-run cvt-bench")
    pick = objectives[objective]
    if pick is None:
        unmet = rec.get("unmet")
        why = unmet.get(objective) if isinstance(unmet, dict) else None
        why = why.splitlines()[0][:300] if isinstance(why, str) and why.strip() else "none within the budget"
        raise CvtError(f"{path}: no configuration for {objective}: {why}")
    if not isinstance(pick, dict):
        raise CvtError(f"--from-recommendation {path}: {objective} is not an object; re-run cvt-bench")
    backend = _field(pick, "backend", path, objective)
    precision = _field(pick, "precision", path, objective)
    relative = _field(pick, "artifacts", path, objective)
    digest = _field(pick, "onnx_sha256", path, objective)
    if backend not in DEPLOYABLE:
        raise CvtError(f"--from-recommendation {path}: backend {backend!r} is not one of "
                       f"{', '.join(DEPLOYABLE)}")
    if precision not in precisions.NAMES:
        raise CvtError(f"--from-recommendation {path}: precision {precision!r} is not one of "
                       f"{', '.join(precisions.NAMES)}")
    if Path(relative).is_absolute():
        raise CvtError(f"--from-recommendation {path}: artifacts {relative!r} must be relative to the file")
    folder = ArtifactFolder.open(path.resolve().parent / relative)
    if folder.sha256("fp32") != digest:
        raise CvtError(f"--from-recommendation {path}: {folder.path} holds another export than the one "
                       "benchmarked (FP32 sha256 differs); re-run cvt-bench on it")
    return Recommended(folder, backend, precision)
