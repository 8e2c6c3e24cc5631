"""cvt-bench's report as people read it: report.md (the tables, then the recommendation) and the
PNG plots (throughput, speed against fidelity, drift along the network), made from the record."""

from __future__ import annotations

from pathlib import Path

from cvt_export.records import BenchReport, DriftPoint, Floor, Inputs, LatencyStats, RoleFidelity, Row
from cvt_export.render.recommendation import markdown as recommendation


def fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _median(s: LatencyStats) -> str:
    ci = s.median_ci_ms
    text = fmt(s.median_ms, ".1f") + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
    modes = s.modes_ms
    return text + (f" bimodal {modes[0]:.1f}/{modes[1]:.1f}" if modes else "")


def _agree(f: RoleFidelity) -> str:
    share = f"{100 * f.top1_agreement:.1f}%"
    ci = f.top1_agreement_ci
    return share + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")


def _roles_line(inputs: Inputs) -> list[str]:
    if not inputs.roles:
        return []
    parts = [f"{role} {n.inputs} inputs of {n.sources} images" for role, n in inputs.roles.items()]
    return [f"Roles (never the same image in two): {'; '.join(parts)}.", ""]


def markdown(report: BenchReport) -> str:
    batches = report.batches
    lines = [*_header(report), *_latency_table(report, batches), *_floor_lines(report, batches),
             *_fidelity_table(report), *_roles_table(report), *_accuracy_table(report),
             *_drift_table(report), *_not_run(report)]
    if report.recommendation:
        lines += recommendation(report.recommendation)
    return "\n".join(lines) + "\n"


def _header(report: BenchReport) -> list[str]:
    m, inputs, settings = report.machine, report.inputs, report.settings
    return [
        f"# cvt-bench: {report.model.variant} ({report.model.weights.spec})",
        "",
        f"{m.cpu}, {m.cores} cores, ISA {' '.join(m.isa) or 'n/a'}; "
        + ", ".join(f"{k} {v}" for k, v in m.libraries.items()) + ".",
        f"Inputs: {inputs.images} images from {inputs.source} ({inputs.image_size}px, "
        f"sha256 {inputs.sha256[:12]}); warm-up {settings.warmup}, "
        + (f"{settings.iters} iterations" if settings.iters else f"{settings.seconds} s")
        + f" per batch size; threads {settings.threads or 'backend default'}. "
        f"Speed-up: median latency of {report.baseline.backend} {report.baseline.precision} "
        "eager divided by this row's, same run.",
        "",
        *_roles_line(inputs),
    ]


def _latency_table(report: BenchReport, batches: list[str]) -> list[str]:
    lines = [
        "## Latency and throughput",
        "",
        "Median with its 95% interval (order statistics of this row's iterations); 'bimodal' when "
        "the iterations split into two clusters, with both.",
        "",
        "| backend | precision | runs as | "
        + " | ".join(f"b{b} median ms [95%] | b{b} p90 ms | b{b} img/s | b{b} speed-up" for b in batches)
        + " | first run s |",
        "|---|---|---|" + "---|" * (4 * len(batches)) + "---|",
    ]
    for r in report.ran:
        cells = []
        for b in batches:
            s = r.latency.get(b)
            cells += ([_median(s), fmt(s.p90_ms, ".1f"), fmt(s.images_per_s, ".1f"),
                       fmt(r.speedup.get(b), ".2f") + "×"] if s else ["–"] * 4)
        lines.append(f"| {r.backend} | {r.precision} | {r.executed} | " + " | ".join(cells)
                     + f" | {fmt(r.first_inference_s, '.1f')} |")
    return lines


