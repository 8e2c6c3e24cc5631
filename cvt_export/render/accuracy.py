"""The accuracy pass's record (`AccuracyReport`) as people read it: accuracy.md (and the
console) and accuracy.png, top-1 with its interval and the paired change per row."""

from __future__ import annotations

from pathlib import Path

from cvt_export.records import AccuracyReport, RowAccuracy, Throughput


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _ci(ci: tuple[float, ...]) -> str:
    return f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if len(ci) == 2 else ""


def _label(r: RowAccuracy) -> str:
    return f"{r.backend} {r.precision}"


def verdict(r: RowAccuracy) -> str:
    p = r.paired
    if p is None:
        return "–"
    diff = f"{100 * p.difference:+.2f} points {_ci(p.difference_ci)}"
    word = "within noise" if p.within_noise else ("better, beyond noise" if p.difference > 0
                                                  else "WORSE, beyond noise")
    return f"{diff}, McNemar p {p.p_value:.3g}: {word}"


def markdown(rep: AccuracyReport) -> str:
    lines = [*_intro(rep), *_accuracy_table(rep), *_agreement_table(rep), *_classes_table(rep),
             *_time(rep)]
    if rep.throughput is not None:
        lines += ["", *_throughput(rep.throughput)]
    skipped = [r for r in rep.rows if r.status != "ok"]
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{_label(r)} ({r.reason})" for r in skipped) + "."]
    return "\n".join(lines) + "\n"


def _intro(rep: AccuracyReport) -> list[str]:
    d, m = rep.dataset, rep.machine
    lines = [
        f"# cvt-bench accuracy: {rep.variant} ({rep.weights})", "",
        f"{m.cpu}, {m.cores} cores. {d.images} images from {d.source}"
        f" in {d.shards} shards ({d.shards_reused} reused from an earlier run); reference outputs "
        f"from the cache for {d.reference_cached} images; preprocessing {rep.preprocessing}.",
    ]
    if d.unreadable:
        lines.append(f"{d.unreadable} could not be read and are left out of every figure: "
                     + "; ".join(d.unreadable_files[:3]) + (" ..." if d.unreadable > 3 else "") + ".")
    if rep.cluster is not None:
        on = rep.cluster
        lines.append(f"Ran on the Ray cluster at {on.address}: {on.nodes} nodes, {on.lost} lost mid-pass, "
                     f"{on.shards_redone} shards redone on the nodes left.")
    return [*lines, ""]


