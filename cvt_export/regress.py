"""Regression gate for exported artifacts: today's run against a committed baseline.

The baseline (reports/baseline/VARIANT.json, schema cvt-regress/1) holds the golden inputs'
recipe and hash, the reference logits for them, each artifact's graph signature, and per
backend × precision the fidelity figures with tolerances and a latency for information.
`check` returns findings, each a failure or a change; the CLI prints them as a diff and
exits 0 (all holds), 1 (a regression or an unreviewed change) or 2 (bad input).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvt_export import artifacts, machine, metrics, precisions, records, validate
from cvt_export.artifacts import ArtifactFolder
from cvt_export.harness import bench
from cvt_export.precisions import EXPORTED
from cvt_export.records import (
    BaselineExport,
    BaselineFidelity,
    BaselineMachine,
    BaselineReference,
    BaselineRow,
    BenchReport,
    EncodedArray,
    GoldenInputs,
    GraphSummary,
    RegressBaseline,
    RegressFinding,
    RegressResult,
    Row,
    Tolerance,
)
from cvt_export.reference import reference_model
from cvt_ref.errors import CvtError

SCHEMA = "cvt-regress/1"
REFERENCE_TOLERANCE = 1e-5     # max-abs of the PyTorch reference's own logits
COSINE_SLACK = 5e-4            # how far a worst-image cosine may fall below the baseline's


class BaselineError(CvtError):
    """A baseline file that is missing, unreadable or of another schema."""


@dataclass(frozen=True)
class Finding:
    kind: str      # "fail" (a regression) or "change" (a difference a reviewer must accept)
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{'FAIL' if self.kind == 'fail' else 'CHANGED'} {self.what}: {self.detail}"


def encode(a: np.ndarray) -> EncodedArray:
    a = np.ascontiguousarray(a, dtype="<f4")
    return EncodedArray(shape=tuple(a.shape), base64=base64.b64encode(a.tobytes()).decode())


def decode(d: EncodedArray) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d.base64, validate=True), dtype="<f4").reshape(d.shape)


def check_arrays(data: RegressBaseline, path: Path) -> None:
    """The stored reference logits decode to a finite float32[images, classes] array."""
    try:
        ref = decode(data.reference.logits)
    except (TypeError, ValueError) as e:
        raise BaselineError(f"{path}: reference logits are corrupt ({type(e).__name__}: {e}); "
                            "regenerate the baseline with --update") from None
    images = data.inputs.images
    if ref.ndim != 2 or ref.shape[0] != images or not np.isfinite(ref).all():
        raise BaselineError(f"{path}: reference logits have shape {list(ref.shape)} for {images} images "
                            "or are not finite; regenerate the baseline with --update")


def load_baseline(path: Path) -> RegressBaseline:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"{path}: no such baseline; create it with `cvt-bench regress --update "
                            f"--baseline {path}`") from None
    except (OSError, ValueError) as e:
        raise BaselineError(f"{path}: not a readable baseline ({type(e).__name__}: {e})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA:
        raise BaselineError(f"{path}: not a {SCHEMA} baseline (schema {schema!r})" if isinstance(data, dict)
                            else f"{path}: not a {SCHEMA} baseline")
    try:
        baseline = RegressBaseline.from_json(data, str(path))
    except records.RecordError as e:
        raise BaselineError(f"{e}; fix it or regenerate the baseline with --update") from None
    check_values(baseline, path)
    check_arrays(baseline, path)
    return baseline


def baseline_for(path: Path, update: bool) -> RegressBaseline | None:
    """The baseline to compare with: None when --update is to create it (no file yet)."""
    return None if update and not path.exists() else load_baseline(path)


def _finite(value: float | None) -> bool:
    return value is None or bool(np.isfinite(value))


def check_values(data: RegressBaseline, path: Path) -> None:
    """What the record's types do not say, before anything runs: a baseline edited by hand (a
    negative count, an unknown precision, NaN) is bad input, not a regression."""
    def bad(where: str, want: str) -> BaselineError:
        return BaselineError(f"{path}: {where} must be {want}; fix it or regenerate the baseline "
                             "with --update")

    if data.inputs.images < 1:
        raise bad("inputs.images", "a positive integer")
    for key, entry in data.results.items():
        where = f"results[{key!r}]"
        if key.count("/") != 1:
            raise bad(where, "an object keyed BACKEND/PRECISION")
        if key.split("/")[1] not in metrics.BOUNDS:
            raise bad(f"{where} precision", f"one of {', '.join(metrics.BOUNDS)}")
        for group, figures in (("fidelity", dataclasses.astuple(entry.fidelity)),
                               ("tolerance", dataclasses.astuple(entry.tolerance))):
            if not all(_finite(v) for v in figures):
                raise bad(f"{where}.{group}", "an object of finite numbers")
        if entry.latency_batch < 1:
            raise bad(f"{where}.latency_batch", "a positive integer")
        if not _finite(entry.median_ms) or entry.median_ms <= 0:
            raise bad(f"{where}.median_ms", "a positive number")


def tolerance(precision: str, cosine_min: float, top1_agreement: float, images: int) -> Tolerance:
    """What today's run must meet, from the baseline's figures and the precision's bounds."""
    bounds = metrics.BOUNDS[precision]
    top1_floor = bounds.get("top1_agreement", 0.0)
    if precisions.get(precision).exact:
        return Tolerance(max_abs_max=bounds["max_abs"], top1_agreement_min=top1_floor)
    return Tolerance(cosine_min_min=max(bounds.get("cosine_min", 0.0), cosine_min - COSINE_SLACK),
                     top1_agreement_min=max(top1_floor, top1_agreement - 1.0 / images))


