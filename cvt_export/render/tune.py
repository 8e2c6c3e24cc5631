"""`cvt-export tune`'s decisions (`TuneDecisions`, tune.json) as tune.md: every configuration
measured with its fidelity on both roles of the held-out images and its speed, the blocks'
sensitivity, and the choice."""

from __future__ import annotations

from cvt_export.records import HeldFidelity, TunedConfiguration, TuneDecisions


def _agreement(fid: HeldFidelity) -> str:
    lo, hi = fid.top1_agreement_ci
    return f"{100 * fid.top1_agreement:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def _speed(c: TunedConfiguration) -> str:
    if c.speed is None:
        return "– | –"
    lo, hi = c.speed.interval
    modes = c.speed.modes_ms
    bimodal = f" (bimodal: {modes[0]:.1f} / {modes[1]:.1f})" if modes else ""
    return f"{c.speed.median_ms:.1f} [{lo:.1f}, {hi:.1f}]{bimodal} | {c.speed.images_per_s:.1f}"


def _timing(d: TuneDecisions) -> str:
    rounds = next((c.speed.rounds for c in d.configs if c.speed and c.speed.rounds), None)
    if rounds is None:
        return "latency: none timed (nothing within the budget)."
    return (f"latency: median at the objective's batch with its 95% interval, from {rounds} "
            "interleaved rounds.")


def markdown(d: TuneDecisions) -> str:
    sizes = d.roles
    lines = [f"# cvt-export tune: {d.backend}, {d.objective}", "",
             f"Budget {', '.join(d.budget)}"
             + (f" with margin {d.margin:g}" if d.margin else "")
             + f" on {d.held_out}. A configuration is within the budget only when it holds on "
             f"the selection images (n={sizes['selection'].inputs}, which decide) and on the "
             f"confirmation images (n={sizes['confirmation'].inputs}, which the search never "
             "ranks by). Search: " + d.search + ".", "",
             "Cosine: worst image and 5th percentile; top-1 agreement with its 95% Wilson interval; "
             + _timing(d), "",
             "| configuration | float blocks | selection cosine min / p5 | selection top-1 | "
             "confirmation cosine min / p5 | confirmation top-1 | within budget | median ms [95%] | "
             "images/s |", "|---|---|---|---|---|---|---|---|---|"]
    for c in d.configs:
        sel, conf = c.fidelity, c.confirmation
        lines.append(f"| {c.name}{' **(chosen)**' if c.name == d.chosen else ''} | "
                     f"{', '.join(c.float_blocks) or '–'} | {sel.cosine_min:.6f} / "
                     f"{sel.cosine_p5:.6f} | {_agreement(sel)} | "
                     f"{conf.cosine_min:.6f} / {conf.cosine_p5:.6f} | {_agreement(conf)} | "
                     f"{'yes' if c.within_budget else 'no'} | {_speed(c)} |")
    lines += ["", "Per-block sensitivity (1 − cosine min on the selection images with only that block "
              "in INT8):", "", "| block | error |", "|---|---|"]
    lines += [f"| {u} | {e:.2e} |" for u, e in sorted(d.sensitivity.items(), key=lambda kv: -kv[1])]
    lines += ["", f"**{d.message}**", ""]
    return "\n".join(lines)
