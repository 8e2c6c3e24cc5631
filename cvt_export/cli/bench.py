"""`cvt-bench`: every backend × precision × batch on the same inputs; latency, fidelity, reports."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cvt_export import metrics
from cvt_export import precisions as precision_table
from cvt_export.artifacts import ArtifactError, ArtifactFolder, check_writable
from cvt_export.backends import BACKEND_MODULES
from cvt_export.cli import github
from cvt_export.cli.common import (
    VerboseOpt,
    not_an_input,
    output_file,
    parse_budgets,
    run_app,
    setup_logging,
    show_table,
    status,
    stderr,
    stdout,
    user_errors,
)
from cvt_export.harness import recommend
from cvt_export.harness import report as reports
from cvt_export.records import ServedReport
from cvt_export.render import accuracy as render_accuracy
from cvt_export.render import recommendation as render_recommendation
from cvt_export.render import regress as render_regress
from cvt_export.render import report as render_report
from cvt_ref.errors import CvtError

if TYPE_CHECKING:
    from cvt_export.harness.accuracy import PassConfig
    from cvt_export.records import AccuracyReport, BenchReport, LoadSpec
    from cvt_export.regress import Outcome

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, invoke_without_command=True,
                  help="""Benchmark CvT on every backend: latency, throughput, fidelity vs PyTorch FP32.

Examples:

  cvt-bench --backend ort,openvino --precision fp32,int8 --batch 1,8

  cvt-bench --artifacts artifacts/mine --dataset ~/val --limit 500 --out reports/mine

  cvt-bench regress --backend ort --precision int8
""")


def _backends(text: str) -> tuple[str, ...]:
    return tuple(BACKEND_MODULES) if text == "all" else tuple(b.strip() for b in text.split(",") if b.strip())


def _precisions(text: str) -> tuple[str, ...]:
    return precision_table.parse(text)


def output_folder(folder: Path, option: str = "--out") -> None:
    """Refuse, before a benchmark runs, a report folder that cannot be made or written. `option`
    is what the user gave (`--baseline`'s folder for --update; "the default --out" when none)."""
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"{option} {folder}: is a file, not a folder; choose a folder path")
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise ArtifactError(f"{option} {folder}: {existing} is a file, not a folder")
    check_writable(existing, option)


def _csv_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CvtError(f"{option} {text!r}: use comma-separated integers") from None
    return values


@app.callback()
@user_errors
def main_command(
    ctx: typer.Context,
    backend: Annotated[str, typer.Option(help="trt | ort | openvino | torch | all, or a comma list")] = "all",
    precision: Annotated[str, typer.Option(help="comma list of fp32, fp16, bf16, int8")] = ",".join(
        precision_table.NAMES),
    batch: Annotated[str, typer.Option(help="comma list of batch sizes")] = "1,8",
    variant: Annotated[str, typer.Option("--variant", "-v", help="variant to export when --artifacts "
                                         "has no export yet")] = "cvt-13",
    weights: Annotated[str | None, typer.Option(
        "--weights", "-w", help="[default: the artifact folder's, else random]")] = None,
    artifacts: Annotated[Path | None, typer.Option(
        help="artifact folder [default: artifacts/VARIANT]")] = None,
    dataset: Annotated[Path | None, typer.Option(
        help="image folder (ImageFolder with synset or index class folders gives accuracy); its "
        "calibration images are recognised, the rest split into selection and confirmation "
        "[default: the bundled evaluation set, 17 photographs in 10 views]")] = None,
    limit: Annotated[int | None, typer.Option(help="use N images spread over the set")] = None,
    warmup: Annotated[int, typer.Option(help="untimed calls per batch size")] = 3,
    iters: Annotated[int | None, typer.Option(help="timed calls per batch size (else --seconds)")] = None,
    seconds: Annotated[float, typer.Option(help="time budget per batch size")] = 2.0,
    threads: Annotated[int | None, typer.Option(help="CPU threads for every backend (>= 1)")] = None,
    out: Annotated[Path | None, typer.Option(
        help="report folder [default: ARTIFACTS/report]")] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="also write report.json here")] = None,
    budget: Annotated[list[str] | None, typer.Option(
        help='the recommendation\'s fidelity bound, repeatable: "cosine>=0.999", '
        '"top1-agreement>=0.99" [default: each precision\'s bounds]')] = None,
    verbose: VerboseOpt = False,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    budgets = parse_budgets(budget)
    setup_logging(verbose)
    from cvt_export.harness import bench as harness  # loads torch: after the options are parsed

    names = _backends(backend)
    folder = out or (artifacts or Path("artifacts") / variant) / "report"
    not_an_input(folder, "--out", {"--artifacts": artifacts, "--dataset": dataset})
    output_folder(folder)  # a report that cannot be written is refused now, not after the run
    if json_file:
        not_an_input(json_file, "--json", {"--artifacts": artifacts, "--dataset": dataset}, file=True)
        output_file(json_file, "--json")
    cfg = harness.BenchConfig(
        backends=names, precisions=_precisions(precision),
        batches=_csv_ints(batch, "--batch"), variant=variant, weights=weights, artifacts=artifacts,
        dataset=dataset, limit=limit, warmup=warmup, iters=iters, seconds=seconds, threads=threads,
        strict=backend != "all" and len(names) == 1)
    with status("preparing") as live:
        report = harness.run(cfg, progress=live.update)
    _recommend_and_write(report, budgets, folder, json_file)