def floored(precision: str, tol: Tolerance) -> Tolerance:
    """A stored tolerance never looser than the precision's bounds (a baseline may predate them)."""
    bounds = metrics.BOUNDS.get(precision, {})

    def at_least(value: float | None, bound: float | None) -> float | None:
        return value if value is None or bound is None else max(value, bound)

    return Tolerance(
        max_abs_max=(tol.max_abs_max if tol.max_abs_max is None or "max_abs" not in bounds
                     else min(tol.max_abs_max, bounds["max_abs"])),
        cosine_min_min=at_least(tol.cosine_min_min, bounds.get("cosine_min")),
        top1_agreement_min=at_least(tol.top1_agreement_min, bounds.get("top1_agreement")))


def _result_key(r: Row) -> str:
    return f"{r.backend}/{r.precision}"


def make_baseline(report: BenchReport, folder: ArtifactFolder, reference: np.ndarray) -> RegressBaseline:
    images = report.inputs.images
    results = {}
    for r in report.ran:
        assert r.fidelity is not None
        fid = BaselineFidelity(r.fidelity.max_abs, r.fidelity.cosine_min, r.fidelity.top1_agreement)
        largest = str(max(int(b) for b in r.latency))
        results[_result_key(r)] = BaselineRow(
            fidelity=fid, tolerance=tolerance(r.precision, fid.cosine_min, fid.top1_agreement, images),
            executed=r.executed, latency_batch=int(largest), median_ms=r.latency[largest].median_ms)
    m, source = report.machine, folder.source
    return RegressBaseline(
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        machine=BaselineMachine(m.cpu, m.cores, m.isa, m.libraries),
        variant=folder.variant_name, weights=folder.weights_spec,
        export=BaselineExport(source.image_size, source.opset, source.batch),
        inputs=GoldenInputs(recipe="the bundled photographs (cvt_ref/data/photos), sorted by name, "
                                   "through cvt_ref.preprocess", images=images, sha256=report.inputs.sha256),
        reference=BaselineReference(encode(reference)),
        graphs={name: entry.graph for name, entry in folder.files().items() if entry.graph is not None},
        results=results)


