"""`cvt-export`: export to ONNX (FP32/FP16/INT8), predict with the reference model, list variants."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

import cvt_ref
from cvt_export import precisions as precision_table
from cvt_export.artifacts import ArtifactFolder
from cvt_export.backends import all_backends, tuned_name
from cvt_export.cli.common import (
    VerboseOpt,
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
from cvt_export.options import CALIB_METHODS, DEFAULT_OPSET, SMOOTH_CHOICES, ExportOptions, Int8Options
from cvt_export.records import FileEntry, TuneDecisions, Validation, as_json
from cvt_export.render import tune as render_tune
from cvt_ref.errors import CvtError

if TYPE_CHECKING:
    from cvt_export.build import BuildResult

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export CvT to ONNX / TensorRT / OpenVINO, and check what it computes.")

VariantOpt = Annotated[str, typer.Option("--variant", "-v", help="cvt-13, cvt-21-384, ...")]
WeightsOpt = Annotated[str, typer.Option(
    "--weights", "-w",
    help="random[:SEED], a transformers folder, a .safetensors/.bin/.pth file, or a hub id")]


@app.command()
@user_errors
def predict(
    images: Annotated[list[Path] | None, typer.Argument(
        help="image files; none = the bundled photographs", show_default=False)] = None,
    variant: VariantOpt = "cvt-13",
    weights: WeightsOpt = "random",
    activation: Annotated[str | None, typer.Option(
        help="gelu | quick_gelu; default: what the checkpoint was trained with")] = None,
    top: Annotated[int, typer.Option(min=1, max=1000, help="classes shown per image")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Top-k classes for each image (the checkpoint's own labels), from the PyTorch reference model.

    Examples:

      cvt-export predict photo.jpg --weights microsoft/cvt-13 --top 3

      cvt-export predict a.jpg b.png --weights ./my-finetuned-cvt --json
    """
    import torch

    setup_logging(verbose)
    paths = images or cvt_ref.bundled_photos()
    batch = cvt_ref.preprocess_batch(list(paths), variant)  # reads every image before the model
    model = cvt_ref.create_model(variant, weights, activation=activation)  # type: ignore[arg-type]
    names = cvt_ref.class_names(model.variant.num_classes,
                                model.weights.id2label if model.weights else None)
    with torch.inference_mode():
        probs = model(batch).softmax(-1)
    values, indices = probs.topk(min(top, len(names)), dim=-1)
    tops = [[(int(i), names[int(i)], float(v)) for v, i in zip(vs, ix, strict=True)]
            for vs, ix in zip(values, indices, strict=True)]
    if as_json:
        results = [{"image": str(p), "top": [{"class": c, "label": label, "prob": prob}
                                             for c, label, prob in top_k]}
                   for p, top_k in zip(paths, tops, strict=True)]
        stdout.print_json(json.dumps({"variant": variant, "weights": weights,
                                      "activation": model.activation, "results": results}))
        return
    if model.weights and model.weights.kind == "random":
        stdout.print(f"[yellow]weights are {weights}: the classes below are meaningless[/]")
    for path, top_k in zip(paths, tops, strict=True):
        table = Table(title=str(path), title_justify="left")
        for col in ("#", "prob", "class"):
            table.add_column(col, justify="right")
        table.add_column("label")
        for rank, (c, label, prob) in enumerate(top_k, 1):
            table.add_row(str(rank), f"{100 * prob:.2f}%", str(c), label)
        show_table(table)