def _fidelity_table(report: BenchReport) -> list[str]:
    lines = ["", "## Fidelity vs PyTorch FP32", "",
             "| backend | precision | max-abs | mean-abs | cosine min | top-1 agree | top-5 agree | "
             "KL mean | batch-1 vs batch max-abs | worst image | within bounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.ran:
        f = r.fidelity
        if f is None:
            continue
        lines.append(f"| {r.backend} | {r.precision} | {f.max_abs:.2e} | {f.mean_abs:.2e} | "
                     f"{f.cosine_min:.6f} | {100 * f.top1_agreement:.1f}% | "
                     f"{100 * f.top5_agreement:.1f}% | {f.kl_mean:.2e} | "
                     f"{fmt(r.batch_consistency_max_abs, '.2e')} | {f.worst_image} | "
                     + ("yes" if f.passed else "**NO**: " + "; ".join(f.broken)) + " |")
    return lines


def _roles_table(report: BenchReport) -> list[str]:
    by_role = [r for r in report.ran if r.fidelity and r.fidelity.selection]
    if not by_role:
        return []
    lines = ["", "## Fidelity by role", "",
             "Selection images decide (the recommendation); confirmation images are what it states. "
             "Cosine: worst and 5th percentile; top-1 agreement with its 95% Wilson interval.", "",
             "| backend | precision | selection n | cosine min / p5 | top-1 agree [95%] | "
             "confirmation n | cosine min / p5 | top-1 agree [95%] |",
             "|---|---|---|---|---|---|---|---|"]
    for r in by_role:
        assert r.fidelity is not None
        cells = []
        for f in (r.fidelity.selection, r.fidelity.confirmation):
            cells += ([str(f.images), f"{f.cosine_min:.6f} / {fmt(f.cosine_p5, '.6f')}", _agree(f)]
                      if f else ["0", "–", "–"])
        lines.append(f"| {r.backend} | {r.precision} | " + " | ".join(cells) + " |")
    return lines


def _accuracy_table(report: BenchReport) -> list[str]:
    if not report.inputs.labelled:
        return []
    return ["", "## Accuracy", "", "| backend | precision | top-1 | top-5 |", "|---|---|---|---|",
            *[f"| {r.backend} | {r.precision} | {100 * r.accuracy.top1:.2f}% | "
              f"{100 * r.accuracy.top5:.2f}% |" for r in report.results if r.accuracy]]


def _drift_table(report: BenchReport) -> list[str]:
    drifted = [r for r in report.results if r.drift]
    if not drifted:
        return []
    ends = _stage_ends([d.point for d in drifted[0].drift])
    lines = ["", "## Per-block drift (worst-image cosine vs PyTorch FP32 at each point)", "",
             f"On the first {report.settings.drift_images} images. 'Grows most at' is the "
             "point where 1 − cosine rises most from the point before: where a loss starts.", "",
             "| backend | precision | " + " | ".join(ends) + " | grows most at |",
             "|---|---|" + "---|" * len(ends) + "---|"]
    for r in drifted:
        by_point = {d.point: d.cosine_min for d in r.drift}
        lines.append(f"| {r.backend} | {r.precision} | "
                     + " | ".join(fmt(by_point.get(p), ".5f") for p in ends)
                     + f" | {r.drift_located or 'nowhere (1 − cosine < 1e-6)'} |")
    return lines


def _not_run(report: BenchReport) -> list[str]:
    skipped = [r for r in report.results if not r.ok]
    if not skipped:
        return []
    return ["", "## Not run", "",
            *[f"- {r.backend} {r.precision} ({r.status}): {r.reason}" for r in skipped]]


def _work_line(f: Floor) -> str:
    """The model's multiply-adds per image, split where the file says how (older files: the total)."""
    total = f"The model does {f.macs_per_image / 1e9:.2f} GMAC per image"
    if f.gemm_macs_per_image is None or f.conv_macs_per_image is None:
        return total + "; at that limit they take the "
    return (total + f" ({f.gemm_macs_per_image / 1e9:.2f} in matrix products, "
            f"{f.conv_macs_per_image / 1e9:.2f} in convolutions); at that limit they take the ")


def _floor_lines(report: BenchReport, batches: list[str]) -> list[str]:
    """Each row's median over its own GEMM floor (what is left to gain on this CPU)."""
    rows = [r for r in report.ran if r.floor]
    if not rows:
        return []
    f0 = rows[0].floor
    assert f0 is not None
    shape = "×".join(map(str, f0.limit_shape))
    lines = ["", "## Distance from the GEMM floor", "",
             f"Each row's runtime measured, in this run and in the row's own precision and settings, "
             f"the multiply-adds per second it reaches on one {shape} MatMul (the GEMM limit). "
             + _work_line(f0) +
             "floor below, and '× floor' is the row's median latency over it: 1.00× would be an "
             "inference that is nothing but multiply-adds at the GEMM's full speed.", "",
             "| backend | precision | GEMM limit GMAC/s | "
             + " | ".join(f"b{b} floor ms | b{b} × floor" for b in batches) + " |",
             "|---|---|---|" + "---|" * (2 * len(batches))]
    for r in rows:
        f = r.floor
        assert f is not None
        cells = [f"{fmt(f.ms.get(b), '.1f')} | {fmt(f.times.get(b), '.2f')}×" for b in batches]
        lines.append(f"| {r.backend} | {r.precision} | {f.gemm_gmac_per_s:.1f} | " + " | ".join(cells) + " |")
    without = [r.name for r in report.ran if not r.floor]
    if without:
        lines += ["", f"No floor for {', '.join(without)}: their runner measures no GEMM limit "
                      "(TensorRT's: on a GPU one such GEMM takes microseconds, less than launching it; "
                      "docs/benchmark.md)."]
    return lines


def _stage_ends(points: list[str]) -> list[str]:
    """The last block of each stage, then the logits: the columns of the drift table."""
    last: dict[str, str] = {}
    for p in points:
        if p.startswith("stage "):
            last[p.split(" block")[0]] = p
    return [*last.values(), "logits"]


def network_order(points: list[str]) -> list[str]:
    """Block points ("stage S block B") by stage then block, anything else (the logits) last."""
    def key(p: str) -> tuple[int, int, int]:
        parts = p.split()
        if len(parts) == 4 and parts[0] == "stage" and parts[2] == "block":
            return (0, int(parts[1]), int(parts[3]))
        return (1, 0, 0)

    return sorted(points, key=key)


Colors = dict[tuple[str, str], str]


def plots(report: BenchReport, out: Path) -> list[Path]:
    """throughput.png (images/s vs batch), tradeoff.png (speed-up vs fidelity) and, when rows
    carry it, drift.png (error along the network)."""
    import matplotlib

    matplotlib.use("Agg")
    ok = report.ran
    color = {(r.backend, r.precision): f"C{i % 10}" for i, r in enumerate(ok)}  # same in all plots
    title = f"{report.model.variant} on {report.machine.cpu}"
    paths = [_throughput_plot(ok, color, title, out / "throughput.png"),
             _tradeoff_plot(report, ok, color, title, out / "tradeoff.png")]
    drifted = [r for r in ok if r.drift]
    if drifted:
        paths.append(_drift_plot(drifted, color, title, out / "drift.png"))
    return paths


def _throughput_plot(ok: list[Row], color: Colors, title: str, path: Path) -> Path:
    import matplotlib
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in ok:
        bs = sorted(int(b) for b in r.latency)
        ax.plot(bs, [r.latency[str(b)].images_per_s for b in bs], marker="o",
                color=color[r.backend, r.precision], label=r.name)
    ax.set(xscale="log", xlabel="batch size", ylabel="images / s", title=f"Throughput: {title}")
    ax.set_xticks(sorted({int(b) for r in ok for b in r.latency}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _tradeoff_plot(report: BenchReport, ok: list[Row], color: Colors, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    largest = str(max(int(b) for b in report.batches))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    floor = 1e-9  # FP32 paths sit at float32 rounding; plotted at the floor
    placed: list[tuple[float, float]] = []
    base = (report.baseline.backend, report.baseline.precision)
    for r in ok:
        if largest not in r.speedup or not r.fidelity or (r.backend, r.precision) == base:
            continue
        point = (max(1 - r.fidelity.cosine_min, floor), r.speedup[largest])
        ax.scatter(*point, s=40, color=color[r.backend, r.precision])
        near = sum(1 for p in placed if abs(p[1] - point[1]) < 0.15 and abs(p[0] / point[0] - 1) < 1)
        placed.append(point)
        ax.annotate(r.name, point, fontsize=8, xytext=(5, 4 - 11 * near), textcoords="offset points")
    ax.set(xscale="log", xlabel=f"1 − worst-image cosine vs PyTorch FP32 (lower is better; floor {floor:g})",
           ylabel=f"speed-up at batch {largest} (× torch FP32)", title=f"Speed vs fidelity: {title}")
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _drift_plot(drifted: list[Row], color: Colors, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    # One axis for every row: the union of their points in network order (a backend that
    # fused a block away has fewer), each row drawn at its own points' positions.
    points = list(dict.fromkeys(d.point for r in drifted for d in r.drift))
    order = {p: i for i, p in enumerate(network_order(points))}
    points = sorted(points, key=order.__getitem__)
    for r in drifted:
        drift: tuple[DriftPoint, ...] = r.drift
        ax.plot([points.index(d.point) for d in drift], [max(d.error, 1e-9) for d in drift], marker=".",
                color=color[r.backend, r.precision], label=r.name)
    ax.set_xticks(range(len(points)), [p.replace("stage ", "s").replace(" block ", ".b") for p in points],
                  rotation=60, fontsize=7)
    ax.set(yscale="log", ylabel="1 − worst-image cosine",
           xlabel="block output (stage.block), then logits", title=f"Drift along the network: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
