"""The configuration to deploy, per objective, from one cvt-bench report: `recommendation.json`.

Among the exported artifacts' rows (not PyTorch eager, the reference) that ran and are within
the budget (the user's `--budget`, else each row's own precision bounds), the fastest at
batch 1 (median latency) and at batch 8 (images/s). Fidelity is judged on the report's
held-out images (those not used for INT8 calibration) when the report has them, so
calibration images never decide. `cvt-export triton --from-recommendation` reads the file.
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
    """The fidelity that decides: on held-out images when the report has them."""
    fid = row.get("fidelity") or {}
    return fid.get("held_out") or fid


def within(row: Mapping[str, Any], budgets: Sequence[metrics.Budget]) -> bool:
    fid = judged(row)
    if not fid:
        return False
    if budgets:
        return metrics.within(budgets, fid)
    return not metrics.within_bounds(row["precision"], fid)


def recommend(report: Mapping[str, Any], budgets: Sequence[metrics.Budget] = ()) -> dict[str, Any]:
    rows = [r for r in report["results"] if r["status"] == "ok" and r["backend"] in DEPLOYABLE
            and within(r, budgets)]
    chosen: dict[str, Any] = {}
    for objective, (batch, key) in OBJECTIVES.items():
        timed = [r for r in rows if batch in r["latency"]]
        if not timed:
            chosen[objective] = None
            continue
        sign = 1 if key == "median_ms" else -1
        best = min(timed, key=lambda r: sign * r["latency"][batch][key])
        fid = judged(best)
        chosen[objective] = {
            "backend": best["backend"], "precision": best["precision"], "executed": best["executed"],
            "artifacts": report["model"]["artifacts"], key: best["latency"][batch][key],
            "batch": int(batch), "cosine_min": fid.get("cosine_min"),
            "top1_agreement": fid.get("top1_agreement")}
    return {"schema": SCHEMA, "created": report["created"], "machine": report["machine"],
            "model": report["model"],
            "budget": [str(b) for b in budgets] or "each precision's bounds (cvt_export.metrics.BOUNDS)",
            "judged_on": report["inputs"].get("held_out_note", f"{report['inputs']['images']} images"),
            "objectives": chosen}


def markdown(rec: Mapping[str, Any]) -> list[str]:
    budget = rec["budget"] if isinstance(rec["budget"], str) else ", ".join(rec["budget"])
    lines = ["", "## Recommendation", "", f"Within {budget}, judged on {rec['judged_on']}:", ""]
    for objective, pick in rec["objectives"].items():
        if pick is None:
            lines.append(f"- {objective}: nothing within the budget was timed at that batch size")
            continue
        figure = (f"{pick['median_ms']:.1f} ms" if "median_ms" in pick
                  else f"{pick['images_per_s']:.1f} img/s")
        lines.append(f"- **{objective}**: {pick['backend']} {pick['precision']} ({figure}, cosine "
                     f"{pick['cosine_min']:.6f})")
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
        raise CvtError(f"{path}: no configuration within the budget for {objective}")
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