def _diff_dict(old: Mapping[str, int], new: Mapping[str, int]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k, 0)} → {new.get(k, 0)}" for k in keys if old.get(k) != new.get(k)]


def compare(baseline: RegressBaseline, report: BenchReport, folder: ArtifactFolder,
            reference: np.ndarray, max_slowdown: float | None) -> tuple[list[Finding], list[str]]:
    """(findings, informational lines). No findings: everything holds."""
    found = [*_inputs_and_reference(baseline, report, reference), *_graphs(baseline, folder)]
    info: list[str] = []
    today = {_result_key(r): r for r in report.results}
    if other_int8_kernels(baseline.machine):
        info.append("INT8 rows are held to the precision's bounds only, top-1 agreement on its 95% interval: "
                    f"the baseline was made on a CPU {'with' if not machine.int8_dot_exact() else 'without'} "
                    "VNNI/AMX, whose INT8 kernels round differently from this one's")
    for key, base in baseline.results.items():
        r = today.get(key)
        if r is None:
            info.append(f"not run {key}: not asked for (--backend/--precision)")
        elif r.status == "error":  # the SDK is here and the artifact no longer runs on it
            found.append(Finding("fail", key, f"no longer runs: {r.reason}"))
        elif not r.ok:
            info.append(f"skipped {key}: {r.reason}")
        else:
            _compare_row(key, base, r, baseline, max_slowdown, found, info)
    for key in sorted(set(today) - set(baseline.results)):
        if today[key].ok:
            info.append(f"new {key}: not in the baseline (run --update to record it)")
        elif today[key].status == "error":
            found.append(Finding("fail", key, f"does not run: {today[key].reason}"))
    return found, info


def _inputs_and_reference(baseline: RegressBaseline, report: BenchReport,
                          reference: np.ndarray) -> list[Finding]:
    if report.inputs.sha256 != baseline.inputs.sha256:
        return [Finding("change", "golden inputs", "the preprocessed photographs differ from the "
                        "baseline's (preprocessing or the bundled photos changed)")]
    base_ref = decode(baseline.reference.logits)
    err = metrics.max_abs(base_ref, reference) if base_ref.shape == reference.shape else float("inf")
    if err > REFERENCE_TOLERANCE:
        return [Finding("fail", "PyTorch reference logits",
                        f"max-abs {err:.3g} from the baseline's (tolerance "
                        f"{REFERENCE_TOLERANCE:g}); the model code or the weights changed")]
    return []


def _graphs(baseline: RegressBaseline, folder: ArtifactFolder) -> list[Finding]:
    found = []
    files = folder.files()
    for name, old in baseline.graphs.items():
        entry = files.get(name)
        if entry is None:
            found.append(Finding("fail", name, "not produced any more"))
            continue
        new = entry.graph or GraphSummary()
        for field in ("opset", "inputs", "outputs", "nodes", "parameters"):
            was, now = records.as_json(getattr(old, field)), records.as_json(getattr(new, field))
            if now != was:
                found.append(Finding("change", f"{name} {field}", f"{was} → {now}"))
        ops = _diff_dict(old.ops, new.ops)
        if ops:
            found.append(Finding("change", f"{name} op histogram", ", ".join(ops)))
    return found


