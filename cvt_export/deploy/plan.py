"""What `cvt-export deploy` searches over and for: the SLO, the budget and search settings, and
a served configuration (a candidate: runner, precision, instances, max batch, queue delay) with
its neighbours on the search's grid."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

from cvt_export import metrics, precisions
from cvt_export.artifacts import ArtifactFolder
from cvt_export.records import ServedConfiguration
from cvt_export.triton import TritonError
from cvt_export.triton.repository import RepoOptions

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
