"""Fidelity of a backend's logits against the reference's, accuracy, and the bounds that say
what "matches the reference" means: pure numpy, float64, near a leaf (export, the harness
and the regression gate all import it; it imports the precision table and the records its
figures are, nothing else of the project).

float64 on purpose: a float32 dot product of two 1000-long logit rows can be off by 1e-4,
which is the size of the effects these metrics exist to see.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import TypeVar

import numpy as np

from cvt_export import precisions
from cvt_export.records import Accuracy, ClassLoss, DriftPoint, Fidelity, HeldFidelity, LatencyStats, Paired

T = TypeVar("T")

# Each precision's pass/fail bounds against PyTorch FP32 on the same images: its row's own
# (precisions.TABLE); this is the view by name that export, cvt-bench and the gate read.
BOUNDS: Mapping[str, Mapping[str, float]] = {name: row.bounds for name, row in precisions.TABLE.items()}
UPPER = frozenset({"max_abs"})  # bounds that are maxima; every other bound is a minimum


def figure(fid: object, name: str) -> float | None:
    """A fidelity record's figure by its field name (None where the record has no such figure):
    bounds and budgets name the figures they hold, and every fidelity record names them alike."""
    value = getattr(fid, name, None)
    return None if value is None else float(value)


def within_bounds(precision: str, fid: object) -> list[str]:
    """The bounds a fidelity record breaks, each as "metric value op bound" (empty: it passes).
    A figure that is not finite, or that the record does not have, breaks its bound."""
    broken = []
    for key, bound in BOUNDS[precision].items():
        got = figure(fid, key)
        value = float("nan") if got is None else got
        upper = key in UPPER
        ok = np.isfinite(value) and (value <= bound if upper else value >= bound)
        if not ok:
            broken.append(f"{key} {value:.6g} {'>' if upper else '<'} {bound:g}")
    return broken


def judged(precision: str, fid: Fidelity) -> Fidelity:
    """A fidelity record with the precision's bounds, whether it is within them and what it breaks."""
    broken = within_bounds(precision, fid)
    return replace(fid, bounds=dict(BOUNDS[precision]), passed=not broken, broken=tuple(broken))


# --- budgets: the user's own bounds (cvt-export tune, cvt-bench --budget) -----------------------

BUDGET_METRICS = {"cosine": "cosine_min", "top1-agreement": "top1_agreement", "top1-drop": "top1_drop"}
# What a budget can be met within: a cosine or a share above 1, or a negative accuracy drop
# (asking the quantized model to beat the reference) can never hold; >= -1 is always true.
BUDGET_RANGES = {"cosine": (-1.0, 1.0), "top1-agreement": (0.0, 1.0), "top1-drop": (0.0, 100.0)}


@dataclass(frozen=True)
class Budget:
    """One bound on held-out fidelity: cosine (worst image), top1-agreement (share), or
    top1-drop (accuracy points lost against PyTorch FP32; needs a labelled --dataset)."""

    metric: str
    op: str
    value: float

    def holds(self, fid: object, margin: float = 0.0) -> bool:
        """Whether a fidelity record's figure meets the bound, with `margin` (a share of what the
        bound allows to be lost: 0.2 asks cosine>=0.9995 for 0.9996) of headroom. A record
        without the figure (top1_drop with no labels) does not meet it."""
        got = figure(fid, BUDGET_METRICS[self.metric])
        if got is None or not np.isfinite(got):
            return False
        return got >= self.tightened(margin) if self.op == ">=" else got <= self.tightened(margin)

    def tightened(self, margin: float) -> float:
        """The bound with `margin` of what it allows to be lost taken away."""
        if self.op == ">=":
            return self.value + margin * (1.0 - self.value)
        return self.value * (1.0 - margin)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_budget(text: str) -> Budget:
    """Parse "cosine>=0.999"; a ValueError says how to write one."""
    m = re.fullmatch(r"\s*([a-z0-9-]+)\s*(>=|<=)\s*([0-9.eE+-]+)\s*", text)
    if not m or m.group(1) not in BUDGET_METRICS:
        raise ValueError(f"--budget {text!r}: write METRIC>=X or METRIC<=X with METRIC one of "
                        f"{', '.join(BUDGET_METRICS)} (e.g. \"cosine>=0.999\", \"top1-drop<=0.5\")")
    metric, op, value = m.group(1), m.group(2), float(m.group(3))
    if (metric == "top1-drop") != (op == "<="):
        raise ValueError(f"--budget {text!r}: {metric} takes {'<=' if metric == 'top1-drop' else '>='}")
    low, high = BUDGET_RANGES[metric]
    if not (np.isfinite(value) and low <= value <= high):
        raise ValueError(f"--budget {text!r}: {metric} can only be met between {low:g} and {high:g}; "
                         f"{value:g} is impossible (e.g. \"cosine>=0.999\", \"top1-drop<=0.5\")")
    return Budget(metric, op, value)