def _recommend_and_write(report: BenchReport, budgets: list[metrics.Budget], folder: Path,
                         json_file: Path | None) -> None:
    """The recommendation added to the report, both written and shown (the Markdown also to a
    GitHub job summary)."""
    advice = recommend.recommend(report, budgets)
    report = dataclasses.replace(report, recommendation=advice)
    written = reports.write_all(report, folder)
    recommend.write(advice, folder / "recommendation.json")
    written.append(folder / "recommendation.json")
    if json_file:
        reports.write_json(report, json_file)
    show(report)
    _summary(render_report.markdown(report))  # the recommendation included
    for line in render_recommendation.console(advice):
        stdout.print(line)
    stdout.print("wrote " + ", ".join(str(p) for p in written))


@app.command()
@user_errors
def regress(
    baseline: Annotated[Path, typer.Option(help="baseline file")] = Path("reports/baseline/cvt-13.json"),
    update: Annotated[bool, typer.Option(
        help="rewrite the baseline deliberately, showing what moved")] = False,
    artifacts: Annotated[Path | None, typer.Option(
        help="use these artifacts [default: export into artifacts/regress-VARIANT, cached]")] = None,
    max_slowdown: Annotated[float | None, typer.Option(
        help="fail when a median latency exceeds this multiple of the baseline's")] = None,
    iters: Annotated[int, typer.Option(help="timed calls per batch size")] = 5,
    backend: Annotated[str, typer.Option(
        help="trt | ort | openvino | torch | all, or a comma list; baseline entries not asked for "
             "are listed as not run")] = "all",
    precision: Annotated[str, typer.Option(help="comma list of fp32, fp16, bf16, int8")] = ",".join(
        precision_table.NAMES),
    out: Annotated[Path | None, typer.Option(help="also write the run's report folder here")] = None,
    json_file: Annotated[Path | None, typer.Option(
        "--json", help="also write the verdict, exit code and findings here as JSON (schema "
        "cvt-regress-result/1)")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Compare today's artifacts and backends with a committed baseline; exit 1 on a regression
    (or a backend that no longer runs), 2 on bad input.

    Examples: `cvt-bench regress`; `cvt-bench regress --artifacts my-export/ --max-slowdown 1.3`;
    `cvt-bench regress --json gate.json` (the verdict and findings for a machine);
    `cvt-bench regress --update` (rewrites the baseline, showing what moved).
    """
    setup_logging(verbose)
    from cvt_export import regress as gate
    from cvt_export.harness import bench as harness

    if max_slowdown is not None and not 1 < max_slowdown < float("inf"):  # NaN fails it too
        raise CvtError(f"--max-slowdown {max_slowdown}: must be > 1")
    if iters < 1:
        raise CvtError(f"--iters {iters}: must be >= 1")
    _regress_files(baseline, artifacts, out, json_file, update)
    names = _backends(backend)
    harness.BenchConfig(backends=names, precisions=_precisions(precision)).check()
    with status("regression run") as live:
        outcome = gate.run(baseline, update=update, artifacts_dir=artifacts, max_slowdown=max_slowdown,
                           iters=iters, backends=names, precisions=_precisions(precision),
                           progress=lambda text: live.update(f"regression run: {text}"))
    if out:
        reports.write_all(outcome.report, out)
    _show_outcome(outcome, baseline)
    if json_file:
        reports.write_json(gate.result(outcome, baseline), json_file)
    if outcome.updated:
        moved = "what moved is listed above" if outcome.findings else "nothing moved beyond tolerance"
        stdout.print(f"[green]baseline written: {baseline}[/] ({moved})")
        return
    failures = [f for f in outcome.findings if f.kind == "fail"]
    changes = [f for f in outcome.findings if f.kind == "change"]
    if not outcome.findings:
        stdout.print(f"[green]regression check passed[/] against {baseline}")
        return
    stdout.print(f"[red]regression check failed[/]: {len(failures)} regression(s), {len(changes)} "
                 "unreviewed change(s); if intended, run `cvt-bench regress --update` and commit the "
                 "baseline")
    raise typer.Exit(1)


def _regress_files(baseline: Path, artifacts: Path | None, out: Path | None, json_file: Path | None,
                   update: bool) -> None:
    """What regress reads and writes: the baseline readable (unless --update makes it), each output
    never one of its inputs and where it can be written; all before the run starts."""
    from cvt_export import regress as gate

    gate.baseline_for(baseline, update)  # a missing or unreadable one is refused here, in one line
    inputs = {"--baseline": baseline, "--artifacts": artifacts}
    if out:
        not_an_input(out, "--out", inputs)
        output_folder(out)
    if update:
        output_folder(baseline.parent, "--baseline's folder")
    if json_file:
        not_an_input(json_file, "--json", inputs, file=True)
        output_file(json_file, "--json")


def _show_outcome(outcome: Outcome, baseline: Path) -> None:
    """Each information line and finding on the console (findings also as GitHub annotations),
    and the Markdown summary where the CI shows one."""
    from cvt_export import regress as gate

    for line in outcome.info:
        stdout.print(f"[dim]{line}[/]", highlight=False)
    for f in outcome.findings:
        style = "red" if f.kind == "fail" else "yellow"
        stdout.print(f"[{style}]{f}[/]", highlight=False, soft_wrap=True)
        github.annotate("error", f"cvt-bench regress: {'FAIL' if f.kind == 'fail' else 'CHANGED'} {f.what}",
                        f"{f}" + ("" if outcome.updated else " (if intended: cvt-bench regress --update)"))
    _summary(render_regress.markdown(gate.result(outcome, baseline)))


@app.command()
@user_errors
def accuracy(
    dataset: Annotated[Path, typer.Option(
        help="image folder (ImageFolder class folders named after the model's labels, synsets or "
        "indices give accuracy; any other folder gives agreement with the reference)")],
    artifacts: Annotated[Path, typer.Option(help="artifact folder")] = Path("artifacts/cvt-13"),
    backend: Annotated[str, typer.Option(help="ort | openvino | torch | trt | all, or a comma list")] = "ort",
    precision: Annotated[str, typer.Option(help="comma list of precisions")] = "fp32,int8",
    batch: Annotated[int, typer.Option(help="images per batch, every row")] = 16,
    workers: Annotated[int, typer.Option(help="decode processes (0: decode in this process)")] = 1,
    shard_size: Annotated[int, typer.Option(
        help="images per shard, on average (what a re-run redoes)")] = 256,
    reference_cache: Annotated[Path | None, typer.Option(
        help="SQLite file of the reference's outputs, shared between runs and artifact folders of "
        "the same model [default: OUT/reference-cache.sqlite]")] = None,
    limit: Annotated[int | None, typer.Option(help="use N images spread over the folder")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for every backend (>= 1)")] = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", help="run the shards on this Ray cluster (an address such as 10.0.0.5:6379, or "
        "'auto'); the dataset and artifact folder must be at the same paths on every node")] = None,
    out: Annotated[Path | None, typer.Option(
        help="folder for accuracy.json/.md/.png and the per-image shards "
        "[default: ARTIFACTS/accuracy]")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Accuracy on a whole validation set: every image decoded once (in worker processes) and run
    through the PyTorch reference and every row; per-image results in shards beside the report.
    Memory stays flat whatever the folder's size; the same command after a crash or Ctrl-C goes on
    from the finished shards; the reference's outputs are cached by model, preprocessing and image.

    Examples: cvt-bench accuracy --dataset ~/imagenet/val --artifacts artifacts/cvt-13;
    cvt-bench accuracy --dataset ~/val --backend ort,openvino --precision fp32,int8 --workers 4
    """
    setup_logging(verbose)
    names = _backends(backend)
    precisions = _precisions(precision)
    where = out or artifacts / "accuracy"
    _accuracy_paths(dataset, artifacts, where, reference_cache,
                    "--out" if out else "the default --out (ARTIFACTS/accuracy)")
    folder = ArtifactFolder.open(artifacts)
    from cvt_export.backends import get_backend
    from cvt_export.harness import accuracy as acc

    for name in names:
        get_backend(name)  # an unknown name fails before any work
    rows = tuple((get_backend(b).name, p) for b in names for p in precisions)
    cfg = acc.PassConfig(dataset, where, rows, batch=batch, workers=workers, shard_size=shard_size,
                         reference_cache=reference_cache, limit=limit, threads=threads)
    cfg.check()
    report = _accuracy_pass(cfg, folder, ray)
    written = reports.write_accuracy(report, where)
    for line in render_accuracy.markdown(report).splitlines()[2:]:
        stdout.print(line, highlight=False, soft_wrap=True)
    stdout.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


def _accuracy_pass(cfg: PassConfig, folder: ArtifactFolder, ray: str | None) -> AccuracyReport:
    """The pass, here or on a Ray cluster, with a progress line every 5 s at most (CI logs); on
    Ctrl-C or SIGTERM, one line saying what is kept."""
    from cvt_export.harness import accuracy as acc

    with status("accuracy pass") as live:
        shown = [0.0]

        def show_progress(p: acc.Progress) -> None:
            now = time.monotonic()
            if now - shown[0] >= 5 or p.images == p.total:
                shown[0] = now
                rate = p.images / max(1e-9, now - p.started)
                live.update(f"accuracy pass ({p.images}/{p.total}) {rate:.1f} images/s")

        if ray is not None:
            from cvt_export.harness import cluster

            return cluster.run(cfg, folder, ray, show_progress)
        try:
            return acc.run(cfg, folder, show_progress)  # holds the folder's lock while compiling
        except KeyboardInterrupt:
            where = cfg.out
            done = len(list((where / acc.SHARDS).glob("*/images.json")))
            kept = (f"{done} shard(s) finished in {where}; the same command goes on from them" if done
                    else f"no shard finished yet; the same command starts again ({where})")
            stderr.print(f"interrupted: {kept}", highlight=False)
            raise


def _accuracy_paths(dataset: Path, artifacts: Path, out: Path, cache: Path | None,
                    label: str = "--out") -> None:
    """Refuse outputs that would land among the inputs: shards or plots inside the image folder
    (the next run would read them as images), the report into the export's root, a cache that is
    a folder."""
    if not dataset.is_dir():
        raise CvtError(f"--dataset {dataset}: no such folder")
    resolved = out.resolve()
    if resolved == dataset.resolve() or dataset.resolve() in resolved.parents:
        raise CvtError(f"{label} {out}: inside --dataset {dataset}; choose a folder outside it")
    not_an_input(out, label, {"--artifacts": artifacts})
    output_folder(out, label)
    if cache is not None:
        if cache.is_dir():
            raise CvtError(f"--reference-cache {cache}: is a folder; give a file name")
        if dataset.resolve() in cache.resolve().parents:
            raise CvtError(f"--reference-cache {cache}: inside --dataset {dataset}; choose a file outside it")


@app.command()
@user_errors
def profile(
    artifacts: Annotated[Path, typer.Option(help="artifact folder")] = Path("artifacts/cvt-13"),
    backend: Annotated[str, typer.Option(help="ort | openvino")] = "ort",
    precision: Annotated[str, typer.Option(help="one of the backend's precisions")] = "int8",
    batch: Annotated[str, typer.Option(help="comma list of batch sizes")] = "1,8",
    runs: Annotated[int, typer.Option(help="profiled inferences per batch size (after 2 untimed)")] = 20,
    threads: Annotated[int | None, typer.Option(help="CPU threads (>= 1)")] = None,
    out: Annotated[Path | None, typer.Option(
        help="folder for profile-BACKEND-PRECISION.json/.md/.png [default: ARTIFACTS/report]")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Where the time goes: each operator's time from the runtime's own counters (ONNX Runtime's
    profiler, OpenVINO's performance counters), grouped by operator type with the GEMM share, by
    block and by the precision each kernel ran in; printed and written next to the report.

    Examples: cvt-bench profile --backend ort --precision int8 --batch 1,8;
    cvt-bench profile --artifacts artifacts/mine --backend openvino --precision fp32 --runs 50
    """
    setup_logging(verbose)
    batches = _csv_ints(batch, "--batch")
    if runs < 1 or not batches or min(batches) < 1:
        raise CvtError("--runs and every --batch must be >= 1")
    folder = ArtifactFolder.open(artifacts)
    where = out or artifacts / "report"
    label = "--out" if out else "the default --out (ARTIFACTS/report)"
    not_an_input(where, label, {"--artifacts": artifacts})
    output_folder(where, label)
    from cvt_export.harness import profile as profiling

    with status("profile") as live:
        report = profiling.run(folder, backend, precision, batches, runs, threads, progress=live.update)
    written = profiling.write(report, where)
    for b, f in report.batches.items():
        table = Table(title=f"{report.backend} {report.precision} (runs as {report.executed}), "
                      f"batch {b}: inference {f.run_ms:.1f} ms, operators {f.kernels_ms:.1f} ms, "
                      f"GEMM {100 * f.gemm_share:.1f}%", title_justify="left")
        for col in ("group", "ms", "share", "nodes", "ran in"):
            table.add_column(col, justify="left" if col in ("group", "ran in") else "right")
        for g in f.by_op[:10]:
            table.add_row(g.group, f"{g.ms:.2f}", f"{100 * g.share:.1f}%", str(g.nodes),
                          ", ".join(sorted(g.precisions, key=lambda p: -g.precisions[p])))
        show_table(table)
        stdout.print(f"costliest non-GEMM groups: {', '.join(f.top_non_gemm)}", highlight=False)
        work, rate = report.gemm_macs_per_image / 1e9, report.gemm_limit.gmac_per_s
        conv = (report.conv_macs_per_image or 0.0) / 1e9
        stdout.print(f"GEMM floor {f.gemm_floor_ms:.1f} ms ({work:.2f} GMAC per image at {rate:.1f} "
                     f"GMAC/s, measured in this run): the GEMMs took {f.gemm_vs_floor:.2f}x it; with the "
                     f"convolutions' {conv:.2f} GMAC, {f.floor_ms or 0.0:.1f} ms: "
                     f"the whole inference {f.run_vs_floor:.2f}x", highlight=False)
        stdout.print("each stage's GEMMs against their own floor: " + ", ".join(
            f"{st} {x:.2f}x" for st, x in f.stage_gemm_vs_floor().items()), highlight=False)
    stdout.print("wrote " + ", ".join(str(p) for p in written), highlight=False)


@app.command()
@user_errors
def triton(
    url: Annotated[str, typer.Option(help="HOST:PORT of the server (HTTP or gRPC port per --protocol)")],
    model: Annotated[str, typer.Option(help="the classifier model taking pixel_values")] = "cvt",
    artifacts: Annotated[Path, typer.Option(
        help="the artifact folder the served model was made from (its reference and bounds)")] = Path(
        "artifacts/cvt-13"),
    precision: Annotated[str | None, typer.Option(
        help="the served precision, whose bounds apply [default: what the model's config says, else fp32]")
    ] = None,
    protocol: Annotated[str, typer.Option(help="http | grpc")] = "http",
    concurrency: Annotated[str, typer.Option(
        help="closed loop: comma list of concurrent clients")] = "1,4,16",
    rate: Annotated[str | None, typer.Option(
        help="open loop instead: comma list of request rates per second (Poisson arrivals)")] = None,
    requests: Annotated[int, typer.Option(help="requests per load level")] = 200,
    json_file: Annotated[Path | None, typer.Option("--json", help="also write the figures here")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Measure a model served by Triton like a backend: the bundled photos' logits against the PyTorch
    reference, client latency p50/p90/p99 (with their spread over 5 windows) and throughput per load
    level, and Triton's statistics (queue vs compute time, executed batch sizes). Exit 1 when the
    served answers are outside the precision's bounds; 2 on bad input or failed requests.

    Examples: cvt-bench triton --url 127.0.0.1:8000 --model cvt-classifier --concurrency 1,8;
    cvt-bench triton --url 127.0.0.1:8000 --rate 5,10,20 --requests 400
    """
    setup_logging(verbose)
    from cvt_export.harness.served import Target, bench_served

    if requests < 1:
        raise CvtError(f"--requests {requests}: must be >= 1")
    loads = _loads(concurrency, rate)
    if protocol not in ("http", "grpc"):
        raise CvtError(f"--protocol {protocol!r}: use http or grpc")
    if json_file:
        output_file(json_file, "--json")
    if precision is not None:
        precision = precision_table.parse_one(precision)
    folder = ArtifactFolder.open(artifacts)
    with status(f"measuring {model} at {url}"):
        report = bench_served(Target(url, model, protocol), folder, precision, loads, requests)
    if json_file:
        reports.write_json(report, json_file)
    served = ServedReport.from_json(report.to_json())  # what the file says, read as every reader reads it
    _show_served(served, model, protocol)
    if served.failed_at:
        raise CvtError(_served_failures(served))
    if not served.fidelity.passed:
        raise typer.Exit(1)


def _loads(concurrency: str, rate: str | None) -> tuple[LoadSpec, ...]:
    """--rate (open loop) or else --concurrency (closed loop), as load levels."""
    from cvt_export.records import LoadSpec

    if rate is not None:
        try:
            rates = tuple(float(v) for v in rate.split(",") if v.strip())
        except ValueError:
            raise CvtError(f"--rate {rate!r}: use comma-separated numbers (requests per second)") from None
        if not rates or not all(0 < r <= 10_000 for r in rates):  # NaN fails it too
            raise CvtError(f"--rate {rate!r}: each rate in (0, 10000] requests per second")
        return tuple(LoadSpec("rate", r) for r in rates)
    levels = _csv_ints(concurrency, "--concurrency")
    if not levels or min(levels) < 1 or max(levels) > 256:
        raise CvtError(f"--concurrency {concurrency!r}: each 1..256")
    return tuple(LoadSpec("concurrency", c) for c in levels)


def _show_served(report: ServedReport, model: str, protocol: str) -> None:
    fid = report.fidelity
    stdout.print(f"fidelity of the served {report.precision} vs PyTorch FP32 (n={fid.n} photos): worst "
                 f"cosine {fid.cosine_min:.5f}, max-abs {fid.max_abs:.3g}, top-1 "
                 f"{100 * fid.top1_agreement:.0f}% — "
                 + ("within bounds" if fid.passed else "OUTSIDE bounds: " + "; ".join(fid.broken)))
    table = Table(title=f"{model} over {protocol} ({report.machine.cpu})", title_justify="left")
    for col in ("load", "answered", "img/s", "p50 ms", "p90 ms", "p99 ms", "p99 over windows", "stable",
                "executed batches", "queue ms", "compute ms"):
        table.add_column(col, justify="right")
    for r in report.runs:
        lat, srv, spread = r.latency_ms, r.server, r.spread_ms.p99_ms if r.spread_ms else (0.0, 0.0)
        table.add_row(r.label, f"{r.answered_of_sent[0]}/{r.requests}", f"{r.images_per_s:.1f}",
                      *((f"{lat.median_ms:.1f}", f"{lat.p90_ms:.1f}", f"{lat.p99_ms:.1f}",
                         "{:.1f}–{:.1f}".format(*spread), "yes" if r.stable else "no")
                        if lat else ("", "", "", "", "")),
                      ", ".join(f"{b}×{n}" for b, n in srv.executed_batches.items()) if srv else "",
                      f"{srv.queue_ms_per_request:.1f}" if srv else "",
                      f"{srv.compute_ms_per_request:.1f}" if srv else "")
    show_table(table)
    for r in report.runs:
        if r.server_unavailable:
            stdout.print(f"{r.label}: no Triton statistics: {r.server_unavailable}", highlight=False)


def _served_failures(report: ServedReport) -> str:
    """The error line of a run whose requests failed: how many of those sent, and those never sent."""
    from cvt_export.harness.served import GIVE_UP_AFTER

    last = report.runs[-1]
    errors = ", ".join(f"{e} ×{n}" for e, n in last.errors.items())
    unsent = (f"; {last.not_sent} of the {last.requests} were never sent (the run stops after "
              f"{GIVE_UP_AFTER} failures)" if last.not_sent else "")
    return (f"{last.failed} of {last.answered_of_sent[1]} requests sent failed at {report.failed_at} "
            f"(measured, not retried){unsent}: {errors}")


def show(report: BenchReport) -> None:
    table = Table(title="cvt-bench (speed-up vs torch fp32 eager, same run)", title_justify="left")
    batches = report.batches
    for col in ("backend", "prec", *[f"b{b} ms" for b in batches], *[f"b{b} img/s" for b in batches],
                f"×b{batches[-1]}", f"b{batches[-1]} ×floor", "cos min", "top-1", "runs as"):
        # "runs as" may be long ("fp16 (CPU EP casts to fp32 where it lacks fp16 kernels)"): it
        # wraps in its cell on a narrow terminal and is never cut with an ellipsis
        table.add_column(col, justify="left" if col in ("backend", "prec", "runs as") else "right",
                         no_wrap=col != "runs as", overflow="fold")
    for r in report.ran:
        lat, fid = r.latency, r.fidelity
        times = r.floor.times.get(batches[-1]) if r.floor else None
        table.add_row(r.backend, r.precision,
                      *[f"{lat[b].median_ms:.1f}" for b in batches],
                      *[f"{lat[b].images_per_s:.1f}" for b in batches],
                      f"{r.speedup.get(batches[-1], 0):.2f}",
                      "–" if times is None else f"{times:.2f}", f"{fid.cosine_min if fid else 1.0:.5f}",
                      f"{100 * (fid.top1_agreement if fid else 1.0):.0f}%", r.executed)
    show_table(table)
    not_run: dict[tuple[str, str], list[str]] = {}
    for r in report.results:
        if not r.ok:
            not_run.setdefault((r.status, r.reason), []).append(r.name)
    for (state, reason), runs in not_run.items():
        style, label = ("red", "error") if state == "error" else ("dim", "not run")
        stdout.print(f"[{style}]{label}: {', '.join(runs)}: {reason}[/]", highlight=False, soft_wrap=True)


def _summary(markdown: str) -> None:
    """In GitHub Actions, the Markdown goes to the job summary too."""
    warning = github.summary(markdown)
    if warning:
        stderr.print(warning, highlight=False, soft_wrap=True)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

