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

import functools
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from cvt_export import artifacts, build, machine, metrics, precisions, probes, validate
from cvt_export.artifacts import ArtifactFolder
from cvt_export.backends import TUNED, BackendUnavailable, get_backend, tuned_name
from cvt_export.clock import time_calls
from cvt_export.derive import QUANTIZED_OPS
from cvt_export.harness import recommend
from cvt_export.harness.bench import run_all
from cvt_export.metrics import Budget, within
from cvt_export.records import HeldFidelity, LatencyStats, RoleSize, TunedConfiguration, TuneDecisions
from cvt_export.reference import reference_model
from cvt_ref.errors import CvtError
from cvt_ref.model import CvT

log = logging.getLogger(__name__)

INT8, MIXED_PRECISION = precisions.CALIBRATED, precisions.TUNED  # the file tune starts from, and its own
MIXED = artifacts.ONNX_FILES[MIXED_PRECISION]
SCRATCH_PREFIX = ".tune-"
# objective -> the batch size it is timed at (the objectives are the recommendation's)
OBJECTIVES = {name: int(batch) for name, (batch, _) in recommend.OBJECTIVES.items()}
ROUNDS = 5        # interleaved timing rounds for the final comparison
REFINE_TRIES = 6  # candidates the refinement after the greedy fit may build
FLOAT_CHOICES = {name: precisions.floats_of(name) for name in TUNED}  # the backends tune drives


class TuneError(CvtError):
    """A backend tune cannot drive, a folder without INT8, no held-out images."""


# --- units ---------------------------------------------------------------------------------

def block_nodes(proto: onnx.ModelProto, located: Mapping[str, str]) -> dict[str, list[str]]:
    """Probe key ("stage S block B") -> the Conv/MatMul nodes computing that block: those the
    block's output depends on and the previous block's output does not."""
    owner = probes.node_blocks(proto, located)
    quantizable = {n.name for n in proto.graph.node if n.op_type in QUANTIZED_OPS}
    return {key: sorted(n for n, k in owner.items() if k == key and n in quantizable) for key in located}


# --- measuring one configuration -----------------------------------------------------------

@dataclass
class Measured:
    name: str                 # fp32 | fp16 | bf16 | int8 | mixed (k float) ...
    precision: str
    kept: list[str]
    fidelity: HeldFidelity    # on the selection images: decides
    confirmed: HeldFidelity   # on the confirmation images: checks
    speed: LatencyStats | None = None  # at the objective's batch, interleaved rounds
    within: bool = False      # the budget, with the margin, holds on selection and on confirmation


@dataclass
class Held:
    """Selection and confirmation images (never calibration ones), PyTorch FP32's logits on
    them, and labels when the dataset has them."""

    images: np.ndarray
    reference: np.ndarray
    labels: np.ndarray | None
    note: str
    model: CvT  # the folder's PyTorch model (weights checked by sha256): the reference and the remaker's
    selection: list[int]
    confirmation: list[int]
    sizes: dict[str, RoleSize]


def fidelity(held: Held, logits: np.ndarray, rows: list[int]) -> HeldFidelity:
    fid = metrics.fidelity(held.reference[rows], logits[rows])
    if held.labels is None:
        return fid
    labels = held.labels[rows]
    ref, got = metrics.accuracy(held.reference[rows], labels), metrics.accuracy(logits[rows], labels)
    return replace(fid, top1=got.top1, top1_ci=got.top1_ci, top1_drop=100 * (ref.top1 - got.top1))


def held_out(folder: ArtifactFolder, dataset: Path | None, limit: int | None) -> Held:
    from cvt_export.harness.bench import load_inputs, roles

    inputs = load_inputs(dataset, limit, folder.variant, folder.labels)
    split = roles(inputs, folder)
    sel, conf = split.rows("selection"), split.rows("confirmation")
    if not sel or not conf:
        raise TuneError(f"tune needs selection and confirmation images apart from the calibration ones "
                        f"({split.note}); pass --dataset with more images")
    rows = sel + conf
    images = inputs.images[rows]
    model = reference_model(folder)
    reference = validate.reference_logits(model, images)
    labels = inputs.labels[rows] if inputs.labels is not None else None
    return Held(images, reference, labels, split.note, model, list(range(len(sel))),
                list(range(len(sel), len(rows))), split.sizes)


def run_config(backend: str, folder: ArtifactFolder, precision: str, held: Held, threads: int | None
               ) -> tuple[HeldFidelity, HeldFidelity]:
    """Fidelity on the selection and on the confirmation images."""
    with get_backend(backend).compile(folder, precision, threads=threads) as runner:
        logits = run_all(runner, held.images, 8)
    return fidelity(held, logits, held.selection), fidelity(held, logits, held.confirmation)