def within(budgets: Sequence[Budget], fid: object, margin: float = 0.0) -> bool:
    return all(b.holds(fid, margin) for b in budgets)


# --- uncertainty -----------------------------------------------------------------------------

Z95 = 1.959963984540054  # two-sided 95%


def wilson(successes: float, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval of a proportion (95%): sensible at 0/n and n/n, unlike the normal one."""
    if n <= 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def unbeaten(items: Sequence[T], interval: Callable[[T], Sequence[float]]) -> list[T]:
    """The items no other item is faster than beyond the noise: none's interval of the median
    ends before theirs begins. The tie for fastest, wherever one is decided (the recommendation,
    tune): "overlaps the fastest one's interval" is not it, since overlap is not transitive (a row
    can overlap a wide interval and still be slower than a third row beyond the noise). The
    lowest median is always among them."""
    return [x for x in items if not any(interval(o)[1] < interval(x)[0] for o in items if o is not x)]


def median_interval(samples: Sequence[float] | np.ndarray, z: float = Z95) -> list[float]:
    """Distribution-free 95% interval of the median: the order statistics whose ranks bracket
    n/2 by z*sqrt(n)/2 (binomial), [min, max] when n is too small for that."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(x)
    half = z * np.sqrt(n) / 2
    lo, hi = int(np.floor(n / 2 - half)), int(np.ceil(n / 2 + half))
    return [float(x[max(lo, 0)]), float(x[min(hi, n - 1)])]


def modes(samples: Sequence[float] | np.ndarray, gap: float = 0.2, share: float = 0.15) -> list[float] | None:
    """The two modes' medians when the samples split at one gap wider than `gap` x the median
    into two groups of at least `share` of them each (a bimodal latency), else None."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(x)
    if n < 6:
        return None
    steps = np.diff(x)
    lo, hi = int(np.ceil(share * n)) - 1, n - int(np.ceil(share * n)) - 1
    if hi < lo:
        return None
    i = lo + int(np.argmax(steps[lo:hi + 1]))
    if steps[i] <= gap * float(np.median(x)):
        return None
    return [float(np.median(x[:i + 1])), float(np.median(x[i + 1:]))]



def _rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def cosine(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity."""
    a, b = _rows(ref), _rows(got)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, np.finfo(np.float64).tiny)


def max_abs(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(_rows(ref) - _rows(got)).max())


def mean_abs(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(_rows(ref) - _rows(got)).mean())


