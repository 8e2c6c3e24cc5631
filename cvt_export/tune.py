"""`cvt-export tune`: the fastest INT8/float mix of a folder's model within a fidelity budget.

1. Units: each transformer block (its Conv/MatMul nodes, found between consecutive probe points,
   so the stage's patch embedding belongs to the stage's first block).
2. Sensitivity: one candidate per unit with only that unit quantized (the rest float); its
   error is 1 - cosine_min of the logits on held-out images.
3. Search (greedy, said so in the report): keep the k most sensitive units in float, k = 1,
   2, ..., and stop at the first candidate within the budget (no search when INT8 everywhere,
   k = 0, already is). Every candidate is a real Q/DQ
   file (same calibration ranges and SmoothQuant migration as the export), compiled and run on
   the target backend; the accepted one is timed there, beside the folder's FP32, FP16/BF16 and
   INT8 files in the same run.
4. Result: `model.mixed.onnx` (whenever a mix is within the budget, even when a float file is
   faster on this backend: TensorRT or another machine reads the same file) with the decisions
   in the manifest, and `tune.md` / `tune.json`, which say which configuration to deploy here.

Held-out images decide the budget: the bundled photos (or --dataset images) not used for
calibration. Kept units run in FP32 (on OpenVINO with the f32 inference hint).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cvt_export import artifacts, build, machine, metrics, precisions, validate
from cvt_export.artifacts import ArtifactFolder
from cvt_export.backends import BackendUnavailable, get_backend
from cvt_export.backends.torch import reference_model
from cvt_export.errors import CvtError
from cvt_export.harness import recommend, timing
from cvt_export.harness.bench import run_all
from cvt_export.metrics import Budget, within
from cvt_export.precision import QUANTIZED_OPS
from cvt_ref.model import CvT

log = logging.getLogger(__name__)

MIXED = artifacts.ONNX_FILES["mixed"]
SCRATCH_PREFIX = ".tune-"
# objective -> the batch size it is timed at (the objectives are the recommendation's)
OBJECTIVES = {name: int(batch) for name, (batch, _) in recommend.OBJECTIVES.items()}
FLOAT_CHOICES = {name: precisions.floats_of(name) for name in ("ort", "openvino")}  # the backends tune drives


class TuneError(CvtError):
    """A backend tune cannot drive, a folder without INT8, no held-out images."""


def parse_budget(text: str) -> Budget:
    try:
        return metrics.parse_budget(text)
    except ValueError as e:
        raise TuneError(str(e)) from None


# --- units ---------------------------------------------------------------------------------

def block_nodes(proto: onnx.ModelProto, located: Mapping[str, str]) -> dict[str, list[str]]:
    """Probe key ("stage S block B") -> the Conv/MatMul nodes computing that block: those the
    block's output depends on and the previous block's output does not."""
    producer = {o: n for n in proto.graph.node for o in n.output}

    def ancestors(tensor: str) -> set[str]:
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(node.input)
        return seen

    ops = {n.name: n.op_type for n in proto.graph.node}
    units: dict[str, list[str]] = {}
    done: set[str] = set()
    for key, tensor in located.items():
        mine = ancestors(tensor) - done
        done |= mine
        units[key] = sorted(n for n in mine if ops[n] in QUANTIZED_OPS)
    return units


# --- measuring one configuration -----------------------------------------------------------

@dataclass
class Measured:
    name: str                 # fp32 | fp16 | bf16 | int8 | mixed[k] ...
    precision: str
    kept: list[str] = field(default_factory=list)
    fidelity: dict[str, float] = field(default_factory=dict)
    speed: dict[str, float] | None = None  # latency_stats at the objective's batch
    within: bool = False


@dataclass
class Held:
    """Held-out images, PyTorch FP32's logits on them, and labels when the dataset has them."""

    images: np.ndarray
    reference: np.ndarray
    labels: np.ndarray | None
    note: str
    model: CvT  # the folder's PyTorch model (weights checked by sha256): the reference and the remaker's


def fidelity(held: Held, logits: np.ndarray) -> dict[str, float]:
    fid = metrics.fidelity(held.reference, logits)
    if held.labels is not None:
        ref_acc = metrics.accuracy(held.reference, held.labels)["top1"]
        fid["top1"] = metrics.accuracy(logits, held.labels)["top1"]
        fid["top1_drop"] = 100 * (ref_acc - fid["top1"])
    return fid


