"""A benchmark report as files people read: report.json (schema cvt-bench/1), report.md, PNG plots.

report.json schema `cvt-bench/1` (documented in docs/benchmark.md): top-level `schema`, `created`,
`machine` {cpu, cores, isa, os, python, libraries}, `model` {variant, weights, artifacts,
onnx_sha256}, `inputs` {source, images, labelled, sha256, image_size, held_out_note, roles
{calibration|selection|confirmation: {inputs, sources}}}, `settings` (the
BenchConfig), `baseline` {backend, precision}, and `results`: one object per backend ×
precision with `status` (ok | skipped | error), `reason`, `executed`, `device`, `artifact`,
`first_inference_s`, `peak_rss_mb`, `fidelity` {max_abs, mean_abs, cosine_min, cosine_mean,
top1_agreement, top5_agreement, kl_mean, kl_max, worst_image, worst_cosine, n, cosine_p5,
top1_agreement_ci, and per role `selection`, `confirmation`, `held_out` (both): {cosine_min,
max_abs, top1_agreement, n, cosine_p5, top1_agreement_ci, images}}, `accuracy` {top1, top5,
n, top1_ci} or null, `batch_consistency_max_abs`, `latency` {batch: {iterations, median_ms,
p90_ms, p99_ms, mean_ms, min_ms, stdev_ms, images_per_s, median_ci_ms, modes_ms}}, `speedup` {batch:
ratio of the baseline's median to this one's}, `drift` [{point ("stage S block B" or
"logits"), cosine_min, error (1 - cosine_min), rel_max_abs}] on the first `settings.drift_images`
images (ONNX Runtime and OpenVINO), `drift_located`: the point where the error grows most, and
`floor` (rows whose runtime can measure its GEMM limit; {} otherwise) {gemm_gmac_per_s,
limit_shape [m, k, n], macs_per_image (gemm_macs_per_image in matrix products +
conv_macs_per_image in convolutions), ms {batch: the floor}, times {batch: median_ms / floor}}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvt_export.artifacts import atomic_write

REPORT_SCHEMA = "cvt-bench/1"


@dataclass
class Result:
    backend: str
    precision: str
    status: str = "ok"                 # ok | skipped | error
    reason: str = ""
    executed: str = ""
    device: str = ""
    artifact: str = ""
    first_inference_s: float | None = None
    peak_rss_mb: float | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, float] | None = None
    batch_consistency_max_abs: float | None = None
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    drift: list[dict[str, Any]] = field(default_factory=list)
    drift_located: str | None = None
    floor: dict[str, Any] = field(default_factory=dict)

REQUIRED = {"schema", "created", "machine", "model", "inputs", "settings", "baseline", "results"}
RESULT_KEYS = {"backend", "precision", "status", "reason", "executed", "device", "artifact",
               "first_inference_s", "peak_rss_mb", "fidelity", "accuracy", "batch_consistency_max_abs",
               "latency", "speedup", "drift", "drift_located"}


def validate(report: dict[str, Any]) -> list[str]:
    """Schema problems (empty list: valid). Readers call this before trusting a file."""
    problems = []
    if report.get("schema") != REPORT_SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, expected {REPORT_SCHEMA!r}")
    problems += [f"missing key {k!r}" for k in sorted(REQUIRED - set(report))]
    for i, r in enumerate(report.get("results", [])):
        missing = RESULT_KEYS - set(r)
        if missing:
            problems.append(f"results[{i}] misses {sorted(missing)}")
        elif r["status"] == "ok" and not r["latency"]:
            problems.append(f"results[{i}] ({r['backend']} {r['precision']}) is ok but has no latency")
    return problems


def write_json(report: dict[str, Any], path: Path) -> None:
    atomic_write(path, json.dumps(report, indent=2) + "\n")


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _median(s: dict[str, Any]) -> str:
    ci = s.get("median_ci_ms")
    text = _fmt(s["median_ms"], ".1f") + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
    modes = s.get("modes_ms")
    return text + (f" bimodal {modes[0]:.1f}/{modes[1]:.1f}" if modes else "")


def _agree(f: dict[str, Any]) -> str:
    share = f"{100 * f['top1_agreement']:.1f}%"
    ci = f.get("top1_agreement_ci")
    return share + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")


def _roles_line(inputs: dict[str, Any]) -> list[str]:
    roles = inputs.get("roles")
    if not roles:
        return []
    parts = [f"{role} {n['inputs']} inputs of {n['sources']} images" for role, n in roles.items()]
    return [f"Roles (never the same image in two): {'; '.join(parts)}.", ""]


def markdown(report: dict[str, Any]) -> str:
    batches = [str(b) for b in report["settings"]["batches"]]
    lines = [*_header(report), *_latency_table(report, batches), *_floor_lines(report, batches),
             *_fidelity_table(report), *_roles_table(report), *_accuracy_table(report),
             *_drift_table(report), *_not_run(report)]
    if report.get("recommendation"):
        from cvt_export.harness.recommend import markdown as recommendation

        lines += recommendation(report["recommendation"])
    return "\n".join(lines) + "\n"


def _header(report: dict[str, Any]) -> list[str]:
    m, inputs, settings = report["machine"], report["inputs"], report["settings"]
    return [
        f"# cvt-bench: {report['model']['variant']} ({report['model']['weights']['spec']})",
        "",
        f"{m['cpu']}, {m['cores']} cores, ISA {' '.join(m['isa']) or 'n/a'}; "
        + ", ".join(f"{k} {v}" for k, v in m["libraries"].items()) + ".",
        f"Inputs: {inputs['images']} images from {inputs['source']} ({inputs['image_size']}px, "
        f"sha256 {inputs['sha256'][:12]}); warm-up {settings['warmup']}, "
        + (f"{settings['iters']} iterations" if settings["iters"] else f"{settings['seconds']} s")
        + f" per batch size; threads {settings['threads'] or 'backend default'}. "
        f"Speed-up: median latency of {report['baseline']['backend']} {report['baseline']['precision']} "
        "eager divided by this row's, same run.",
        "",
        *_roles_line(inputs),
    ]


def _latency_table(report: dict[str, Any], batches: list[str]) -> list[str]:
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
    for r in report["results"]:
        if r["status"] != "ok":
            continue
        cells = []
        for b in batches:
            s = r["latency"].get(b)
            cells += ([_median(s), _fmt(s["p90_ms"], ".1f"), _fmt(s["images_per_s"], ".1f"),
                       _fmt(r["speedup"].get(b), ".2f") + "×"] if s else ["–"] * 4)
        lines.append(f"| {r['backend']} | {r['precision']} | {r['executed']} | " + " | ".join(cells)
                     + f" | {_fmt(r['first_inference_s'], '.1f')} |")
    return lines


def _fidelity_table(report: dict[str, Any]) -> list[str]:
    lines = ["", "## Fidelity vs PyTorch FP32", "",
             "| backend | precision | max-abs | mean-abs | cosine min | top-1 agree | top-5 agree | "
             "KL mean | batch-1 vs batch max-abs | worst image | within bounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        f = r["fidelity"]
        if r["status"] != "ok" or not f:
            continue
        lines.append(f"| {r['backend']} | {r['precision']} | {f['max_abs']:.2e} | {f['mean_abs']:.2e} | "
                     f"{f['cosine_min']:.6f} | {100 * f['top1_agreement']:.1f}% | "
                     f"{100 * f['top5_agreement']:.1f}% | {f['kl_mean']:.2e} | "
                     f"{_fmt(r['batch_consistency_max_abs'], '.2e')} | {f['worst_image']} | "
                     + ("yes" if f.get("pass", True) else "**NO**: " + "; ".join(f["broken"])) + " |")
    return lines


def _roles_table(report: dict[str, Any]) -> list[str]:
    by_role = [r for r in report["results"] if r["status"] == "ok" and (r["fidelity"] or {}).get("selection")]
    if not by_role:
        return []
    lines = ["", "## Fidelity by role", "",
             "Selection images decide (the recommendation); confirmation images are what it states. "
             "Cosine: worst and 5th percentile; top-1 agreement with its 95% Wilson interval.", "",
             "| backend | precision | selection n | cosine min / p5 | top-1 agree [95%] | "
             "confirmation n | cosine min / p5 | top-1 agree [95%] |",
             "|---|---|---|---|---|---|---|---|"]
    for r in by_role:
        cells = []
        for role in ("selection", "confirmation"):
            f = r["fidelity"].get(role)
            cells += ([str(f["images"]), f"{f['cosine_min']:.6f} / {f['cosine_p5']:.6f}", _agree(f)]
                      if f else ["0", "–", "–"])
        lines.append(f"| {r['backend']} | {r['precision']} | " + " | ".join(cells) + " |")
    return lines


def _accuracy_table(report: dict[str, Any]) -> list[str]:
    if not report["inputs"]["labelled"]:
        return []
    return ["", "## Accuracy", "", "| backend | precision | top-1 | top-5 |", "|---|---|---|---|",
            *[f"| {r['backend']} | {r['precision']} | {100 * r['accuracy']['top1']:.2f}% | "
              f"{100 * r['accuracy']['top5']:.2f}% |" for r in report["results"] if r["accuracy"]]]


def _drift_table(report: dict[str, Any]) -> list[str]:
    drifted = [r for r in report["results"] if r.get("drift")]
    if not drifted:
        return []
    ends = _stage_ends([d["point"] for d in drifted[0]["drift"]])
    lines = ["", "## Per-block drift (worst-image cosine vs PyTorch FP32 at each point)", "",
             f"On the first {report['settings'].get('drift_images', 4)} images. 'Grows most at' is the "
             "point where 1 − cosine rises most from the point before: where a loss starts.", "",
             "| backend | precision | " + " | ".join(ends) + " | grows most at |",
             "|---|---|" + "---|" * len(ends) + "---|"]
    for r in drifted:
        by_point = {d["point"]: d["cosine_min"] for d in r["drift"]}
        lines.append(f"| {r['backend']} | {r['precision']} | "
                     + " | ".join(_fmt(by_point.get(p), ".5f") for p in ends)
                     + f" | {r['drift_located'] or 'nowhere (1 − cosine < 1e-6)'} |")
    return lines


def _not_run(report: dict[str, Any]) -> list[str]:
    skipped = [r for r in report["results"] if r["status"] != "ok"]
    if not skipped:
        return []
    return ["", "## Not run", "",
            *[f"- {r['backend']} {r['precision']} ({r['status']}): {r['reason']}" for r in skipped]]


def _floor_lines(report: dict[str, Any], batches: list[str]) -> list[str]:
    """Each row's median over its own GEMM floor (what is left to gain on this CPU)."""
    rows = [r for r in report["results"] if r["status"] == "ok" and r.get("floor")]
    if not rows:
        return []
    f0 = rows[0]["floor"]
    shape = "×".join(map(str, f0["limit_shape"]))
    lines = ["", "## Distance from the GEMM floor", "",
             f"Each row's runtime measured, in this run and in the row's own precision and settings, "
             f"the multiply-adds per second it reaches on one {shape} MatMul (the GEMM limit). The "
             f"model does {f0['macs_per_image'] / 1e9:.2f} GMAC per image "
             f"({f0['gemm_macs_per_image'] / 1e9:.2f} in matrix products, "
             f"{f0['conv_macs_per_image'] / 1e9:.2f} in convolutions); at that limit they take the "
             "floor below, and '× floor' is the row's median latency over it: 1.00× would be an "
             "inference that is nothing but multiply-adds at the GEMM's full speed.", "",
             "| backend | precision | GEMM limit GMAC/s | "
             + " | ".join(f"b{b} floor ms | b{b} × floor" for b in batches) + " |",
             "|---|---|---|" + "---|" * (2 * len(batches))]
    for r in rows:
        f = r["floor"]
        cells = [f"{_fmt(f['ms'].get(b), '.1f')} | {_fmt(f['times'].get(b), '.2f')}×" for b in batches]
        lines.append(f"| {r['backend']} | {r['precision']} | {f['gemm_gmac_per_s']:.1f} | "
                     + " | ".join(cells) + " |")
    without = [f"{r['backend']} {r['precision']}" for r in report["results"]
               if r["status"] == "ok" and not r.get("floor")]
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