def _compare_row(key: str, base: BaselineRow, r: Row, baseline: RegressBaseline,
                 max_slowdown: float | None, found: list[Finding], info: list[str]) -> None:
    """One row that ran, against its baseline entry: its fidelity within the tolerance, its latency."""
    images = baseline.inputs.images
    fid, tol = r.fidelity, floored(r.precision, base.tolerance)
    assert fid is not None
    if r.precision in precisions.QUANTIZED and other_int8_kernels(baseline.machine):
        held = tolerance(r.precision, 0.0, 0.0, images)
        verdict = _top1_on_evidence(key, fid.top1_agreement, held.top1_agreement_min or 0.0, images)
        if isinstance(verdict, Finding):
            found.append(verdict)
        elif verdict:
            info.append(verdict)
        tol = dataclasses.replace(held, top1_agreement_min=None)
    was = base.fidelity
    checks = [("max_abs", fid.max_abs, was.max_abs, tol.max_abs_max, "<="),
              ("cosine_min", fid.cosine_min, was.cosine_min, tol.cosine_min_min, ">="),
              ("top1_agreement", fid.top1_agreement, was.top1_agreement, tol.top1_agreement_min, ">=")]
    for metric, value, before, bound, op in checks:
        if bound is None:
            continue
        ok = value <= bound if op == "<=" else value >= bound
        if not ok:
            found.append(Finding("fail", f"{key} {metric}",
                                 f"{before:.6g} → {value:.6g} (tolerance {op} {bound:.6g})"))
    batch = str(base.latency_batch)
    if batch in r.latency:
        now = r.latency[batch].median_ms
        ratio = now / base.median_ms
        info.append(f"{key}: batch {batch} median {base.median_ms:.1f} → {now:.1f} ms ({ratio:.2f}×)")
        if max_slowdown is not None and ratio > max_slowdown:
            found.append(Finding("fail", f"{key} latency",
                                 f"{ratio:.2f}× the baseline's (limit {max_slowdown:g}×)"))


def _top1_on_evidence(key: str, agreement: float, floor: float, images: int) -> Finding | str | None:
    """Top-1 agreement of an INT8 row made by other INT8 kernels than the baseline's, judged on
    the evidence: it fails only when the whole 95% (Wilson) interval of the agreement lies below
    the precision's floor. On a few images, a flip or two is what other rounding does to images
    whose two best classes nearly tie (cvt-13 random:0: 5 of the 11 golden images lead by less
    than 0.16 logits, while INT8's max-abs error is 0.08 to 0.24), not evidence of a regression;
    a broken INT8 export shows in the cosine bound as well. Returns None (at or above the floor),
    an information line (below it, within the interval) or the failure."""
    if agreement >= floor:
        return None
    agree = round(agreement * images)
    lo, hi = metrics.wilson(agree, images)
    shown = f"{agree}/{images} images ({agreement:.6g}; 95% interval [{lo:.2f}, {hi:.2f}])"
    if hi < floor:
        return Finding("fail", f"{key} top1_agreement",
                       f"{shown}: the whole interval lies below the precision's floor {floor:g}")
    return (f"{key}: top-1 agreement {shown} is below the precision's floor {floor:g}, which lies "
            f"inside the interval: not a regression on {images} images from other INT8 kernels")


def verdict(outcome: Outcome) -> str:
    fails = sum(f.kind == "fail" for f in outcome.findings)
    changes = len(outcome.findings) - fails
    return ("baseline written" if outcome.updated else "passed" if not outcome.findings else
            f"failed: {fails} regression(s), {changes} unreviewed change(s)")


def exit_code(outcome: Outcome) -> int:
    """0 when everything holds (or the baseline was rewritten), 1 on a regression or a change."""
    return 1 if outcome.findings and not outcome.updated else 0


def result(outcome: Outcome, baseline: Path) -> RegressResult:
    """The gate's result as a record: `cvt-bench regress --json FILE` writes it (schema
    cvt-regress-result/1), and its Markdown job summary is rendered from it."""
    return RegressResult(baseline=str(baseline), verdict=verdict(outcome), exit_code=exit_code(outcome),
                         updated=outcome.updated,
                         findings=tuple(RegressFinding(f.kind, f.what, f.detail, str(f))
                                        for f in outcome.findings),
                         info=tuple(outcome.info))


def other_int8_kernels(made_on: BaselineMachine | None) -> bool:
    """Whether the baseline's CPU and this one differ in how INT8 dot products are computed
    (VNNI/AMX exact 32-bit sums vs the u8·u8 path ORT takes without them): measured on cvt-13,
    ORT INT8 cosine 0.99710 on an AVX-512 VNNI EPYC and 0.99654 on an AVX2-only one, same recipe.
    A baseline that does not say its CPU (the first ones) is taken as this machine's."""
    if made_on is None or not made_on.isa:
        return False
    return any(f in made_on.isa for f in machine.INT8_DOT_FLAGS) != machine.int8_dot_exact()