def topk(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first (ties: lower index first)."""
    x = _rows(logits)
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    return float((topk(ref, 1) == topk(got, 1)).mean())


def top5_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Share of rows whose top-5 sets are equal (order ignored)."""
    a, b = np.sort(topk(ref, 5), axis=1), np.sort(topk(got, 5), axis=1)
    return float((a == b).all(axis=1).mean())


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = _rows(x)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def kl_divergence(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-row KL(softmax(ref) || softmax(got)) in nats."""
    lp, lq = log_softmax(ref), log_softmax(got)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def fidelity(ref: np.ndarray, got: np.ndarray) -> HeldFidelity:
    """The summary the export records per artifact: worst-row cosine, max-abs, top-1 agreement;
    with n, the 5th-percentile cosine and a 95% (Wilson) interval of the agreement."""
    cos = cosine(ref, got)
    agree = top1_agreement(ref, got)
    return HeldFidelity(cosine_min=float(cos.min()), max_abs=max_abs(ref, got), top1_agreement=agree,
                        n=len(cos), cosine_p5=float(np.percentile(cos, 5)),
                        top1_agreement_ci=tuple(wilson(agree * len(cos), len(cos))))


def full_fidelity(ref: np.ndarray, got: np.ndarray, names: Sequence[str]) -> Fidelity:
    """Everything the harness reports, with the worst image named (lowest cosine); not yet judged
    against any bounds (the harness adds them)."""
    cos = cosine(ref, got)
    kl = kl_divergence(ref, got)
    worst = int(np.argmin(cos))
    agree = top1_agreement(ref, got)
    return Fidelity(
        max_abs=max_abs(ref, got), mean_abs=mean_abs(ref, got),
        cosine_min=float(cos.min()), cosine_mean=float(cos.mean()),
        top1_agreement=agree, top5_agreement=top5_agreement(ref, got),
        kl_mean=float(kl.mean()), kl_max=float(kl.max()),
        worst_image=names[worst], worst_cosine=float(cos[worst]),
        n=len(cos), cosine_p5=float(np.percentile(cos, 5)),
        top1_agreement_ci=tuple(wilson(agree * len(cos), len(cos))))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> Accuracy:
    """Top-1 and top-5 accuracy against integer labels, with n and a 95% (Wilson) interval of top-1."""
    top5 = topk(logits, 5)
    labels = np.asarray(labels).reshape(-1, 1)
    top1 = float((top5[:, :1] == labels).any(axis=1).mean())
    return Accuracy(top1=top1, top5=float((top5 == labels).any(axis=1).mean()), n=len(labels),
                    top1_ci=tuple(wilson(top1 * len(labels), len(labels))))


def drift(point: str, ref: np.ndarray, got: np.ndarray) -> DriftPoint:
    """How far an intermediate tensor at `point` is from the reference's: worst-image cosine, and
    its `error` = 1 - cosine, the quantity whose growth along the network locates a fault."""
    cos = float(cosine(ref, got).min())
    scale = float(np.abs(_rows(ref)).max()) or 1.0
    return DriftPoint(point=point, cosine_min=cos, error=max(0.0, 1.0 - cos),
                      rel_max_abs=max_abs(ref, got) / scale)


DRIFT_FLOOR = 1e-6  # 1 - cosine below this is float rounding, not a loss to locate


def largest_growth(points: Sequence[str], errors: Sequence[float]) -> str | None:
    """The point where the error grows most from the point before (the first point: from 0);
    None when no error reaches DRIFT_FLOOR."""
    if not points or max(errors) < DRIFT_FLOOR:
        return None
    steps = np.diff(np.asarray([0.0, *errors], dtype=np.float64))
    return points[int(np.argmax(steps))]


def latency_stats(seconds: Sequence[float], batch: int, rounds: int | None = None) -> LatencyStats:
    """Per-batch wall-clock statistics in milliseconds, and throughput in images/s (`rounds`:
    the interleaved rounds they were timed in, when they were)."""
    t = np.asarray(seconds, dtype=np.float64) * 1000
    if t.size == 0:
        raise ValueError("no timings")
    two = modes(t)
    return LatencyStats(
        iterations=int(t.size), median_ms=float(np.median(t)),
        p90_ms=float(np.percentile(t, 90)), p99_ms=float(np.percentile(t, 99)),
        mean_ms=float(t.mean()), min_ms=float(t.min()),
        stdev_ms=float(t.std(ddof=1)) if t.size > 1 else 0.0,
        images_per_s=float(batch * 1000 / np.median(t)),
        median_ci_ms=tuple(median_interval(t)), modes_ms=None if two is None else tuple(two), rounds=rounds)


# --- paired comparison with the reference, per image -----------------------------------------

def _log_binom_pmf(m: int, p: float) -> np.ndarray:
    """log P(X = k) for k = 0..m, X ~ Binomial(m, p), 0 < p < 1."""
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, m + 1, dtype=np.float64)))])
    k = np.arange(m + 1, dtype=np.float64)
    return log_fact[m] - log_fact[:m + 1] - log_fact[::-1] + k * np.log(p) + (m - k) * np.log1p(-p)


def binom_tails(k: int, m: int, p: float) -> tuple[float, float]:
    """(P(X <= k), P(X >= k)) for X ~ Binomial(m, p)."""
    if p <= 0.0:
        return 1.0, float(k <= 0)
    if p >= 1.0:
        return float(k >= m), 1.0
    pmf = np.exp(_log_binom_pmf(m, p))
    return float(min(1.0, pmf[:k + 1].sum())), float(min(1.0, pmf[k:].sum()))


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact McNemar test: two-sided p of `gained` among the discordant pairs under Binomial(m, 1/2)."""
    m = gained + lost
    if m == 0:
        return 1.0
    below, above = binom_tails(gained, m, 0.5)
    return float(min(1.0, 2.0 * min(below, above)))


def paired_accuracy(ref_correct: np.ndarray, row_correct: np.ndarray, alpha: float = 0.05) -> Paired:
    """A row's accuracy against the reference's on the same images. `lost`: right on the
    reference, wrong here; `gained`: the reverse. The difference (row - reference) gets
    Newcombe's hybrid score interval for paired proportions (his method 10: Wilson intervals of
    both accuracies, combined with the pairs' correlation), whose coverage holds at the small
    discordant counts a good export has; the verdict comes from the exact McNemar test:
    "within noise" when p >= alpha."""
    ref = np.asarray(ref_correct, dtype=bool)
    row = np.asarray(row_correct, dtype=bool)
    n = len(ref)
    lost, gained = int((ref & ~row).sum()), int((~ref & row).sum())
    if n == 0:
        return Paired(n=0, lost=0, gained=0, difference=0.0, difference_ci=(-1.0, 1.0), p_value=1.0,
                      within_noise=True)
    both, neither = int((ref & row).sum()), int((~ref & ~row).sum())
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p1, p2 = (both + gained) / n, (both + lost) / n          # the row's accuracy, the reference's
    l1, u1 = wilson(both + gained, n, z)
    l2, u2 = wilson(both + lost, n, z)
    denominator = (both + gained) * (lost + neither) * (both + lost) * (gained + neither)
    phi = (both * neither - gained * lost) / np.sqrt(denominator) if denominator else 0.0
    below = np.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = np.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = (gained - lost) / n
    p = mcnemar_p(gained, lost)
    return Paired(n=n, lost=lost, gained=gained, difference=diff,
                  difference_ci=(float(diff - below), float(diff + above)), p_value=p,
                  within_noise=p >= alpha)


def class_losses(labels: np.ndarray, ref_correct: np.ndarray, row_correct: np.ndarray,
                 names: Sequence[str] = (), top: int = 10) -> list[ClassLoss]:
    """The classes whose images this row gets wrong most often where the reference got them right
    (net of the reverse), worst first; only classes with a net loss. Each is named by `names`
    (its index where `names` has none for it)."""
    labels = np.asarray(labels)
    out = []
    for cls in map(int, np.unique(labels)):
        rows = labels == cls
        ref_n, row_n = int(ref_correct[rows].sum()), int(row_correct[rows].sum())
        if ref_n > row_n:
            out.append(ClassLoss(label=cls, name=names[cls] if cls < len(names) else str(cls),
                                 images=int(rows.sum()), reference_correct=ref_n, row_correct=row_n,
                                 net_lost=ref_n - row_n))
    out.sort(key=lambda c: (-c.net_lost, -c.images, c.label))
    return out[:top]