def held_out(folder: ArtifactFolder, dataset: Path | None, limit: int | None) -> Held:
    from cvt_export.harness.bench import held_out_rows, load_inputs

    inputs = load_inputs(dataset, limit, folder.variant, folder.labels)
    rows, note = held_out_rows(inputs, folder)
    if rows is None:  # none of them calibrated
        rows = list(range(len(inputs.names)))
    if not rows:
        raise TuneError(f"no held-out images: every image of {inputs.source} was used for calibration; "
                        "pass --dataset with other images")
    images = inputs.images[rows]
    model = reference_model(folder)
    reference = validate.reference_logits(model, images)
    labels = inputs.labels[rows] if inputs.labels is not None else None
    return Held(images, reference, labels, note, model)


def run_config(backend: str, folder: ArtifactFolder, precision: str, held: Held, batch: int,
               threads: int | None, seconds: float,
               timed: Callable[[dict[str, float]], bool] = lambda fid: True
               ) -> tuple[dict[str, float], dict[str, float] | None]:
    """Fidelity on the held-out images and, when `timed(fidelity)`, latency at `batch`."""
    with get_backend(backend).compile(folder, precision, threads=threads) as runner:
        logits = run_all(runner, held.images, 8)
        fid = fidelity(held, logits)
        speed = None
        if timed(fid):
            x = np.resize(held.images, (batch, *held.images.shape[1:]))
            speed = timing.measure(runner, x, warmup=2, iters=None, seconds=seconds)
    return fid, speed


def better(objective: str, a: Measured, b: Measured | None) -> bool:
    """Whether a is faster than b for the objective (b None: a wins)."""
    if b is None or b.speed is None:
        return True
    assert a.speed is not None
    return a.speed["median_ms"] < b.speed["median_ms"] if objective == "latency-b1" \
        else a.speed["images_per_s"] > b.speed["images_per_s"]


# --- the search ----------------------------------------------------------------------------

@dataclass
class TuneResult:
    backend: str
    objective: str
    budgets: list[str]
    held_out: str
    sensitivity: dict[str, float]
    configs: list[Measured]
    chosen: Measured | None
    best_float: Measured | None
    mixed_written: bool
    message: str


def tune(folder: ArtifactFolder | Path, backend: str, budgets: Sequence[Budget],
         objective: str = "throughput-b8", *, dataset: Path | None = None, limit: int | None = None,
         threads: int | None = None, seconds: float = 2.0,
         step: Callable[[str], None] = lambda s: None) -> TuneResult:
    """Search and, when a mix wins, write it; the folder's lock is held from start to end (a
    second tune, an export or a bench of the same folder is refused meanwhile)."""
    if seconds <= 0:
        raise TuneError(f"--seconds {seconds}: must be > 0")
    if objective not in OBJECTIVES:
        raise TuneError(f"--objective {objective!r}: use {', '.join(OBJECTIVES)}")
    b = get_backend(backend)
    if b.name not in FLOAT_CHOICES:
        raise TuneError(f"--backend {backend}: tune drives {', '.join(FLOAT_CHOICES)} here "
                        "(TensorRT reads the same model.mixed.onnx)")
    ok, why = b.available()
    if not ok:
        raise TuneError(f"--backend {b.name}: {why}")
    if not budgets:
        raise TuneError("give at least one --budget, e.g. --budget \"cosine>=0.999\"")
    folder = artifacts.as_folder(folder)
    if any(x.metric == "top1-drop" for x in budgets) and dataset is None:
        raise TuneError("--budget top1-drop needs --dataset (a labelled image folder)")
    artifacts.check_writable(folder.path, "--artifacts")
    with folder.lock():
        _remove_leftovers(folder)
        return _tune(folder, b.name, budgets, objective, dataset, limit, threads, seconds, step)


def _remove_leftovers(folder: ArtifactFolder) -> None:
    """Under the lock, scratch folders and part-written mixes are a killed tune's: ours to remove."""
    for stale in folder.path.glob(f"{SCRATCH_PREFIX}*"):
        if stale.is_dir() and ((stale / artifacts.SCRATCH_MANIFEST).exists() or not any(stale.iterdir())):
            shutil.rmtree(stale, ignore_errors=True)
    folder.file(f".{MIXED}.tmp").unlink(missing_ok=True)