def write_baseline(path: Path, data: RegressBaseline) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write(path, json.dumps(data.to_json(), indent=1) + "\n")


@dataclass
class Outcome:
    findings: list[Finding]
    info: list[str]
    report: BenchReport
    updated: bool = False


def run(baseline_path: Path, *, update: bool, artifacts_dir: Path | None, max_slowdown: float | None,
        iters: int = 5, backends: tuple[str, ...] | None = None, precisions: tuple[str, ...] | None = None,
        progress: Any = lambda s: None) -> Outcome:
    """Re-export (cached) or use the given artifacts, re-run the backends, compare or --update.

    Given artifacts are used as they are (their own weights and options): that is how a
    changed checkpoint or export option shows up against the baseline."""
    baseline = baseline_for(baseline_path, update)
    variant = baseline.variant if baseline else "cvt-13"
    weights = baseline.weights if baseline else "random:0"
    export = baseline.export if baseline else BaselineExport()
    folder = artifacts_dir or Path("artifacts") / f"regress-{variant}"
    if artifacts_dir is None:
        from cvt_export import build
        from cvt_export.options import DEFAULT_OPSET, ExportOptions

        opts = ExportOptions(opset=export.opset or DEFAULT_OPSET, image_size=export.image_size,
                             batch=None if export.batch in (None, "dynamic") else int(export.batch))
        # The folder is the gate's own cache: replacing what another baseline left there is fine.
        req = build.BuildRequest(variant, weights, precisions=EXPORTED, options=opts, force=True)
        build.build(req, folder, step=progress)
    else:
        given = ArtifactFolder.open(artifacts_dir)
        if given.variant_name != variant:
            raise BaselineError(f"{artifacts_dir} holds {given.variant_name} artifacts; the baseline is "
                                f"for {variant}")
        if baseline is not None:
            same_model(baseline, given, baseline_path)
    cfg = bench.BenchConfig(variant=variant, weights=None, artifacts=folder, batches=(1, 8), warmup=1,
                            iters=iters, backends=backends or bench.BenchConfig.backends,
                            precisions=precisions or bench.PRECISIONS, golden=True)
    report = bench.run(cfg, progress=progress)
    made = ArtifactFolder.open(folder)
    inputs = bench.load_inputs(None, None, made.variant, golden=True)
    reference = validate.reference_logits(reference_model(made), inputs.images)
    if baseline is None or update:
        new = make_baseline(report, made, reference)
        findings, info = (compare(baseline, report, made, reference, None) if baseline else ([], []))
        write_baseline(baseline_path, new)
        return Outcome(findings, info, report, updated=True)
    findings, info = compare(baseline, report, made, reference, max_slowdown)
    return Outcome(findings, info, report)


def same_model(baseline: RegressBaseline, folder: ArtifactFolder, path: Path) -> None:
    """A baseline made for other weights or another head is the wrong baseline (exit 2), not a
    regression of this model: say so before anything runs."""
    if baseline.weights != folder.weights_spec:
        raise BaselineError(f"{path} was made for weights {baseline.weights}; {folder.path} holds "
                            f"{folder.weights_spec}. Use that folder's own baseline, or --update")
    classes = decode(baseline.reference.logits).shape[1]
    if classes != folder.variant.num_classes:
        raise BaselineError(f"{path} has {classes} classes; {folder.path} has "
                            f"{folder.variant.num_classes}. Use that folder's own baseline, or --update")
    size = baseline.export.image_size
    if size not in (None, folder.image_size):
        raise BaselineError(f"{path} was made at image size {size}; {folder.path} is {folder.image_size}. "
                            "Use that folder's own baseline, or --update")