def time_interleaved(backend: str, where: Mapping[str, tuple[ArtifactFolder, str]], held: Held,
                     batch: int, threads: int | None, seconds: float, rounds: int = ROUNDS
                     ) -> dict[str, LatencyStats]:
    """Latency of several configurations at `batch`, all compiled at once and timed in `rounds`
    interleaved rounds (a different order each round), so a slow minute of the machine is
    shared by all of them; each gets `seconds` in all."""
    x = np.resize(held.images, (batch, *held.images.shape[1:]))
    samples: dict[str, list[float]] = {name: [] for name in where}
    with ExitStack() as stack:
        runners = {name: stack.enter_context(get_backend(backend).compile(f, prec, threads=threads))
                   for name, (f, prec) in where.items()}
        for runner in runners.values():  # warm-up
            runner(x)
            runner(x)
        names = list(runners)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                run = functools.partial(runners[name], x)
                samples[name] += time_calls(run, warmup=0, iters=None, seconds=seconds / rounds, min_iters=2)
    return {name: metrics.latency_stats(t, batch, rounds) for name, t in samples.items()}


def ci_ms(c: Measured) -> Sequence[float]:
    """The 95% interval of a timed candidate's median."""
    assert c.speed is not None
    return c.speed.interval


def median_ms(c: Measured) -> float:
    return c.speed.median_ms if c.speed else float("inf")


def faithful(c: Measured) -> tuple[float, float]:
    return c.fidelity.cosine_min, c.confirmed.cosine_min


# --- the search ----------------------------------------------------------------------------

@dataclass
class TuneResult:
    backend: str
    objective: str
    budgets: list[str]
    margin: float
    held_out: str
    roles: dict[str, RoleSize]
    sensitivity: dict[str, float]
    configs: list[Measured]
    chosen: Measured | None
    best_float: Measured | None
    mixed_written: bool
    message: str


def tune(folder: ArtifactFolder | Path, backend: str, budgets: Sequence[Budget],
         objective: str = "throughput-b8", *, dataset: Path | None = None, limit: int | None = None,
         threads: int | None = None, seconds: float = 2.0, margin: float = 0.0,
         step: Callable[[str], None] = lambda s: None) -> TuneResult:
    """Search and, when a mix is within the budget, write it; the folder's lock is held from start
    to end (a second tune, an export or a bench of the same folder is refused meanwhile)."""
    if not 0 < seconds <= 3600:  # NaN fails it too
        raise TuneError(f"--seconds {seconds}: must be in (0, 3600]")
    if not 0.0 <= margin < 1.0:
        raise TuneError(f"--margin {margin:g}: a share of what the budget allows to be lost, 0 <= m < 1 "
                        "(0.2 asks cosine>=0.9995 for 0.9996)")
    if objective not in OBJECTIVES:
        raise TuneError(f"--objective {objective!r}: use {', '.join(OBJECTIVES)}")
    b = get_backend(tuned_name(backend))
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
        return _tune(Search(folder, b.name, list(budgets), margin, objective, threads, seconds, step),
                     dataset, limit)


def _remove_leftovers(folder: ArtifactFolder) -> None:
    """Under the lock, marked scratch folders and part-written mixes are a killed tune's: ours to
    remove (one an earlier release made, before scratch carried the mark, is known by its
    manifest naming this folder as its origin). A folder of the user's that shares the prefix
    stays."""
    artifacts.remove_stale_scratch(folder.path, SCRATCH_PREFIX, lambda p: _earlier_scratch(p, folder.path))
    folder.file(f".{MIXED}.tmp").unlink(missing_ok=True)


def _earlier_scratch(stale: Path, origin: Path) -> bool:
    return stale.is_dir() and not stale.is_symlink() and artifacts.scratch_origin(stale) == str(origin)


@dataclass
class Search:
    """What one tune run searches with."""

    folder: ArtifactFolder
    backend: str
    budgets: list[Budget]
    margin: float
    objective: str
    threads: int | None
    seconds: float
    step: Callable[[str], None]

    def fits(self, sel: HeldFidelity, conf: HeldFidelity) -> bool:
        return within(self.budgets, sel, self.margin) and within(self.budgets, conf, self.margin)