def _tune(folder: ArtifactFolder, backend: str, budgets: Sequence[Budget], objective: str,
          dataset: Path | None, limit: int | None, threads: int | None, seconds: float,
          step: Callable[[str], None]) -> TuneResult:
    b = get_backend(backend)
    batch = OBJECTIVES[objective]
    step("reference logits on held-out images")
    held = held_out(folder, dataset, limit)
    if any(x.metric == "top1-drop" for x in budgets) and held.labels is None:
        raise TuneError(f"--budget top1-drop needs labels: {dataset} is not an ImageFolder of the "
                        "model's classes")

    configs: list[Measured] = []
    for prec in (*FLOAT_CHOICES[b.name], "int8"):
        if prec == "int8" and not folder.has("int8"):
            raise TuneError(f"{folder.path}: has no model.int8.onnx; make it first with "
                            f"`{folder.export_command(['int8'])}`")
        if prec == "fp16" and not folder.has("fp16"):
            continue
        step(f"{b.name} {prec}: fidelity and speed")
        try:
            fid, speed = run_config(b.name, folder, prec, held, batch, threads, seconds)
        except BackendUnavailable as e:  # BF16 on a CPU without it; INT8 without VNNI
            if prec == "int8":
                raise TuneError(f"--backend {b.name}: {e}") from None
            log.info("tune: %s %s skipped: %s", b.name, prec, e)
            continue
        configs.append(Measured(prec, prec, [], fid, speed, within(budgets, fid)))

    sensitivity: dict[str, float] = {}
    int8_within = any(c.precision == "int8" and c.within for c in configs)
    found = None if int8_within else _search(folder, b.name, budgets, held, batch, threads,
                                             seconds, configs, sensitivity, step)
    return _decide(folder, b.name, objective, budgets, held, configs, sensitivity, found)


def _search(folder: ArtifactFolder, backend: str, budgets: Sequence[Budget], held: Held,
            batch: int, threads: int | None, seconds: float, configs: list[Measured],
            sensitivity: dict[str, float], step: Callable[[str], None]) -> Measured | None:
    """Sensitivity per block, then the greedy search; the first mix within the budget (its
    file copied to `.model.mixed.onnx.tmp` in the folder), or None."""
    proto = onnx.load(str(folder.onnx("fp32", check_hash=False)), load_external_data=False)
    units = block_nodes(proto, folder.probes)
    names = list(units)
    tmp = folder.file(f".{MIXED}.tmp")
    found: Measured | None = None
    scratch = ArtifactFolder.scratch(folder, SCRATCH_PREFIX, ("fp32", "int8"))
    try:
        step("preparing the INT8 source (calibration ranges, SmoothQuant migration)")
        with build.Int8Remaker(folder, held.model, scratch.path) as remaker:

            def candidate(kept: list[str], timed: Callable[[dict[str, float]], bool]
                          ) -> tuple[dict[str, float], dict[str, float] | None]:
                keep = tuple(n for u in kept for n in units[u])
                files = remaker.make(keep, scratch.file(MIXED))
                _record_mixed(scratch, files)
                return run_config(backend, scratch, "mixed", held, batch, threads, seconds, timed)

            for i, unit in enumerate(names):
                step(f"sensitivity {i + 1}/{len(names)}: {unit} alone in INT8")
                fid, _ = candidate([u for u in names if u != unit], timed=lambda f: False)
                sensitivity[unit] = max(0.0, 1.0 - fid["cosine_min"])
            order = sorted(names, key=lambda u: -sensitivity[u])
            for k in range(1, len(names)):
                kept = order[:k]
                step(f"greedy: {k} most sensitive block(s) in float")
                fid, speed = candidate(kept, timed=lambda f: within(budgets, f))
                configs.append(Measured(f"mixed ({k} float)", "mixed", kept, fid, speed,
                                        within(budgets, fid)))
                if configs[-1].within:
                    found = configs[-1]
                    shutil.copy(scratch.file(MIXED), tmp)
                    break
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch.path, ignore_errors=True)
    return found


