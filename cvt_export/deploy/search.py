"""How `cvt-export deploy` decides: the search over candidates (models at the default
scheduling, then a hill climb), the choice among those that met the SLO, the confirmation
interleaved with the default configuration, the sustained-rate ladders, and which configuration is
written. Why each rule is what it is, with the runs that showed it: docs/triton.md ("SLO search")."""

from __future__ import annotations

import numpy as np

from cvt_export import metrics
from cvt_export.deploy.measure import Bench, _fid, _figures
from cvt_export.deploy.plan import IMPROVES, LADDER, LADDER_STEPS, ROUNDS, Candidate, Slo, model_choices
from cvt_export.harness import served
from cvt_export.records import Candidate as Measured
from cvt_export.records import (
    ConfirmedConfiguration,
    ConfirmRound,
    OpenLoopRun,
    ServedFidelity,
    Sustained,
    SustainedStep,
)


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