def _accuracy_table(rep: AccuracyReport) -> list[str]:
    d = rep.dataset
    if not d.labelled:
        return [f"Unlabelled ({d.label_note or 'no class folders'}): agreement with the reference "
                "instead of accuracy.", ""]
    lines = [f"Labelled: {d.classes} classes. Intervals are 95%: Wilson for accuracies; for the "
             "change against the reference, exact and conditional on the images that flipped, "
             "with the exact McNemar test deciding 'within noise'.", "",
             "| row | runs as | n | top-1 [95%] | top-5 [95%] | lost | gained | change vs reference |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (rep.reference, *rep.rows):
        if r.status != "ok":
            continue
        p = r.paired
        lines.append(f"| {_label(r)} | {r.executed} | {r.n} | {_pct(r.top1)} {_ci(r.top1_ci)} | "
                     f"{_pct(r.top5)} {_ci(r.top5_ci)} | {p.lost if p else '–'} | "
                     f"{p.gained if p else '–'} | {verdict(r) if p else 'reference'} |")
    return lines


def _agreement_table(rep: AccuracyReport) -> list[str]:
    lines = ["", "## Agreement with the reference (PyTorch FP32)", "",
             "| row | top-1 agreement [95%] | reference's top-1 in top-5 | cosine min | cosine p5 | "
             "worst image |", "|---|---|---|---|---|---|"]
    for r in rep.rows:
        if r.status == "ok":
            lines.append(f"| {_label(r)} | {_pct(r.top1_agreement)} {_ci(r.top1_agreement_ci)} | "
                         f"{_pct(r.top5_contains_reference)} | {r.cosine_min:.5f} | {r.cosine_p5:.5f} | "
                         f"{r.worst_image} |")
    return lines


def _classes_table(rep: AccuracyReport) -> list[str]:
    lost = [r for r in rep.rows if r.classes_lost]
    if not lost:
        return []
    return ["", "## Classes that lose most", "",
            "| row | class | images | reference right | row right | net lost |",
            "|---|---|---|---|---|---|",
            *[f"| {_label(r)} | {c.label} {c.name} | {c.images} | {c.reference_correct} | "
              f"{c.row_correct} | {c.net_lost} |" for r in lost for c in r.classes_lost[:5]]]


def _time(rep: AccuracyReport) -> list[str]:
    if not rep.time:
        return []
    spent = dict(rep.time)
    wall = spent.pop("wall", rep.seconds)
    parts = [f"waiting for decoded images {spent.pop('decode_wait', 0.0):.1f} s"]
    if "reference" in spent:
        parts.append(f"reference {spent.pop('reference'):.1f} s")
    parts += [f"{name} {s:.1f} s" for name, s in spent.items() if s]
    return ["", f"Time: {wall:.1f} s in all; " + ", ".join(parts) + "."]


def _throughput(t: Throughput) -> list[str]:
    share = t.decode_wait / t.seconds if t.seconds else 0.0
    lines = [f"Throughput: {t.images} images through the pass in {t.seconds:.1f} s "
             f"({t.images_per_s:.1f} images/s; setup, compiling and this summary not counted), "
             f"{t.decode_wait:.1f} s ({share:.0%}) of it waiting for decoded images.", "",
             "| part | images | its time in the pass | images/s in the pass | images/s on decoded tensors |",
             "|---|---|---|---|---|"]
    for p in t.parts:
        rate = f"{p.images / p.seconds:.1f}" if p.seconds and p.images else "-"
        decoded = f"{p.decoded_per_s:.1f}" if p.decoded_per_s else "-"
        lines.append(f"| {p.name} | {p.images} | {p.seconds:.1f} s | {rate} | {decoded} |")
    if t.efficiency is not None:
        lines += ["", f"The pass ran at {t.efficiency:.0%} of the speed its parts have on decoded tensors "
                      "(the same runners, same batch, timed after the pass)."]
    return lines


def plot(rep: AccuracyReport, path: Path) -> Path:
    """Top-1 (or agreement) per row with its interval, and the paired change with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in (rep.reference, *rep.rows) if r.status == "ok"]
    labelled = rep.dataset.labelled
    fig, axes = plt.subplots(1, 2 if labelled else 1, figsize=(10 if labelled else 6, 0.5 * len(rows) + 2),
                             dpi=110, squeeze=False)
    ax = axes[0][0]
    for i, r in enumerate(rows):
        value, ci = (r.top1, r.top1_ci) if labelled else (r.top1_agreement, r.top1_agreement_ci)
        if value is None or len(ci) != 2:
            continue
        ax.errorbar([100 * value], [i], xerr=[[100 * (value - ci[0])], [100 * (ci[1] - value)]], fmt="o",
                    capsize=3)
    ax.set_yticks(range(len(rows)), [_label(r) for r in rows])
    ax.set_xlabel("top-1 accuracy, % (95% interval)" if labelled else "top-1 agreement with the reference, %")
    ax.grid(alpha=0.3)
    if labelled:
        ax = axes[0][1]
        for i, r in enumerate(rows):
            if r.paired is None:
                continue
            p = r.paired
            ax.errorbar([100 * p.difference], [i], xerr=[[100 * (p.difference - p.difference_ci[0])],
                                                         [100 * (p.difference_ci[1] - p.difference)]],
                        fmt="o", capsize=3, color="C3" if not p.within_noise else "C0")
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(rows)), [_label(r) for r in rows])
        ax.set_xlabel("change in top-1 vs reference, points (paired, 95%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{rep.variant}: {rep.dataset.images} images from {Path(rep.dataset.source).name}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

