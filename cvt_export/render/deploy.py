"""`cvt-export deploy`'s record as Markdown (NAME.deploy.md, and the console) and as a Pareto
plot in SVG (NAME.deploy.svg): sustained rate against p99 for every measured candidate."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cvt_export.records import Confirmation, DeployRecord, ServedFidelity

if TYPE_CHECKING:
    from cvt_export.deploy import Slo


def markdown(result: DeployRecord, slo: Slo) -> list[str]:
    m, search = result.machine, result.search
    lines = [f"# Deploy search: {result.slo}, budget {', '.join(result.budget)}", "",
             f"Machine: {m.cpu}, {m.cores} cores, ISA {', '.join(m.isa)}. Artifacts: "
             f"{result.artifacts}. Search: {search.how}; served answers checked on "
             f"{search.selection_images} selection images before any speed counts; "
             f"{search.requests_per_candidate} open-loop requests per candidate.", "",
             "| # | configuration | worst cosine | within budget | percentile ms | p99 ms | achieved/s | "
             "met SLO |", "|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(search.candidates, 1):
        cos = r.fidelity.cosine_min
        lines.append(f"| {k} | {r.label} | {f'{cos:.5f}' if cos is not None else '–'} | "
                     f"{'yes' if r.within_budget else 'no'} | "
                     + (f"{r.percentile_ms:.1f} | {r.p99_ms:.1f} | {r.achieved_rate:.1f} | "
                        f"{'yes' if r.meets else 'no'} |" if r.meets is not None else
                        f"not measured{': ' + r.error if r.error is not None else ''} | | | |"))
    chosen = result.chosen
    lines.append("")
    if chosen is None:
        lines.append("**No candidate met the SLO within the budget.**")
        return lines
    lines += [f"**Chosen by the search**: {chosen.label}.", ""]
    conf = result.confirmation
    assert conf is not None, "a chosen configuration is confirmed"
    if conf.configurations is None:  # records of the first version: one configuration
        return lines + _single_confirmation(conf) + _sustained(result)
    return lines + _confirmation(result, conf, slo) + _sustained(result)


def _confirmation(result: DeployRecord, conf: Confirmation, slo: Slo) -> list[str]:
    pct = f"p{slo.percentile}"
    lines = [f"Confirmation (separate from the search, interleaved with the default configuration: "
             f"{conf.rounds} rounds at {result.slo.split('@rate=')[1]}/s, {conf.requests} requests "
             f"per configuration on arrivals the search never saw, {conf.images} confirmation "
             "images):", "",
             f"| configuration | worst cosine | within budget | {pct} ms per round | median {pct} ms | "
             "median achieved/s | met in rounds |", "|---|---|---|---|---|---|---|"]
    for label, c in (conf.configurations or {}).items():
        per_round = ", ".join(f"{r.percentile_ms:.0f}" + ("" if r.meets else " ✗") for r in c.rounds)
        lines.append(f"| {label}: {c.configuration} | {c.fidelity.cosine_min:.5f} | "
                     f"{'yes' if c.within_budget else 'no'} | {per_round} | {c.percentile_ms:.1f} | "
                     f"{c.achieved_rate:.2f} | {c.met_rounds} of {conf.rounds} |")
    written = conf.written_repository_fidelity or ServedFidelity()
    return [*lines, "", f"**Written**: {conf.written_configuration} ({conf.why}); served again from "
                    f"the repository as written: worst cosine "
                    f"{written.cosine_min:.5f}: "
                    + ("**the SLO held**." if conf.held else "**the SLO did not hold**.")]


def _single_confirmation(c: Confirmation) -> list[str]:
    """The first version's confirmation: the chosen configuration alone, one run."""
    fid = c.fidelity or ServedFidelity()
    return [f"Confirmation (separate from the search): {c.requests} requests at "
            f"{c.offered_rate:.2f}/s on {c.images} confirmation images: percentile "
            f"{c.percentile_ms:.1f} ms, p99 {c.p99_ms:.1f} ms, {c.achieved_rate:.2f} answered/s, "
            f"worst cosine {fid.cosine_min:.5f}: "
            + ("**the SLO held**." if c.held else "**the SLO did not hold**.")]


def _sustained(result: DeployRecord) -> list[str]:
    lines = ["", "| configuration | highest sustained rate under the bound (req/s) | ladder (interleaved) |",
             "|---|---|---|"]
    for label in ("default", "chosen"):
        s = (result.sustained or {})[label]
        ladder = ", ".join(f"{st.rate:g}: {st.percentile_ms:.0f} ms" + ("" if st.meets else " ✗")
                           for st in s.steps)
        lines.append(f"| {label}: {s.configuration} | {s.highest_rate:g} | {ladder} |")
    return lines


def pareto_svg(result: DeployRecord, slo: Slo) -> str:
    """Sustained rate (x) vs p99 (y) of every measured candidate; the Pareto front joined."""
    picked = result.chosen.label if result.chosen is not None else None
    pts = [(float(r.achieved_rate or 0.0), float(r.p99_ms), r.label, r.label == picked)
           for r in result.search.candidates
           if r.meets is not None and r.p99_ms is not None and np.isfinite(r.p99_ms)]
    w, h, pad = 640, 400, 60
    if not pts:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"><text x="20" y="40">'
                "no candidate was measured</text></svg>\n")
    xmax = max(p[0] for p in pts) * 1.1 or 1.0
    ymax = max(p[1] for p in pts) * 1.1 or 1.0

    def xy(x: float, y: float) -> tuple[float, float]:
        return pad + (w - 2 * pad) * x / xmax, h - pad - (h - 2 * pad) * y / ymax

    front = sorted((p for p in pts if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in pts)),
                   key=lambda p: p[0])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             'font-size="11">',
             f'<text x="{pad}" y="20" font-size="13">{_esc(result.slo)}: sustained rate vs p99, '
             'every measured candidate</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">answered requests/s '
             f'(max {xmax:.1f})</text>',
             f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">p99 ms '
             f'(max {ymax:.0f})</text>']
    if slo.percentile == 99 and slo.limit_ms < ymax:
        _, y = xy(0, slo.limit_ms)
        parts.append(f'<line x1="{pad}" y1="{y:.1f}" x2="{w - pad}" y2="{y:.1f}" stroke="red" '
                     'stroke-dasharray="4"/>')
    if len(front) > 1:
        parts.append('<polyline fill="none" stroke="steelblue" points="'
                     + " ".join("{:.1f},{:.1f}".format(*xy(p[0], p[1])) for p in front) + '"/>')
    for x, y, label, chosen in pts:
        cx, cy = xy(x, y)
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{6 if chosen else 4}" '
                     f'fill="{"red" if chosen else "steelblue"}"><title>{_esc(label)}</title></circle>')
    parts.append("</svg>\n")
    return "\n".join(parts)


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