def _tune(s: Search, dataset: Path | None, limit: int | None) -> TuneResult:
    folder = s.folder
    s.step("reference logits on the selection and confirmation images")
    held = held_out(folder, dataset, limit)
    if any(x.metric == "top1-drop" for x in s.budgets) and held.labels is None:
        raise TuneError(f"--budget top1-drop needs labels: {dataset} is not an ImageFolder of the "
                        "model's classes")

    configs: list[Measured] = []
    for prec in (*FLOAT_CHOICES[s.backend], INT8):
        if prec == INT8 and not folder.has(INT8):
            raise TuneError(f"{folder.path}: has no {precisions.FILES[INT8]}; make it first with "
                            f"`{folder.export_command([INT8])}`")
        if not folder.has(precisions.reads(prec)):  # a float file not exported (fp16): not a choice
            continue
        s.step(f"{s.backend} {prec}: fidelity")
        try:
            sel, conf = run_config(s.backend, folder, prec, held, s.threads)
        except BackendUnavailable as e:  # BF16 on a CPU without it; INT8 without VNNI
            if prec == INT8:
                raise TuneError(f"--backend {s.backend}: {e}") from None
            log.info("tune: %s %s skipped: %s", s.backend, prec, e)
            continue
        configs.append(Measured(prec, prec, [], sel, conf, None, s.fits(sel, conf)))

    sensitivity: dict[str, float] = {}
    int8_within = any(c.precision == INT8 and c.within for c in configs)
    tmp = folder.file(f".{MIXED}.tmp")
    scratch = ArtifactFolder.scratch(folder, SCRATCH_PREFIX, (precisions.REFERENCE, INT8))
    try:
        found = None if int8_within else _search(s, scratch, held, configs, sensitivity, tmp)
        contenders = [c for c in configs if c.within and (c.precision != MIXED_PRECISION or c is found)]
        if found is not None:  # the accepted file, back in the scratch folder to be timed there
            shutil.copy(tmp, scratch.file(MIXED))
            _record_mixed(scratch, [MIXED])
        if contenders:
            s.step(f"timing {', '.join(c.name for c in contenders)} in {ROUNDS} interleaved rounds")
            where = {c.name: (scratch if c.precision == MIXED_PRECISION else folder, c.precision)
                     for c in contenders}
            speeds = time_interleaved(s.backend, where,
                                      held, OBJECTIVES[s.objective], s.threads, s.seconds * len(contenders))
            for c in contenders:
                c.speed = speeds[c.name]
        return _decide(s, held, configs, sensitivity, found)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch.path, ignore_errors=True)


