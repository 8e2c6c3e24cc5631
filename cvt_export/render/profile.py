"""`cvt-bench profile`'s record as Markdown (profile-BACKEND-PRECISION.md) and as a bar chart of
each batch size's operator-time shares (its .png)."""

from __future__ import annotations

from pathlib import Path

from cvt_export.records import BatchProfile, ProfileReport


def _work(report: ProfileReport) -> str:
    """The floors' basis: the matrix products, then (where the file has them) the convolutions."""
    text = (f"MatMul in this precision: {report.gemm_limit.gmac_per_s:.1f} GMAC/s. The model's matrix "
            f"products: {report.gemm_macs_per_image / 1e9:.2f} GMAC per image, so the GEMM floor is "
            "that work at that rate")
    if report.conv_macs_per_image is None:  # older files
        return text + "."
    return (text + "; with its convolutions' "
            f"{report.conv_macs_per_image / 1e9:.2f} GMAC, the floor of the whole inference.")


def _whole(f: BatchProfile) -> str:
    if f.floor_ms is None:  # older files: the whole inference against the GEMM floor
        return f"The whole inference {f.run_vs_floor:.2f}x the GEMM floor. "
    return (f"Every multiply-add at the limit {f.floor_ms:.1f} ms: the whole inference "
            f"{f.run_vs_floor:.2f}x it. ")


def _batch(batch: str, f: BatchProfile) -> list[str]:
    lines = [f"## Batch {batch}", "",
             f"Whole inference {f.run_ms:.1f} ms; operators {f.kernels_ms:.1f} ms; GEMM "
             f"{f.gemm_ms:.1f} ms = **{100 * f.gemm_share:.1f}%** of operator time ({f.runs} runs). "
             f"Costliest non-GEMM groups: {', '.join(f.top_non_gemm) or '–'}. GEMM floor "
             f"{f.gemm_floor_ms:.1f} ms: the GEMMs took {f.gemm_vs_floor:.2f}x it. " + _whole(f)
             + "Each stage's GEMMs against their own floor: "
             + ", ".join(f"{st} {x:.2f}x" for st, x in f.stage_gemm_vs_floor().items()) + ".", "",
             "| group | ms | share | nodes | precisions (ms) | operators |", "|---|---|---|---|---|---|"]
    for g in f.by_op:
        kernels = sorted(g.precisions.items(), key=lambda kv: -kv[1])
        lines.append(f"| {g.group} | {g.ms:.2f} | {100 * g.share:.1f}% | {g.nodes} | "
                     + ", ".join(f"{p} {ms:.1f}" for p, ms in kernels) + f" | {', '.join(g.ops)} |")
    lines += ["", "| block | ms | GEMM ms | its GEMM floor ms | GEMM × floor |", "|---|---|---|---|---|"]
    for b, ms in f.by_block.items():
        gemm, floor = f.gemm_by_block.get(b, 0.0), f.block_gemm_floor_ms.get(b)
        ratio = f"{floor:.2f} | {gemm / floor:.2f}× |" if floor else "– | – |"
        lines.append(f"| {b} | {ms:.2f} | {gemm:.2f} | {ratio}")
    return [*lines, ""]


def markdown(report: ProfileReport) -> str:
    m = report.machine
    lines = [f"# Profile: {report.backend} {report.precision} (runs as {report.executed})", "",
             f"{m.cpu}, {m.cores} cores, ISA {' '.join(m.isa)}. Artifacts `{report.artifacts}`. The figures "
             "are the runtime's own per-operator times (after its fusions) in the profiled run whose whole "
             "inference time was the median.", "",
             "GEMM limit measured in the same run on one "
             f"{'x'.join(map(str, report.gemm_limit.shape))} " + _work(report), ""]
    for batch, f in report.batches.items():
        lines += _batch(batch, f)
    return "\n".join(lines)


def plot(report: ProfileReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(report.batches)
    groups: list[str] = []
    for f in report.batches.values():
        groups += [g.group for g in f.by_op[:8] if g.group not in groups]
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.5 * len(batches)))
    for row, batch in enumerate(batches):
        shares = {g.group: g.share for g in report.batches[batch].by_op}
        left = 0.0
        for i, group in enumerate(groups):
            width = shares.get(group, 0.0)
            ax.barh(row, width, left=left, color=plt.get_cmap("tab10")(i % 10),
                    label=group if row == 0 else None)
            left += width
        ax.barh(row, 1 - left, left=left, color="lightgrey", label="other" if row == 0 else None)
    ax.set_yticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_xlabel("share of operator time")
    ax.set_title(f"{report.backend} {report.precision}: where the time goes")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
