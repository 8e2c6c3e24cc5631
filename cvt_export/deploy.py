"""`cvt-export deploy`: the Triton configuration that meets a latency SLO at a given traffic, with
served answers checked before any speed counts.

On the real tritonserver of this machine (python runtime): every precision the folder offers x
each runner, under the default scheduling (a candidate whose answers on the selection images
miss the budget is never timed); a hill climb over instances, max batch and queue delay from
the best of them; the lowest percentile among those that met the SLO; a confirmation separate
from the search, interleaved with the default configuration on arrivals the search never saw,
and ladders of sustained rates judged the same way; the decided configuration written to the
repository, served from there once more and checked again. The record (`NAME.deploy.json`,
`.md`, `.svg`) is rendered by `cvt_export.render.deploy`. Why each rule is what it is, with the
runs that showed it: docs/triton.md ("SLO search").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvt_export import artifacts, metrics, precisions
from cvt_export.artifacts import ArtifactFolder
from cvt_export.harness import served
from cvt_export.records import Candidate as Measured
from cvt_export.records import (
    Confirmation,
    ConfirmedConfiguration,
    ConfirmRound,
    DeployRecord,
    DeploySearch,
    Fidelity,
    LoadRun,
    OpenLoopRun,
    ServedConfiguration,
    ServedFidelity,
    Sustained,
    SustainedStep,
)
from cvt_export.render import deploy as render
from cvt_export.triton import TritonError
from cvt_export.triton.repository import RepoOptions, check_destination, write_repository
from cvt_ref.errors import CvtError

INSTANCES = (1, 2, 3)
MAX_BATCH = (1, 2, 4, 8, 16, 32)
QUEUE_US = (0, 1000, 2000, 5000, 10000)
IMPROVES = 0.05       # a neighbour must lower the percentile by more than this share
SUSTAINED = 0.90      # kept up: answers left at >= this share of the rate requests arrived at
LADDER, LADDER_STEPS = 1.25, 8  # the sustained-rate ladder: factor between steps, steps at most
ROUNDS = 3            # interleaved confirmation rounds of the chosen and the default configuration
SLO_FIGURE = {50: "median_ms", 90: "p90_ms", 99: "p99_ms"}  # the client latency each percentile reads
SLO_RE = re.compile(r"^\s*p(50|90|99)\s*<=\s*([0-9.]+)\s*ms\s*@\s*rate\s*=\s*([0-9.]+)\s*$")


REQUESTS_MAX = 100_000  # per candidate: at --slo rates of 1-100/s, minutes to hours, not years

class DeployError(TritonError):
    """An SLO, budget or search setting that cannot be used."""


@dataclass(frozen=True)
class Slo:
    percentile: int   # 50 | 90 | 99
    limit_ms: float
    rate: float       # requests per second, Poisson arrivals

    @staticmethod
    def parse(text: str) -> Slo:
        m = SLO_RE.match(text)
        if not m:
            raise DeployError(f"--slo {text!r}: write it as p99<=60ms@rate=40 (p50, p90 or p99; "
                              "milliseconds; requests per second)")
        slo = Slo(int(m.group(1)), float(m.group(2)), float(m.group(3)))
        if not 0 < slo.limit_ms <= 600_000 or not 0 < slo.rate <= 10_000:
            raise DeployError(f"--slo {text!r}: the bound must be in (0, 600000] ms and the rate in "
                              "(0, 10000] requests per second")
        return slo

    @property
    def key(self) -> str:
        return f"p{self.percentile}_ms"

    def __str__(self) -> str:
        return f"p{self.percentile}<={self.limit_ms:g}ms@rate={self.rate:g}"


@dataclass(frozen=True)
class Candidate:
    precision: str
    backend: str = "ort"
    instances: int = 1
    max_batch: int = 8
    queue_us: int = 2000
    preferred: tuple[int, ...] | None = None  # None: half the max batch and the max batch

    def options(self, name: str) -> RepoOptions:
        preferred = self.preferred if self.preferred is not None else \
            tuple(b for b in (self.max_batch // 2, self.max_batch) if b >= 2)
        # Several instances share the cores: each gets its share of threads, not all of them.
        threads = None if self.instances == 1 else max(1, (os.cpu_count() or 1) // self.instances)
        return RepoOptions(name=name, precision=self.precision, python_backend=self.backend,
                           instances=self.instances, max_batch=self.max_batch, preferred_batch=preferred,
                           queue_delay_us=self.queue_us, threads=threads)

    def label(self) -> str:
        return (f"{self.backend} {self.precision}, {self.instances} inst, max batch {self.max_batch}, "
                f"queue {self.queue_us / 1000:g} ms")

    def configuration(self) -> ServedConfiguration:
        return ServedConfiguration(self.backend, self.precision, self.instances, self.max_batch,
                                   self.queue_us, self.preferred)

    def neighbours(self) -> list[Candidate]:
        out = []
        for knob, values in (("instances", INSTANCES), ("max_batch", MAX_BATCH), ("queue_us", QUEUE_US)):
            now = getattr(self, knob)
            k = values.index(now) if now in values else 0
            for j in (k - 1, k + 1):
                if 0 <= j < len(values):
                    changed: dict[str, Any] = {knob: values[j], "preferred": None}
                    out.append(dataclasses.replace(self, **changed))
        return out


DEFAULT = RepoOptions()  # what `cvt-export triton` writes when told nothing


def default_candidate(precision: str = "fp32") -> Candidate:
    return Candidate(precision, "ort", DEFAULT.instances, DEFAULT.max_batch, DEFAULT.queue_delay_us,
                     DEFAULT.preferred_batch)


@dataclass
class Settings:
    slo: Slo
    budgets: list[metrics.Budget]
    requests: int = 300            # per load run in the search (p99 of fewer is nearly the maximum)
    confirm_requests: int = 400
    max_candidates: int = 12
    fidelity_images: int = 20      # per role
    seed: int = 0

    def check(self) -> None:
        if not self.budgets:
            raise DeployError("--budget: give at least one fidelity bound, e.g. \"cosine>=0.999\"")
        if (not 1 <= self.max_candidates <= 200 or not 20 <= self.requests <= REQUESTS_MAX
                or not 20 <= self.confirm_requests <= REQUESTS_MAX):
            raise DeployError(f"--max-candidates 1..200, --requests and --confirm-requests "
                              f"20..{REQUESTS_MAX}")
        if not 1 <= self.fidelity_images <= 100:
            raise DeployError(f"--fidelity-images {self.fidelity_images}: use 1..100")


def model_choices(folder: ArtifactFolder) -> list[Candidate]:
    """(precision, runner) pairs this folder offers and this machine runs, at the default scheduling."""
    from cvt_export.backends import get_backend

    out = []
    for backend in ("ort", "openvino"):
        runner = get_backend(backend)
        if not runner.available()[0]:
            continue
        for precision in runner.precisions:
            if precisions.reads(precision) in precisions.FILES and folder.has(precisions.reads(precision)):
                base = default_candidate(precision)
                out.append(dataclasses.replace(base, backend=backend))
    return out


class Bench:
    """Serves one candidate at a time from a scratch repository and measures it."""

    def __init__(self, folder: ArtifactFolder, settings: Settings, scratch: Path,
                 progress: Callable[[str], None]) -> None:
        from cvt_export import validate
        from cvt_export.harness.bench import load_inputs, roles
        from cvt_export.reference import reference_model

        self.folder, self.settings, self.scratch, self.progress = folder, settings, scratch, progress
        inputs = load_inputs(None, None, folder.variant)
        role = roles(inputs, folder)
        self.rows: dict[str, list[int]] = {}
        for name in ("selection", "confirmation"):
            rows = role.rows(name)
            idx = np.linspace(0, len(rows) - 1, min(settings.fidelity_images, len(rows))).round().astype(int)
            self.rows[name] = [rows[i] for i in sorted(set(idx.tolist()))]
        wanted = sorted({*self.rows["selection"], *self.rows["confirmation"]})
        self.images = inputs.images
        self.names = inputs.names
        reference = validate.reference_logits(reference_model(folder), inputs.images[wanted])
        self.reference = dict(zip(wanted, reference, strict=True))
        self.count = 0

    def fidelity(self, target: served.Target, role: str) -> Fidelity:
        rows = self.rows[role]
        ref = np.stack([self.reference[i] for i in rows])
        return served.fidelity(target, self.images[rows], ref, [self.names[i] for i in rows])

    def load(self, target: served.Target, role: str, rate: float, requests: int,
             seed: int | None = None) -> OpenLoopRun:
        """An open-loop run at `rate` on the role's images, judged against the SLO's bound
        (arrivals from `seed`, by default the search's)."""
        run = served.run_load(target, self.images[self.rows[role]], served.Load("rate", rate), requests,
                              seed=self.settings.seed if seed is None else seed)
        return _load_figures(run, dataclasses.replace(self.settings.slo, rate=rate))

    def serve(self, cand: Candidate, repo: Path) -> Any:
        from cvt_export.triton.server import Server

        if repo.exists():
            shutil.rmtree(repo)
        write_repository(self.folder, repo, cand.options("cvt"))
        return Server(repo)

    def measure(self, cand: Candidate) -> Measured:
        """One search candidate: served answers on the selection images first; only when they
        meet the budget, an open-loop run at the SLO rate."""
        self.count += 1
        self.progress(f"candidate {self.count} of at most {self.settings.max_candidates}: {cand.label()}")
        record = Measured(candidate=cand.configuration(), label=cand.label())
        try:
            with self.serve(cand, self.scratch / "repo") as server:
                target = served.Target(server.http_url, "cvt")
                fid = self.fidelity(target, "selection")
                record = dataclasses.replace(record, fidelity=_fid(fid),
                                             within_budget=metrics.within(self.settings.budgets, fid))
                if not record.within_budget:
                    return record
                run = self.load(target, "selection", self.settings.slo.rate, self.settings.requests)
                return Measured(**_figures(run), candidate=record.candidate, label=record.label,
                                fidelity=record.fidelity, within_budget=True)
        except CvtError as e:  # this candidate cannot be written or served here (its cause is kept)
            return dataclasses.replace(record, error=str(e))


def _figures(run: OpenLoopRun) -> dict[str, Any]:
    """An open-loop run's figures, for a record that holds them (a candidate, a round, a step)."""
    return {f.name: getattr(run, f.name) for f in dataclasses.fields(OpenLoopRun)}


def _fid(fid: Fidelity) -> ServedFidelity:
    """The figures a deploy record keeps of the served answers."""
    return ServedFidelity(cosine_min=fid.cosine_min, cosine_mean=fid.cosine_mean, max_abs=fid.max_abs,
                          n=fid.n, top1_agreement=fid.top1_agreement)


def _load_figures(run: LoadRun, slo: Slo) -> OpenLoopRun:
    lat = run.latency_ms
    value = float(getattr(lat, SLO_FIGURE[slo.percentile])) if lat else float("inf")
    achieved = run.answered_per_s if run.answered_per_s is not None else 0.0
    offered = run.offered_per_s if run.offered_per_s is not None else slo.rate
    answered = run.answered_of_sent[0]
    return OpenLoopRun(percentile_ms=value, p99_ms=lat.p99_ms if lat else float("inf"), answered=answered,
                       failed=run.failed, achieved_rate=achieved, offered_rate=offered,
                       spread_ms=run.spread_ms, stable=run.stable,
                       meets=bool(run.failed == 0 and value <= slo.limit_ms
                                  and kept_up(answered, achieved, offered, slo.limit_ms)))


def kept_up(answered: int, achieved: float, offered: float, limit_ms: float) -> bool:
    """The server kept up with the arrivals: its answers left at >= SUSTAINED of the rate requests
    arrived at (each rate over its own span), or, where a run is too short for that ratio to
    tell (13 requests at 3/s span 4 s; a 1 s latency on the last answer alone moves it by 20%),
    the answers' span exceeded the arrivals' by no more than the latency bound."""
    if answered < 2 or achieved <= 0 or offered <= 0:
        return False
    span_in, span_out = (answered - 1) / offered, (answered - 1) / achieved
    return achieved >= SUSTAINED * offered or span_out <= span_in + limit_ms / 1000


def _score(record: OpenLoopRun, within_budget: bool = True) -> float:
    """The SLO's percentile of a run (infinite when it was not measured or is outside the budget)."""
    if not within_budget or record.percentile_ms is None:
        return float("inf")
    return record.percentile_ms


def _cosine(fid: ServedFidelity | None) -> float:
    return fid.cosine_min if fid is not None and fid.cosine_min is not None else 0.0


def search(bench: Bench) -> list[Measured]:
    """Steps 1 and 2 of the module's search; returns every measured candidate's record."""
    records: dict[Candidate, Measured] = {}

    def measure(cand: Candidate) -> Measured:
        if cand not in records:
            records[cand] = bench.measure(cand)
        return records[cand]

    def score(cand: Candidate) -> float:
        return _score(records[cand], records[cand].within_budget)

    limit = bench.settings.max_candidates
    for cand in model_choices(bench.folder):
        if len(records) >= limit:
            break
        measure(cand)
    passing = [c for c in records if np.isfinite(score(c))]
    if not passing:
        return list(records.values())
    best = min(passing, key=lambda c: (score(c), -_cosine(records[c].fidelity)))
    while len(records) < limit:
        step = None
        for n in best.neighbours():
            if len(records) >= limit:
                break
            measure(n)
            if score(n) < score(best) * (1 - IMPROVES) and (step is None or score(n) < score(step)):
                step = n
        if step is None:
            break
        best = step
    return list(records.values())


def choose(records: list[Measured]) -> Measured | None:
    met = [r for r in records if r.meets]
    if not met:
        return None
    low = min(_score(r) for r in met)
    tied = [r for r in met if _score(r) <= low * (1 + IMPROVES)]
    return max(tied, key=lambda r: (_cosine(r.fidelity), -_score(r)))


class _Ladder:
    """One configuration's sustained-rate ladder (factor LADDER) through the SLO rate: up from the
    SLO rate while the bound holds, else down until it holds; `next()` is the rate to measure."""

    def __init__(self, start: float, steps_at_most: int = LADDER_STEPS) -> None:
        self.rate, self.best, self.limit = start, 0.0, steps_at_most
        self.up: bool | None = None  # the direction, known after the first step
        self.done = False
        self.steps: list[SustainedStep] = []

    def next(self) -> float | None:
        if self.done or len(self.steps) >= self.limit:
            return None
        if self.up is None:
            return self.rate
        return self.rate * LADDER if self.up else self.rate / LADDER

    def record(self, rate: float, figures: OpenLoopRun) -> None:
        meets = bool(figures.meets)
        self.steps.append(SustainedStep(
            rate=rate, percentile_ms=_score(figures), p99_ms=figures.p99_ms,
            achieved_rate=figures.achieved_rate, failed=figures.failed, met_rounds=figures.met_rounds,
            round_percentiles_ms=figures.round_percentiles_ms, meets=meets))
        if self.up is None:
            self.up = meets
        else:
            self.rate = rate
            self.done = not meets if self.up else meets
        if meets:
            self.best = max(self.best, rate)

    def result(self, configuration: str) -> Sustained:
        return Sustained(configuration, self.best, tuple(sorted(self.steps, key=lambda st: st.rate)), LADDER)


def rounds(bench: Bench, targets: dict[str, served.Target], rates: dict[str, float], total: int,
           what: str) -> dict[str, list[ConfirmRound]]:
    """ROUNDS open-loop runs of each configuration in `rates` at its rate, `total` requests per
    configuration in all, interleaved: the order swaps each round, and round r uses the same
    arrivals (seed + 1 + r) for all, so no configuration is measured on luckier traffic."""
    settings = bench.settings
    sizes = [len(part) for part in np.array_split(np.arange(total), ROUNDS)]
    labels = list(rates)
    out: dict[str, list[ConfirmRound]] = {label: [] for label in labels}
    for r, n in enumerate(sizes):
        for label in labels if r % 2 == 0 else labels[::-1]:
            bench.progress(f"{what} round {r + 1} of {ROUNDS}: {label} at {rates[label]:g}/s")
            figures = bench.load(targets[label], "confirmation", rates[label], n, seed=settings.seed + 1 + r)
            out[label].append(ConfirmRound(**_figures(figures), round=r + 1, requests=n))
    return out


def sustained_rates(bench: Bench, targets: dict[str, served.Target], slo: Slo, requests: int,
                    confirmed: dict[str, ConfirmedConfiguration] | None = None,
                    steps_at_most: int = LADDER_STEPS) -> dict[str, Sustained]:
    """Each configuration's highest rate on its ladder at which the served model holds the bound
    the way the confirmation judges it: every one of ROUNDS interleaved runs (`requests` in all)
    answers at least SUSTAINED of what is offered with the SLO percentile within its bound. Its
    step at the SLO rate is the confirmation itself (`confirmed`), so the two never disagree; the
    other steps are measured for every configuration still climbing, together. Each is named by
    its confirmation's configuration (else by its label)."""
    ladders = {label: _Ladder(slo.rate, steps_at_most) for label in targets}
    for label, record in (confirmed or {}).items():
        ladders[label].record(slo.rate, record)
    while True:
        active = {label: rate for label, lad in ladders.items() if (rate := lad.next()) is not None}
        if not active:
            break
        for label, runs in rounds(bench, targets, active, requests, "sustained-rate ladder").items():
            ladders[label].record(active[label], _summary(runs))
    names = {label: record.configuration for label, record in (confirmed or {}).items()}
    return {label: lad.result(names.get(label, label)) for label, lad in ladders.items()}


def _summary(rounds: list[ConfirmRound]) -> OpenLoopRun:
    """A configuration's rounds in one line: medians of the rounds, failures summed, met only
    when every round met."""
    return OpenLoopRun(percentile_ms=float(np.median([_score(r) for r in rounds])),
                       p99_ms=float(np.median([_figure(r.p99_ms) for r in rounds])),
                       achieved_rate=float(np.median([_figure(r.achieved_rate) for r in rounds])),
                       failed=int(sum(r.failed or 0 for r in rounds)),
                       met_rounds=sum(bool(r.meets) for r in rounds),
                       round_percentiles_ms=tuple(_score(r) for r in rounds),
                       meets=all(r.meets for r in rounds))


def _figure(value: float | None) -> float:
    return float("inf") if value is None else value


def confirm(bench: Bench, targets: dict[str, served.Target],
            configurations: dict[str, str] | None = None) -> dict[str, ConfirmedConfiguration]:
    """Step 4: every configuration's answers on the confirmation images, then ROUNDS open-loop
    runs at the SLO rate, interleaved (`rounds`), `confirm_requests` per configuration in all.
    `configurations`: each label's configuration in words (else the label)."""
    settings = bench.settings
    fids = {label: bench.fidelity(target, "confirmation") for label, target in targets.items()}
    runs = rounds(bench, targets, dict.fromkeys(targets, settings.slo.rate), settings.confirm_requests,
                  "confirmation")
    out = {}
    for label, fid in fids.items():
        summary, within = _summary(runs[label]), metrics.within(settings.budgets, fid)
        out[label] = ConfirmedConfiguration(
            **{**_figures(summary), "met_rounds": summary.met_rounds or 0},
            configuration=(configurations or {}).get(label, label), fidelity=_fid(fid), within_budget=within,
            rounds=tuple(runs[label]), held=bool(summary.meets and within))
    return out


def decide(confirmed: dict[str, ConfirmedConfiguration]) -> tuple[str, str]:
    """Which configuration is written, and why (step 4 of the module's search)."""
    chosen = confirmed["chosen"]
    default = confirmed.get("default")
    if default is None:
        return "chosen", "the search chose the default configuration"
    c, d = _score(chosen), _score(default)
    rounds = (f"the default held the SLO in {default.met_rounds} of {ROUNDS} rounds (median {d:.1f} ms), "
              f"the chosen one in {chosen.met_rounds} of {ROUNDS} (median {c:.1f} ms)")
    if chosen.held and not (default.held and d <= c):
        return "chosen", rounds
    if default.held:
        return "default", (f"{rounds}: the default holds it and is no slower, so the search's difference did "
                           "not hold; the default configuration is written")
    return "chosen", f"{rounds}: neither held it in every round"


def deploy(folder: ArtifactFolder | Path, out: Path, name: str, settings: Settings,
           progress: Callable[[str], None] = lambda s: None) -> DeployRecord:
    """Search, choose, write `out/name`, confirm; returns the record written as
    `out/NAME.deploy.json` (and .md, .svg), read back from the file's JSON."""
    folder = artifacts.as_folder(folder)
    settings.check()
    opts = RepoOptions(name=name)
    opts.check()
    check_destination(folder, out, opts)  # refused now, not after the search
    check_record_files(out, name)
    with artifacts.writer(out, "--out"):  # the repository's one writer from the search to the record
        check_destination(folder, out, opts)  # again, now that no other writer can change them
        check_record_files(out, name)
        return _deploy(folder, out, name, settings, progress)


SEARCH_HOW = ("models at the default scheduling, then a hill climb over instances, max batch and queue delay "
              "(one notch per knob, > 5% better to move)")


def _deploy(folder: ArtifactFolder, out: Path, name: str, settings: Settings,
            progress: Callable[[str], None]) -> DeployRecord:
    from cvt_export import machine
    from cvt_export.triton.server import Server

    started = time.time()
    # The candidates' repositories live in a staging folder of the output, under its lock: one that
    # a killed deploy left (its servers die with it) is removed by the next write to this repository.
    with artifacts.staging(out) as scratch:
        bench = Bench(folder, settings, scratch, progress)
        measured = search(bench)
        chosen = choose(measured)
        record = DeployRecord(
            machine=machine.describe(), slo=str(settings.slo), budget=tuple(str(b) for b in settings.budgets),
            artifacts=str(folder.path),
            search=DeploySearch(SEARCH_HOW, tuple(measured), len(bench.rows["selection"]), settings.requests),
            chosen=chosen)
        if chosen is None:
            return _write_record(out, name, record)
        cand = Candidate(**dataclasses.asdict(chosen.candidate))
        default = default_candidate()
        configs = {"chosen": cand} if cand == default else {"default": default, "chosen": cand}
        progress("confirming the chosen configuration against the default, interleaved")
        with contextlib.ExitStack() as stack:
            servers = {label: stack.enter_context(bench.serve(c, scratch / label))
                       for label, c in configs.items()}
            targets = {label: served.Target(server.http_url, "cvt") for label, server in servers.items()}
            confirmed = confirm(bench, targets, {label: c.label() for label, c in configs.items()})
            progress("highest sustained rate: default and chosen, interleaved")
            ladders = sustained_rates(bench, targets, settings.slo, settings.confirm_requests, confirmed)
    written, why = decide(confirmed)
    final = configs[written]
    progress(f"writing {out / name}")
    write_repository(folder, out, final.options(name), held=True)
    with Server(out) as server:  # the repository as written answers as it did
        again = bench.fidelity(served.Target(server.http_url, name), "confirmation")
    it = confirmed[written]
    confirmation = Confirmation(
        fidelity=it.fidelity, within_budget=it.within_budget, percentile_ms=it.percentile_ms,
        p99_ms=it.p99_ms, achieved_rate=it.achieved_rate, failed=it.failed, met_rounds=it.met_rounds,
        meets=it.meets, written=written, written_configuration=final.label(),
        written_candidate=final.configuration(), why=why,
        images=len(bench.rows["confirmation"]), requests=settings.confirm_requests, rounds=ROUNDS,
        written_repository_fidelity=_fid(again), configurations=confirmed,
        held=bool(it.held and metrics.within(settings.budgets, again)))
    sustained = dict(ladders)
    if "default" not in sustained:  # the chosen one is the default
        sustained["default"] = sustained["chosen"]
    done = dataclasses.replace(record, confirmation=confirmation, sustained=sustained,
                               seconds=time.time() - started)
    return _write_record(out, name, done)


RECORD_SUFFIXES = (".deploy.json", ".deploy.md", ".deploy.svg")


def check_record_files(out: Path, name: str) -> None:
    """NAME.deploy.json, .md and .svg are replaced only when an earlier deploy wrote them (its
    JSON record says so); any other file of those names is the user's, and deploy stops before the
    search."""
    record = out / f"{name}.deploy.json"
    ours = False
    if record.is_file() and not record.is_symlink():
        try:
            ours = json.loads(record.read_text()).get("schema") == "cvt-deploy/1"
        except (OSError, ValueError, AttributeError):
            ours = False
    for suffix in RECORD_SUFFIXES:
        path = out / f"{name}{suffix}"
        if (path.exists() or path.is_symlink()) and (not ours or path.is_symlink() or not path.is_file()):
            raise DeployError(f"--out {out}: {path.name} exists and was not written by `cvt-export deploy`; "
                              "choose another --name or --out (nothing was changed)")


def _write_record(out: Path, name: str, record: DeployRecord) -> DeployRecord:
    """The record's file, then its Markdown and plot rendered from the file's own JSON."""
    text = json.dumps(record.to_json(), indent=2) + "\n"
    artifacts.atomic_write(out / f"{name}.deploy.json", text)
    record = DeployRecord.from_json(json.loads(text), str(out / f"{name}.deploy.json"))
    slo = Slo.parse(record.slo)
    artifacts.atomic_write(out / f"{name}.deploy.md", "\n".join(render.markdown(record, slo)) + "\n")
    artifacts.atomic_write(out / f"{name}.deploy.svg", render.pareto_svg(record, slo))
    return record