def unit_costs(proto: onnx.ModelProto, units: Mapping[str, list[str]], image_size: int,
               strides: Sequence[int]) -> dict[str, float]:
    """A block's cost in float: its weights' element count x its stage's token count (each
    weight of a Conv/MatMul is used once per token), a proxy for the multiply-adds it adds when
    it is kept out of INT8."""
    sizes = {t.name: float(np.prod(t.dims)) for t in proto.graph.initializer}
    inputs = {n.name: list(n.input) for n in proto.graph.node}
    costs = {}
    for unit, nodes in units.items():
        stage = int(unit.split()[1])
        side = image_size
        for st in strides[:stage + 1]:
            side = -(-side // st)
        costs[unit] = side * side * sum(sizes.get(i, 0.0) for n in nodes for i in inputs[n])
    return costs


def _search(s: Search, scratch: ArtifactFolder, held: Held, configs: list[Measured],
            sensitivity: dict[str, float], tmp: Path) -> Measured | None:
    """Sensitivity per block on the selection images, the greedy search, then a refinement that
    tries to return the costliest kept block to INT8, alone or by keeping a cheaper block
    instead. A candidate is accepted only when the budget (with the margin) holds on the
    selection and on the confirmation images. The accepted file is copied to `tmp`."""
    folder = s.folder
    proto = onnx.load(str(folder.onnx("fp32", check_hash=False)), load_external_data=False)
    units = block_nodes(proto, folder.probes)
    names = list(units)
    costs = unit_costs(proto, units, folder.image_size, [st.patch_stride for st in folder.variant.stages])
    found: Measured | None = None
    s.step("preparing the INT8 source (calibration ranges, SmoothQuant migration)")
    with build.Int8Remaker(folder, held.model, scratch.path) as remaker:

        def candidate(kept: list[str], how: str) -> Measured:
            keep = tuple(n for u in kept for n in units[u])
            files = remaker.make(keep, scratch.file(MIXED))
            _record_mixed(scratch, files)
            sel, conf = run_config(s.backend, scratch, "mixed", held, s.threads)
            return Measured(f"mixed ({len(kept)} float{how})", "mixed", kept, sel, conf, None,
                            s.fits(sel, conf))

        for i, unit in enumerate(names):
            s.step(f"sensitivity: {unit} alone in INT8 ({i + 1}/{len(names)})")
            only = candidate([u for u in names if u != unit], "")
            sensitivity[unit] = max(0.0, 1.0 - only.fidelity.cosine_min)
        order = sorted(names, key=lambda u: -sensitivity[u])
        for k in range(1, len(names)):
            s.step(f"greedy: {k} most sensitive block(s) in float")
            configs.append(candidate(order[:k], ""))
            if configs[-1].within:
                found = configs[-1]
                shutil.copy(scratch.file(MIXED), tmp)
                break
        tries = 0
        while found is not None and tries < REFINE_TRIES:
            improved = False
            for costly in sorted(found.kept, key=lambda u: -costs[u]):
                rest = [u for u in found.kept if u != costly]
                cheaper = [u for u in order if u not in found.kept and costs[u] < costs[costly]][:2]
                for kept, how in [(rest, ", dropped " + costly), *(([*rest, u], f", {u} for {costly}")
                                                                   for u in cheaper)]:
                    if not kept or tries >= REFINE_TRIES:
                        continue
                    tries += 1
                    s.step(f"refining: {how[2:]}")
                    configs.append(candidate(kept, how))
                    if configs[-1].within:
                        found = configs[-1]
                        shutil.copy(scratch.file(MIXED), tmp)
                        improved = True
                        break
                if improved or tries >= REFINE_TRIES:
                    break
            if not improved:
                break
    return found


def _decide(s: Search, held: Held, configs: list[Measured], sensitivity: dict[str, float],
            found: Measured | None) -> TuneResult:
    """The configuration to deploy on this backend: among those within the budget, those no other
    one is faster than beyond the noise (95% intervals of the median) are tied for fastest, and
    the tie goes to the most faithful (selection cosine, then confirmation cosine)."""
    timed = [c for c in configs if c.within and c.speed is not None]
    floats = [c for c in timed if c.precision in FLOAT_CHOICES[s.backend]]
    best_float = max(floats, key=faithful) if floats else None
    fits = ", ".join(map(str, s.budgets)) + (f" with margin {s.margin:g}" if s.margin else "")
    chosen: Measured | None = None
    if not timed:
        message = f"nothing on {s.backend} is within {fits} on both selection and confirmation ({held.note})"
    else:
        tied = sorted(metrics.unbeaten(timed, ci_ms), key=median_ms)  # tied for fastest
        chosen = max(tied, key=faithful)
        if len(tied) == 1:
            message = (f"{chosen.name} is within {fits} and the fastest for {s.objective} beyond the "
                       "noise (95% intervals of the median separate)")
        else:
            message = (f"{', '.join(c.name for c in tied)} are tied for {s.objective} (none is faster "
                       f"than another beyond the noise: 95% intervals of the median); {chosen.name} is "
                       "chosen as the most faithful of them")
        if chosen.precision == INT8:
            message += "; INT8 everywhere: no mix needed"
    if found is not None and chosen is not found:
        message += f"; {found.name} is within the budget and kept as model.mixed.onnx"
    result = TuneResult(s.backend, s.objective, [str(x) for x in s.budgets], s.margin, held.note, held.sizes,
                        sensitivity, configs, chosen, best_float, found is not None, message)
    tmp = s.folder.file(f".{MIXED}.tmp")
    if found is not None:
        _commit_mixed(s.folder, tmp, result)
    tmp.unlink(missing_ok=True)
    return result


def _record_mixed(scratch: ArtifactFolder, files: list[str]) -> None:
    """Record a new candidate in the scratch folder; its previous IR is no longer its own."""
    entry = build.file_entry(scratch.path, files, "mixed", made_from=scratch.sha256("fp32"),
                             int8_from=scratch.sha256("int8"))
    scratch.record_file("mixed", entry)
    scratch.forget_irs()


def _commit_mixed(folder: ArtifactFolder, tmp: Path, result: TuneResult) -> None:
    """The chosen mix into the artifact folder, its decisions in the manifest (under the lock).
    The old entry goes first: killed half-way, the folder verifies without a mix."""
    with folder.lock():
        folder.drop("mixed")
        os.replace(tmp, folder.file(MIXED))
        entry = build.file_entry(folder.path, [MIXED], "mixed", made_from=folder.sha256("fp32"),
                                 int8_from=folder.sha256("int8"), tune=summary(result))
        folder.record_file("mixed", entry)


SEARCH = ("greedy: the most sensitive blocks (on the selection images) kept in float first, up "
          "to the first mix within the budget on selection and confirmation; then up to "
          f"{REFINE_TRIES} refinements, each returning the costliest kept block to INT8 alone or "
          "keeping a cheaper block (weights x tokens) in its place")


def summary(result: TuneResult) -> TuneDecisions:
    """What tune decided, for the manifest and tune.json."""
    def one(c: Measured) -> TunedConfiguration:
        return TunedConfiguration(name=c.name, precision=c.precision, float_blocks=tuple(c.kept),
                                  within_budget=c.within, fidelity=c.fidelity, confirmation=c.confirmed,
                                  speed=c.speed)

    return TuneDecisions(backend=result.backend, objective=result.objective, budget=tuple(result.budgets),
                         margin=result.margin, held_out=result.held_out, roles=result.roles, search=SEARCH,
                         sensitivity=result.sensitivity, configs=tuple(one(c) for c in result.configs),
                         chosen=result.chosen.name if result.chosen else None, message=result.message,
                         machine=machine.describe())

