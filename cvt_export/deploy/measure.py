"""How `cvt-export deploy` measures one served configuration: it serves it from a scratch
repository on the real tritonserver, checks its answers on the held-out images against the
PyTorch reference, and runs open-loop load at a rate, judged against the SLO."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cvt_export import metrics
from cvt_export.artifacts import ArtifactFolder
from cvt_export.deploy.plan import SLO_FIGURE, SUSTAINED, Candidate, Settings, Slo
from cvt_export.harness import served
from cvt_export.records import Candidate as Measured
from cvt_export.records import Fidelity, LoadRun, LoadSpec, OpenLoopRun, ServedFidelity
from cvt_export.triton.repository import write_repository
from cvt_ref.errors import CvtError


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
        run = served.run_load(target, self.images[self.rows[role]], LoadSpec("rate", rate), requests,
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
