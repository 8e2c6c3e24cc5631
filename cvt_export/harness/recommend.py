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

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cvt_export import metrics, precisions
from cvt_export.artifacts import atomic_write
from cvt_ref.errors import CvtError

SCHEMA = "cvt-recommendation/1"
DEPLOYABLE = ("ort", "openvino", "tensorrt")  # PyTorch eager is the reference, not a deployment
OBJECTIVES = {"latency-b1": ("1", "median_ms"), "throughput-b8": ("8", "images_per_s")}


def judged(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """The fidelity that decides: on the selection images when the report has them (reports of
    older versions: the held-out images, else all)."""
    fid = row.get("fidelity") or {}
    return fid.get("selection") or fid.get("held_out") or fid


def stated(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """The fidelity the recommendation states: on the confirmation images when there are some."""
    fid = row.get("fidelity") or {}
    return fid.get("confirmation") or judged(row)


def broken(row: Mapping[str, Any], budgets: Sequence[metrics.Budget]) -> str:
    """What keeps a row outside the budget on the selection images ("" when nothing does), e.g.
    "cosine_min 0.9922 < 0.995" (each precision's bounds) or "misses cosine>=0.999" (a --budget)."""
    fid = judged(row)
    if not fid:
        return "no fidelity figures"
    if budgets:
        return ", ".join(f"misses {b}" for b in budgets if not b.holds(fid))
    return ", ".join(metrics.within_bounds(row["precision"], fid))


def within(row: Mapping[str, Any], budgets: Sequence[metrics.Budget]) -> bool:
    return not broken(row, budgets)


def interval(row: Mapping[str, Any], batch: str) -> tuple[float, float]:
    """The 95% interval of the row's median latency at `batch` (a point in older reports)."""
    stats = row["latency"][batch]
    lo, hi = stats.get("median_ci_ms") or (stats["median_ms"], stats["median_ms"])
    return float(lo), float(hi)


Row = Mapping[str, Any]


def pick_fastest(rows: Sequence[Row], batch: str) -> tuple[Row, list[Row]]:
    """The row to deploy and the rows tied for fastest (it included): those that no other row
    beats beyond the noise (`metrics.unbeaten`; the demo's ORT FP32 [98.6, 102.5] ms and ORT FP16
    [92.1, 94.1] both overlapped OpenVINO's bimodal [75, 138], and FP16 beats FP32)."""
    tied = metrics.unbeaten(rows, lambda r: interval(r, batch))
    return max(tied, key=lambda r: float(judged(r).get("cosine_min", float("-inf")))), tied


def _name(row: Mapping[str, Any]) -> str:
    return f"{row['backend']} {row['precision']}"


def unmet(report: Mapping[str, Any], batch: str, budgets: Sequence[metrics.Budget] = ()) -> str:
    """Why no row serves an objective at `batch`: the batch size was not timed, no deployable row
    ran, or the rows that ran at it are outside the budget (each named with what it breaks)."""
    ran = _deployable(report)
    if not ran:
        return "no deployable row (ONNX Runtime, OpenVINO, TensorRT) ran"
    timed = [r for r in ran if batch in r["latency"]]
    if not timed:
        batches = sorted({int(b) for r in ran for b in r["latency"]})
        return (f"batch {batch} was not timed (this run: --batch {','.join(map(str, batches))}; "
                f"add {batch} to time it)")
    return f"no row timed at batch {batch} is within the budget: " + "; ".join(
        f"{_name(r)} ({broken(r, budgets)})" for r in timed)


def _deployable(report: Mapping[str, Any]) -> list[Row]:
    """The rows that ran and that a deployment could use (not the PyTorch reference)."""
    return [r for r in report["results"] if r["status"] == "ok" and r["backend"] in DEPLOYABLE]


def recommend(report: Mapping[str, Any], budgets: Sequence[metrics.Budget] = ()) -> dict[str, Any]:
    rows = [r for r in _deployable(report) if within(r, budgets)]
    chosen: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for objective, (batch, key) in OBJECTIVES.items():
        timed = [r for r in rows if batch in r["latency"]]
        if not timed:
            chosen[objective] = None
            reasons[objective] = unmet(report, batch, budgets)
            continue
        best, tied = pick_fastest(timed, batch)
        fid, shown = judged(best), stated(best)
        others = [_name(r) for r in tied if r is not best]
        why = ("fastest beyond the noise (95% intervals of the median separate from every other row's)"
               if not others else f"tied with {', '.join(others)} (no row is faster than these beyond the "
               "noise: 95% intervals of the median); the most faithful of them on the selection images")
        lo, hi = interval(best, batch)
        passed_over = [{"backend": r["backend"], "precision": r["precision"],
                        "median_ms": r["latency"][batch]["median_ms"], "why": broken(r, budgets)}
                       for r in _deployable(report) if batch in r["latency"]
                       and r["latency"][batch]["median_ms"] < best["latency"][batch]["median_ms"]
                       and not within(r, budgets)]
        chosen[objective] = {
            "backend": best["backend"], "precision": best["precision"], "executed": best["executed"],
            "artifacts": report["model"]["artifacts"], key: best["latency"][batch][key],
            "median_ms": best["latency"][batch]["median_ms"], "median_ci_ms": [lo, hi],
            "bimodal_ms": best["latency"][batch].get("modes_ms"),
            "batch": int(batch), "why": why, "tied_with": others,
            "cosine_min": fid.get("cosine_min"), "top1_agreement": fid.get("top1_agreement"),
            "confirmation": {k: shown.get(k) for k in ("cosine_min", "cosine_p5", "top1_agreement",
                                                       "top1_agreement_ci", "images")},
            "passed_over": sorted(passed_over, key=lambda r: r["median_ms"])}  # faster, outside the budget
    inputs = report["inputs"]
    return {"schema": SCHEMA, "created": report["created"], "machine": report["machine"],
            "model": report["model"],
            "budget": [str(b) for b in budgets] or "each precision's bounds (cvt_export.metrics.BOUNDS)",
            "judged_on": inputs.get("held_out_note", f"{inputs['images']} images"),
            "roles": inputs.get("roles"), "objectives": chosen, "unmet": reasons}


def markdown(rec: Mapping[str, Any]) -> list[str]:
    budget = rec["budget"] if isinstance(rec["budget"], str) else ", ".join(rec["budget"])
    lines = ["", "## Recommendation", "", f"Within {budget} on the selection images; figures on the "
             f"confirmation images, which decided nothing ({rec['judged_on']}):", ""]
    for objective, pick in rec["objectives"].items():
        if pick is None:
            why = (rec.get("unmet") or {}).get(objective, "nothing within the budget")
            lines.append(f"- {objective}: {why}")
            continue
        lo, hi = pick.get("median_ci_ms") or (pick["median_ms"], pick["median_ms"])
        figure = (f"{pick['median_ms']:.1f} ms [95% {lo:.1f}, {hi:.1f}]" if objective == "latency-b1"
                  else f"{pick['images_per_s']:.1f} img/s, median {pick['median_ms']:.1f} ms "
                  f"[95% {lo:.1f}, {hi:.1f}]")
        if pick.get("bimodal_ms"):
            figure += f", bimodal {pick['bimodal_ms'][0]:.1f} / {pick['bimodal_ms'][1]:.1f} ms"
        conf = pick.get("confirmation") or {}
        stated_fid = (f"confirmation cosine {conf['cosine_min']:.6f} (n={conf.get('images')})"
                      if conf.get("cosine_min") is not None else f"cosine {pick['cosine_min']:.6f}")
        lines.append(f"- **{objective}**: {pick['backend']} {pick['precision']} ({figure}, {stated_fid}): "
                     f"{pick.get('why', '')}")
        over = pick.get("passed_over") or []
        if over:
            lines.append("  faster, but outside the budget on the selection images: " + "; ".join(
                f"{r['backend']} {r['precision']} {r['median_ms']:.1f} ms ({r['why']})" for r in over))
    return lines


def write(rec: Mapping[str, Any], path: Path) -> None:
    """The file, with each pick's artifact folder relative to the file itself (so the pair can be
    moved or checked out elsewhere together) and the export's FP32 sha256 to check it by."""
    data = json.loads(json.dumps(rec))
    for pick in data["objectives"].values():
        if pick is not None:
            where = Path(pick["artifacts"]).resolve()
            pick["artifacts"] = os.path.relpath(where, path.resolve().parent)
            pick["onnx_sha256"] = rec["model"]["onnx_sha256"]
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def _field(pick: Mapping[str, Any], key: str, path: Path, objective: str) -> str:
    value = pick.get(key)
    if not isinstance(value, str) or not value:
        raise CvtError(f"--from-recommendation {path}: {objective}.{key} is missing or not a string; "
                       "re-run cvt-bench to write it again")
    return value


def read(path: Path, objective: str) -> dict[str, Any]:
    """The pick for one objective from a recommendation.json: every field checked, the artifact
    folder resolved against the file's own folder, opened and matched by its FP32 sha256."""
    from cvt_export.artifacts import ArtifactFolder

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
    return {**pick, "folder": folder}
