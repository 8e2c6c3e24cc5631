"""The recommendation (recommendation.json) as the Markdown section that report.md ends with,
and that cvt-bench prints."""

from __future__ import annotations

from cvt_export.records import Pick, Recommendation


def _figure(objective: str, pick: Pick) -> str:
    ci = pick.median_ci_ms  # older files: no interval (and, for throughput, no median)
    interval = f" [95% {ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""
    if objective == "latency-b1":
        figure = f"{pick.median_ms:.1f} ms{interval}"
    elif pick.median_ms is None:
        figure = f"{pick.images_per_s:.1f} img/s"
    else:
        figure = f"{pick.images_per_s:.1f} img/s, median {pick.median_ms:.1f} ms{interval}"
    if pick.bimodal_ms:
        figure += f", bimodal {pick.bimodal_ms[0]:.1f} / {pick.bimodal_ms[1]:.1f} ms"
    return figure


def markdown(rec: Recommendation) -> list[str]:
    budget = rec.budget if isinstance(rec.budget, str) else ", ".join(rec.budget)
    lines = ["", "## Recommendation", "", f"Within {budget} on the selection images; figures on the "
             f"confirmation images, which decided nothing ({rec.judged_on}):", ""]
    for objective, pick in rec.objectives.items():
        if pick is None:
            lines.append(f"- {objective}: {rec.unmet.get(objective, 'nothing within the budget')}")
            continue
        conf = pick.confirmation
        stated_fid = (f"confirmation cosine {conf.cosine_min:.6f} (n={conf.images})"
                      if conf and conf.cosine_min is not None else f"cosine {pick.cosine_min:.6f}")
        lines.append(f"- **{objective}**: {pick.backend} {pick.precision} ({_figure(objective, pick)}, "
                     f"{stated_fid})" + (f": {pick.why}" if pick.why else ""))
        if pick.passed_over:
            lines.append("  faster, but outside the budget on the selection images: " + "; ".join(
                f"{r.backend} {r.precision} {r.median_ms:.1f} ms ({r.why})" for r in pick.passed_over))
    return lines


def console(rec: Recommendation) -> list[str]:
    """The same section as plain lines for the console (cvt-bench prints them after its tables)."""
    return [line.replace("**", "").replace("## ", "") for line in markdown(rec)[1:]]