def _decide(folder: ArtifactFolder, backend: str, objective: str, budgets: Sequence[Budget], held: Held,
            configs: list[Measured], sensitivity: dict[str, float], found: Measured | None) -> TuneResult:
    """The fastest configuration within the budget: INT8, the mix, or a float file."""
    floats = [c for c in configs if c.precision in FLOAT_CHOICES[backend] and c.within]
    best_float = None
    for c in floats:
        if better(objective, c, best_float):
            best_float = c
    chosen: Measured | None = None
    for c in [*(c for c in configs if c.precision == "int8"), *([found] if found else [])]:
        if c.within and better(objective, c, chosen):
            chosen = c
    if chosen is not None and best_float is not None and not better(objective, chosen, best_float):
        chosen = None
    tmp = folder.file(f".{MIXED}.tmp")
    written = found is not None  # a mix within the budget is kept even when float is faster here:
    # another backend (TensorRT reads the same file) or machine may time it differently
    fits = ", ".join(map(str, budgets))
    if chosen is not None and chosen is found:
        message = f"{chosen.name} is within {fits} and the fastest for {objective}"
    elif chosen is not None:
        message = f"INT8 everywhere is within the budget and the fastest for {objective}; no mix needed"
    elif best_float is not None:
        message = (f"no INT8 configuration within {fits} beats {best_float.name} on {backend} here; "
                   f"deploy {best_float.name}")
        if found is not None:
            message += f" ({found.name} is within the budget and kept as model.mixed.onnx)"
    else:
        message = f"nothing on {backend} is within {fits} on {held.note}"
    result = TuneResult(backend, objective, [str(x) for x in budgets], held.note, sensitivity, configs,
                        chosen or best_float, best_float, written, message)
    if written:
        _commit_mixed(folder, tmp, result)
    tmp.unlink(missing_ok=True)
    return result


def _record_mixed(scratch: ArtifactFolder, files: list[str]) -> None:
    """Record a new candidate in the scratch folder; its previous IR is no longer its own."""
    entry = build.file_entry(scratch.path, files, "mixed")
    entry.update({"from": scratch.sha256("fp32"), "int8_from": scratch.sha256("int8")})
    scratch.record_file("mixed", entry)
    scratch.forget_irs()


def _commit_mixed(folder: ArtifactFolder, tmp: Path, result: TuneResult) -> None:
    """The chosen mix into the artifact folder, its decisions in the manifest (under the lock).
    The old entry goes first: killed half-way, the folder verifies without a mix."""
    with folder.lock():
        folder.drop("mixed")
        os.replace(tmp, folder.file(MIXED))
        entry = build.file_entry(folder.path, [MIXED], "mixed")
        entry.update({"from": folder.sha256("fp32"), "int8_from": folder.sha256("int8"),
                      "tune": summary(result)})
        folder.record_file("mixed", entry)


def summary(result: TuneResult) -> dict[str, Any]:
    """What tune decided, for the manifest and tune.json."""
    def one(c: Measured) -> dict[str, Any]:
        return {"name": c.name, "precision": c.precision, "float_blocks": c.kept,
                "within_budget": c.within, "fidelity": c.fidelity, "speed": c.speed}

    return {"backend": result.backend, "objective": result.objective, "budget": result.budgets,
            "held_out": result.held_out, "search": "greedy: most sensitive blocks kept in float first",
            "sensitivity": result.sensitivity, "configs": [one(c) for c in result.configs],
            "chosen": result.chosen.name if result.chosen else None, "message": result.message,
            "machine": machine.describe()}


def markdown(result: TuneResult) -> str:
    lines = [f"# cvt-export tune: {result.backend}, {result.objective}", "",
             f"Budget {', '.join(result.budgets)} on {result.held_out}. Search: greedy (the most "
             "sensitive blocks are kept in float first; it stops at the first mix within the budget).", "",
             "| configuration | float blocks | cosine min | top-1 agreement | within budget | "
             "median ms | images/s |", "|---|---|---|---|---|---|---|"]
    for c in result.configs:
        speed = (f"{c.speed['median_ms']:.1f} | {c.speed['images_per_s']:.1f}" if c.speed else "– | –")
        lines.append(f"| {c.name}{' **(chosen)**' if c is result.chosen else ''} | "
                     f"{', '.join(c.kept) or '–'} | {c.fidelity['cosine_min']:.6f} | "
                     f"{100 * c.fidelity['top1_agreement']:.0f}% | {'yes' if c.within else 'no'} | {speed} |")
    lines += ["", "Per-block sensitivity (1 − cosine min with only that block in INT8):", "",
              "| block | error |", "|---|---|"]
    lines += [f"| {u} | {e:.2e} |" for u, e in sorted(result.sensitivity.items(), key=lambda kv: -kv[1])]
    lines += ["", f"**{result.message}**", ""]
    return "\n".join(lines)