def plots(report: dict[str, Any], out: Path) -> list[Path]:
    """throughput.png (images/s vs batch), tradeoff.png (speed-up vs fidelity) and, when rows
    carry it, drift.png (error along the network)."""
    import matplotlib

    matplotlib.use("Agg")
    ok = [r for r in report["results"] if r["status"] == "ok"]
    color = {(r["backend"], r["precision"]): f"C{i % 10}" for i, r in enumerate(ok)}  # same in all plots
    title = f"{report['model']['variant']} on {report['machine']['cpu']}"
    paths = [_throughput_plot(ok, color, title, out / "throughput.png"),
             _tradeoff_plot(report, ok, color, title, out / "tradeoff.png")]
    drifted = [r for r in ok if r.get("drift")]
    if drifted:
        paths.append(_drift_plot(drifted, color, title, out / "drift.png"))
    return paths


Colors = dict[tuple[str, str], str]


def _throughput_plot(ok: list[dict[str, Any]], color: Colors, title: str, path: Path) -> Path:
    import matplotlib
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in ok:
        bs = sorted(int(b) for b in r["latency"])
        ax.plot(bs, [r["latency"][str(b)]["images_per_s"] for b in bs], marker="o",
                color=color[r["backend"], r["precision"]], label=f"{r['backend']} {r['precision']}")
    ax.set(xscale="log", xlabel="batch size", ylabel="images / s", title=f"Throughput: {title}")
    ax.set_xticks(sorted({int(b) for r in ok for b in r["latency"]}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _tradeoff_plot(report: dict[str, Any], ok: list[dict[str, Any]], color: Colors, title: str,
                   path: Path) -> Path:
    import matplotlib.pyplot as plt

    largest = str(max(report["settings"]["batches"]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    floor = 1e-9  # FP32 paths sit at float32 rounding; plotted at the floor
    placed: list[tuple[float, float]] = []
    base = (report["baseline"]["backend"], report["baseline"]["precision"])
    for r in ok:
        if largest not in r["speedup"] or not r["fidelity"] or (r["backend"], r["precision"]) == base:
            continue
        point = (max(1 - r["fidelity"]["cosine_min"], floor), r["speedup"][largest])
        ax.scatter(*point, s=40, color=color[r["backend"], r["precision"]])
        near = sum(1 for p in placed if abs(p[1] - point[1]) < 0.15 and abs(p[0] / point[0] - 1) < 1)
        placed.append(point)
        ax.annotate(f"{r['backend']} {r['precision']}", point, fontsize=8, xytext=(5, 4 - 11 * near),
                    textcoords="offset points")
    ax.set(xscale="log", xlabel=f"1 − worst-image cosine vs PyTorch FP32 (lower is better; floor {floor:g})",
           ylabel=f"speed-up at batch {largest} (× torch FP32)", title=f"Speed vs fidelity: {title}")
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _drift_plot(drifted: list[dict[str, Any]], color: Colors, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    # One axis for every row: the union of their points in network order (a backend that
    # fused a block away has fewer), each row drawn at its own points' positions.
    points = list(dict.fromkeys(d["point"] for r in drifted for d in r["drift"]))
    order = {p: i for i, p in enumerate(network_order(points))}
    points = sorted(points, key=order.__getitem__)
    for r in drifted:
        ax.plot([points.index(d["point"]) for d in r["drift"]],
                [max(d["error"], 1e-9) for d in r["drift"]], marker=".",
                color=color[r["backend"], r["precision"]], label=f"{r['backend']} {r['precision']}")
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


def write_all(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "report.json")
    atomic_write(out / "report.md", markdown(report))
    return [out / "report.json", out / "report.md", *plots(report, out)]