@app.command()
@user_errors
def onnx(
    variant: VariantOpt = "cvt-13",
    weights: WeightsOpt = "random",
    out: Annotated[Path | None, typer.Option(help="artifact folder [default: artifacts/VARIANT]")] = None,
    precision: Annotated[str, typer.Option(
        help="comma-separated: fp32 (always made), fp16, int8, int8dyn (dynamic INT8: no calibration, "
        "ONNX Runtime only)")] = "fp32",
    image_size: Annotated[int | None, typer.Option(help="input side [default: the variant's]")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset, >= 17")] = DEFAULT_OPSET,
    batch: Annotated[str, typer.Option(help="'dynamic' or a fixed batch size")] = "dynamic",
    activation: Annotated[str | None, typer.Option(help="gelu | quick_gelu")] = None,
    calib: Annotated[Path | None, typer.Option(
        help="INT8 calibration image folder [default: half of the bundled photos]")] = None,
    calib_size: Annotated[int | None, typer.Option(help="calibrate on N images spread over --calib")] = None,
    calib_method: Annotated[str, typer.Option(help="minmax | entropy | percentile")] = "minmax",
    smooth: Annotated[str, typer.Option(
        help="INT8: SmoothQuant migration strength, the share of each activation channel's range "
        "moved into the weights: auto (chosen among off, 0.25, 0.5, 0.75 on the selection images), "
        "off, or a number in [0, 1]")] = "auto",
    no_smooth: Annotated[bool, typer.Option("--no-smooth", help="INT8: no SmoothQuant migration")] = False,
    force: Annotated[bool, typer.Option(
        help="replace an export of another source (weights, variant, size...) in --out")] = False,
    outliers: Annotated[int, typer.Option(
        min=0, help="stress test: give K channels per LayerNorm/v output in a third of the blocks "
        "a 10-100x range, as trained models have; the logits do not change")] = 0,
    outlier_seed: Annotated[int, typer.Option(min=0, help="which blocks and channels --outliers picks")] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Export to ONNX (FP32, and FP16 / INT8 on request), validate, and write a manifest.

    Examples:

      cvt-export onnx --variant cvt-13 --weights microsoft/cvt-13 --precision fp32,fp16,int8

      cvt-export onnx --weights ./my-finetuned-cvt --image-size 160 --calib ~/calib --out artifacts/mine

      cvt-export onnx --weights random:0 --outliers 4 --precision int8 --out artifacts/stressed
    """
    setup_logging(verbose)
    if calib_method not in CALIB_METHODS:
        raise CvtError(f"--calib-method {calib_method!r}: use {', '.join(CALIB_METHODS)}")
    fixed = None if batch == "dynamic" else _fixed_batch(batch)
    precisions = precision_table.parse(precision, precision_table.EXPORTED)
    strength, search = smooth_option("off" if no_smooth else smooth)
    from cvt_export.build import BuildRequest, build  # loads torch: after the options are checked

    req = BuildRequest(
        variant=variant, weights=weights, activation=activation,  # type: ignore[arg-type]
        options=ExportOptions(opset=opset, batch=fixed, image_size=image_size),
        precisions=precisions, calib=calib, calib_size=calib_size,
        int8=Int8Options(method=calib_method, smooth=strength), smooth_search=search, force=force,
        outliers=outliers, outlier_seed=outlier_seed)
    folder = out or Path("artifacts") / variant
    with status("starting") as live:
        result = build(req, folder, step=lambda text: live.update(text))
    for warning in result.warnings:
        stderr.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    _show_export(folder, weights, result)


def _fixed_batch(batch: str) -> int:
    if not batch.isdigit():
        raise CvtError(f"--batch {batch!r}: use 'dynamic' or a positive integer")
    return int(batch)


def _fidelity_shown(entry: FileEntry) -> str:
    """A file's fidelity at export: max-abs per batch for the reference's exact math, else cosine,
    top-1 and max-abs on the named photos."""
    val = entry.validation or Validation()
    if precision_table.get(entry.precision).exact:
        per_batch = val.max_abs if isinstance(val.max_abs, dict) else {}
        return "max-abs " + ", ".join(f"{v:.1e} ({k})" for k, v in per_batch.items())
    worst = val.max_abs if isinstance(val.max_abs, float) else 0.0
    cosine = val.cosine_min if val.cosine_min is not None else float("nan")
    return (f"cosine {cosine:.5f}, top-1 {100 * (val.top1_agreement or 0):.0f}%, max-abs {worst:.1e}\n"
            f"[dim]on {val.on or ''}[/]")


def _show_export(folder: Path, weights: str, result: BuildResult) -> None:
    """The folder's files: size, fidelity against PyTorch, made or reused; and the calibration's fate."""
    made = ArtifactFolder.open(folder)
    table = Table(title=f"{folder}  ({made.variant_name}, weights {weights})", title_justify="left")
    for col in ("file", "MB", "vs PyTorch FP32 (ONNX Runtime CPU)", "state"):
        table.add_column(col)
    for name, entry in made.files().items():
        table.add_row(name, f"{(entry.bytes or 0) / 1e6:.1f}", _fidelity_shown(entry),
                      "reused" if name in result.reused else "made")
    show_table(table)
    if result.calibrated is not None:
        how = "computed and cached" if result.calibrated else "reused from cache"
        stdout.print(f"INT8 calibration: {how}")


ArtifactsOpt = Annotated[Path, typer.Option("--artifacts", "-a", help="folder made by `cvt-export onnx`")]


@app.command()
def backends() -> None:
    """Each backend, whether it can run here, and why not.

    Example: cvt-export backends
    """
    table = Table()
    for col in ("backend", "precisions", "available", "details"):
        table.add_column(col)
    for backend in all_backends():
        ok, why = backend.available()
        table.add_row(backend.name, ", ".join(backend.precisions),
                      "[green]yes[/]" if ok else "[red]no[/]", why)
    show_table(table)


@app.command()
@user_errors
def openvino(
    artifacts: ArtifactsOpt = Path("artifacts/cvt-13"),
    precision: Annotated[str, typer.Option(help="comma-separated: fp32, fp16, int8, mixed")] = "fp32",
    int8_source: Annotated[str, typer.Option(
        help="qdq: the Q/DQ ONNX as it is; nncf: NNCF PTQ on the export's calibration images")] = "qdq",
    verbose: VerboseOpt = False,
) -> None:
    """Write OpenVINO IR (openvino/model.*.xml/.bin) from the ONNX artifacts.

    Examples:

      cvt-export openvino --artifacts artifacts/cvt-13 --precision fp32,int8

      cvt-export openvino --precision int8 --int8-source nncf
    """
    setup_logging(verbose)
    from cvt_export.backends import openvino as ov_backend

    folder = ArtifactFolder.open(artifacts)  # a crafted or unfinished folder is refused first
    ok, why = ov_backend.BACKEND.available()
    if not ok:
        raise CvtError(f"openvino: {why}")
    if int8_source not in ov_backend.INT8_SOURCES:
        raise CvtError(f"--int8-source {int8_source!r}: use {', '.join(ov_backend.INT8_SOURCES)}")
    for prec in precision_table.parse(precision, ov_backend.BACKEND.precisions):
        with status(f"OpenVINO IR {prec}"):
            path = ov_backend.make_ir(folder, prec, int8_source)
        stdout.print(f"{prec}: {path} ({path.with_suffix('.bin').stat().st_size / 1e6:.1f} MB weights)")


def smooth_option(text: str) -> tuple[float | None, tuple[float | None, ...]]:
    """--smooth auto | off | A -> (the strength, the choices to search; empty: none)."""
    value = text.strip().lower()
    if value == "auto":
        return 0.5, SMOOTH_CHOICES
    if value in ("off", "none"):
        return None, ()
    try:
        strength = float(value)
    except ValueError:
        strength = float("nan")
    if not 0.0 <= strength <= 1.0:
        raise CvtError(f"--smooth {text!r}: use auto, off, or a strength between 0 and 1 (e.g. 0.5)")
    return strength, ()


@app.command()
@user_errors
def tune(
    artifacts: ArtifactsOpt = Path("artifacts/cvt-13"),
    backend: Annotated[str, typer.Option(
        help="ort | openvino: where candidates run and are timed")] = "openvino",
    budget: Annotated[list[str] | None, typer.Option(
        help='fidelity bound on held-out images, repeatable: "cosine>=0.999", '
        '"top1-agreement>=0.99", "top1-drop<=0.5" (needs --dataset)')] = None,
    objective: Annotated[str, typer.Option(help="latency-b1 | throughput-b8")] = "throughput-b8",
    dataset: Annotated[Path | None, typer.Option(
        help="images to decide and confirm on (ImageFolder with class folders gives top1-drop); "
        "calibration images are recognised and left out, the rest split into selection and "
        "confirmation [default: the bundled evaluation set]")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="use N images spread over the set")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for the backend")] = None,
    seconds: Annotated[float, typer.Option(help="timing budget per configuration in the final, "
                                                "interleaved comparison")] = 2.0,
    margin: Annotated[float, typer.Option(
        help="headroom: a share of what the budget allows to be lost (0.2 asks cosine>=0.9995 "
        "for 0.9996 on selection and confirmation)")] = 0.0,
    verbose: VerboseOpt = False,
) -> None:
    """Fastest INT8/float mix within a fidelity budget: writes model.mixed.onnx, tune.md, tune.json.

    Per-block sensitivity (one block in INT8 at a time) on the selection images, then a greedy
    search that keeps the most sensitive blocks in float until the budget holds on the selection
    and on the confirmation images, then a short refinement (the costliest kept block back to
    INT8, or a cheaper one in its place). Every candidate is built and run on the backend; the
    configurations within the budget are timed in interleaved rounds, and one is called faster
    only when the 95% intervals of the medians separate.

    Examples:

      cvt-export tune --artifacts artifacts/cvt-13 --backend openvino --budget "cosine>=0.9995"

      cvt-export tune --backend ort --budget "top1-drop<=0.5" --dataset ~/val --objective latency-b1
    """
    setup_logging(verbose)
    budgets = parse_budgets(budget)
    tuned_name(backend)  # a backend tune does not drive is refused before torch loads
    folder = ArtifactFolder.open(artifacts)
    from cvt_export import tune as tuning  # loads torch: after the options and the folder are checked
    from cvt_export.artifacts import atomic_write

    with folder.lock(), status("tune") as live:  # one writer from the first step to the reports
        result = tuning.tune(folder, backend, budgets, objective, dataset=dataset, limit=limit,
                             threads=threads, seconds=seconds, margin=margin,
                             step=lambda text: live.update(text))
        decisions = tuning.summary(result)
        atomic_write(folder.file("tune.md"), render_tune.markdown(decisions))
        atomic_write(folder.file("tune.json"), json.dumps(as_json(decisions), indent=2) + "\n")
    _show_tune(decisions, artifacts)
    if result.mixed_written:
        stdout.print(f"wrote {artifacts / 'model.mixed.onnx'}; decisions in manifest.json and "
                     f"{artifacts / 'tune.md'}")


def _show_tune(d: TuneDecisions, artifacts: Path) -> None:
    table = Table(title=f"{artifacts}: {d.backend}, {d.objective}, budget "
                  f"{', '.join(d.budget)}{f' margin {d.margin:g}' if d.margin else ''} on "
                  f"{d.held_out}", title_justify="left")
    for col in ("configuration", "float blocks", "selection cosine", "confirmation cosine", "within",
                "median ms [95%]", "img/s"):
        table.add_column(col)
    for c in d.configs:
        table.add_row(c.name + (" (chosen)" if c.name == d.chosen else ""),
                      str(len(c.float_blocks)) if c.float_blocks else "–",
                      f"{c.fidelity.cosine_min:.6f}", f"{c.confirmation.cosine_min:.6f}",
                      "yes" if c.within_budget else "no",
                      (f"{c.speed.median_ms:.1f} [{c.speed.interval[0]:.1f}, {c.speed.interval[1]:.1f}]")
                      if c.speed else "–",
                      f"{c.speed.images_per_s:.1f}" if c.speed else "–")
    show_table(table)
    stdout.print(d.message)


@app.command()
@user_errors
def trt(
    artifacts: ArtifactsOpt = Path("artifacts/cvt-13"),
    precision: Annotated[str, typer.Option(help="comma-separated: fp32, fp16, int8, mixed")] = "fp16",
    min_batch: Annotated[int, typer.Option(help="smallest batch of the optimization profile")] = 1,
    opt_batch: Annotated[int | None, typer.Option(
        help="batch TensorRT tunes for [default: 8, or --max-batch if smaller]")] = None,
    max_batch: Annotated[int, typer.Option(help="largest batch of the profile")] = 32,
    workspace: Annotated[float | None, typer.Option(help="builder workspace limit, GiB")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Build (or reuse) TensorRT engines from the ONNX artifacts: strongly typed, cached.

    Example: cvt-export trt --artifacts artifacts/cvt-13 --precision fp16,int8 --max-batch 64
    """
    setup_logging(verbose)
    from cvt_export.backends import tensorrt as trt_backend

    folder = ArtifactFolder.open(artifacts)  # a crafted or unfinished folder is refused first
    ok, why = trt_backend.BACKEND.available()
    if not ok:
        raise CvtError(f"tensorrt: {why}")
    opts = trt_backend.BuildOptions.up_to(max_batch, opt_batch, min_batch, workspace)
    opts.check()
    for prec in precision_table.parse(precision, trt_backend.BACKEND.precisions):
        with status(f"TensorRT engine {prec}"):
            path, _, meta = trt_backend.engine_file(folder, prec, opts)
        stdout.print(f"{prec}: {path} (TensorRT {meta.tensorrt}, {meta.gpu})")


@app.command()
@user_errors
def triton(
    artifacts: ArtifactsOpt = Path("artifacts/cvt-13"),
    out: Annotated[Path, typer.Option(help="model repository folder (created; other models kept)")] = Path(
        "triton-repo"),
    name: Annotated[str, typer.Option(help="model name clients call")] = "cvt",
    precision: Annotated[str, typer.Option(
        help="fp32 | fp16 | bf16 | int8 (bf16: python runtime with --python-backend openvino)")] = "fp32",
    runtime: Annotated[str, typer.Option(
        help="python (this project's runner inside Triton; runs on a CPU-only host) | onnxruntime | "
             "openvino | tensorrt (native Triton backends)")] = "python",
    python_backend: Annotated[str, typer.Option(
        help="runner the python runtime uses: ort | openvino")] = "ort",
    max_batch: Annotated[int, typer.Option(help="max_batch_size (dynamic batching up to it)")] = 32,
    instances: Annotated[int, typer.Option(help="model instances (instance_group count)")] = 1,
    gpu: Annotated[bool, typer.Option(help="KIND_GPU instances (native runtimes on a GPU host)")] = False,
    accelerator: Annotated[str | None, typer.Option(
        help="onnxruntime runtime on GPU: tensorrt | cuda execution accelerator")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads per python-runtime instance")] = None,
    preprocess: Annotated[bool, typer.Option(
        help="add NAME-preprocess and an ensemble NAME: clients send encoded image bytes")] = False,
    labels: Annotated[bool, typer.Option(
        help="label file on the output: Triton's classification extension returns top-k labels")] = False,
    from_recommendation: Annotated[Path | None, typer.Option(
        help="recommendation.json from cvt-bench: its artifacts, backend and precision for --objective "
        "(replace --artifacts, --precision, --runtime/--python-backend)")] = None,
    objective: Annotated[str, typer.Option(help="with --from-recommendation: latency-b1 | throughput-b8")
                         ] = "throughput-b8",
    verbose: VerboseOpt = False,
) -> None:
    """Write a Triton Inference Server model repository from an artifact folder, checked against
    Triton's ModelConfig schema and the model files.

    Examples:

      cvt-export triton --artifacts artifacts/cvt-13 --precision int8 --preprocess --labels --out repo

      cvt-export triton --runtime onnxruntime --gpu --accelerator tensorrt --precision fp16 --out repo

      cvt-export triton --from-recommendation artifacts/cvt-13/report/recommendation.json --out repo
    """
    setup_logging(verbose)
    from cvt_export.triton.repository import RepoOptions, write_repository

    if from_recommendation is not None:
        folder, precision, runtime, python_backend = _recommended(from_recommendation, objective,
                                                                  python_backend)
    else:
        folder = ArtifactFolder.open(artifacts)
    precision = precision_table.parse_one(precision)
    opts = RepoOptions(name=name, precision=precision, runtime=runtime,  # type: ignore[arg-type]
                       python_backend=python_backend, max_batch=max_batch, instances=instances, gpu=gpu,
                       accelerator=accelerator, threads=threads, preprocess=preprocess, labels=labels)
    with status("writing the model repository"):
        record = write_repository(folder, out, opts)
    if record.replaced:
        stdout.print(f"replaced {', '.join(record.replaced)} (an earlier "
                     f"`cvt-export triton --name {name}`)")
    stdout.print(f"wrote {', '.join(record.models)} in {out} ({runtime}, {precision}); "
                 f"serve it with `cvt-export serve {out}`")


def _recommended(path: Path, objective: str, python_backend: str) -> tuple[ArtifactFolder, str, str, str]:
    """--from-recommendation: (folder, precision, runtime, Python backend) of the objective's pick."""
    from cvt_export.harness import recommend

    pick = recommend.read(path, objective)
    if pick.backend == "tensorrt":
        return pick.folder, pick.precision, "tensorrt", python_backend
    if pick.backend in ("ort", "openvino"):
        return pick.folder, pick.precision, "python", pick.backend
    raise CvtError(f"{path}: recommends {pick.backend} {pick.precision}, which "
                   "Triton does not serve; re-run cvt-bench without that backend")


@app.command()
@user_errors
def serve(
    repository: Annotated[Path, typer.Argument(help="model repository written by `cvt-export triton`")],
    http_port: Annotated[int, typer.Option(help="HTTP port on 127.0.0.1 (0: a free one)")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port on 127.0.0.1 (0: a free one)")] = 8001,
    log: Annotated[Path | None, typer.Option(
        help="keep tritonserver's log in this file (default: a temporary file, removed at the end)")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve a repository with the tritonserver binary of PyPI's nvidia-pytriton, on 127.0.0.1,
    until Ctrl-C or SIGTERM (GPU hosts: the NGC container's `tritonserver --model-repository REPO`).
    The repository is checked first; the server, its Python stubs, their shared memory and the
    temporary folder never outlive this command, however it ends (kill -9 included).

    Example: cvt-export serve triton-repo --http-port 8000 --grpc-port 8001
    """
    setup_logging(verbose)
    import time

    from cvt_export.startup import STOP
    from cvt_export.triton.server import Server, free_port

    if log is not None:
        output_file(log, "--log")

    server = Server(repository, http_port=http_port or free_port(), grpc_port=grpc_port or free_port(),
                    log=log)  # ports outside 1..65535 are refused by Server.start
    try:
        with status("starting tritonserver"):
            server.start()
        kept = f", log {log}" if log else ""
        stdout.print(f"serving {repository}: HTTP {server.http_url}, gRPC {server.grpc_url} "
                     f"(tritonserver pid {server.pid}{kept}); Ctrl-C stops it")
        while server.alive():
            time.sleep(0.5)
        raise CvtError(f"{repository}: serving ended: {server.poll()}")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (`startup.Terminated`): how serving ends
        STOP.expected = True
        stderr.print("stopping tritonserver")
    finally:
        server.stop()


@app.command()
@user_errors
def deploy(
    slo: Annotated[str, typer.Option(help="latency objective at a traffic: p99<=60ms@rate=40 (p50/p90/p99, "
                                     "ms, requests per second, Poisson arrivals)")],
    budget: Annotated[list[str] | None, typer.Option(
        help='fidelity bound the served answers must meet, repeatable: "cosine>=0.999" (required)')] = None,
    artifacts: ArtifactsOpt = Path("artifacts/cvt-13"),
    out: Annotated[Path, typer.Option(help="model repository to write the chosen configuration to")] = Path(
        "triton-repo"),
    name: Annotated[str, typer.Option(help="model name clients call")] = "cvt",
    requests: Annotated[int, typer.Option(help="open-loop requests per candidate in the search")] = 300,
    confirm_requests: Annotated[int, typer.Option(help="requests in the confirmation run")] = 400,
    max_candidates: Annotated[int, typer.Option(help="configurations measured at most")] = 12,
    fidelity_images: Annotated[int, typer.Option(help="images per role (selection, confirmation)")] = 20,
    verbose: VerboseOpt = False,
) -> None:
    """Find the Triton configuration (precision, runner, instances, max batch, queue delay) that meets
    a latency SLO at a request rate on this machine's tritonserver, every candidate's served answers
    checked against the reference first; write it to --out, confirm it in a separate run, and
    record every candidate with a Pareto plot. Exit 1 when no configuration meets the SLO or the
    confirmation run does not hold it.

    Example: cvt-export deploy --artifacts artifacts/cvt-13 --slo "p99<=250ms@rate=12" --budget "cosine>=0.99"
    """
    setup_logging(verbose)
    from cvt_export import deploy as dep
    from cvt_export.render import deploy as render_deploy

    if not budget:
        raise CvtError('--budget: give the fidelity bound the served answers must meet, e.g. "cosine>=0.999"')
    settings = dep.Settings(slo=dep.Slo.parse(slo), budgets=parse_budgets(budget),
                            requests=requests, confirm_requests=confirm_requests,
                            max_candidates=max_candidates, fidelity_images=fidelity_images)
    folder = ArtifactFolder.open(artifacts)  # settings and --out are checked by deploy before the search
    with status("deploy search") as live:
        result = dep.deploy(folder, out, name, settings, progress=lambda t: live.update(f"deploy: {t}"))
    for line in render_deploy.markdown(result, settings.slo)[2:]:
        stdout.print(line.replace("**", ""), highlight=False, soft_wrap=True)
    stdout.print(f"wrote {out / (name + '.deploy.json')}, .md and .svg")
    if result.chosen is None or result.confirmation is None or not result.confirmation.held:
        raise typer.Exit(1)


@app.command()
def variants() -> None:
    """The registered variants with their published figures.

    Example: cvt-export variants
    """
    table = Table()
    for col in ("variant", "image", "eval resize", "dims", "depths", "heads", "hub id",
                "params (M)", "GFLOPs", "top-1"):
        table.add_column(col)
    for v in cvt_ref.VARIANTS.values():
        pub = v.published
        table.add_row(
            v.name, str(v.image_size),
            f"short side {v.resize_size}, crop" if v.crop == "center" else f"{v.image_size}²",
            "/".join(map(str, v.embed_dims)), "/".join(map(str, v.depths)),
            "/".join(str(s.num_heads) for s in v.stages), v.hub_id,
            *(map(str, (pub.params_m, pub.gflops, pub.top1)) if pub else ("", "", "")))
    show_table(table)


def main() -> None:
    run_app(app)
