"""Bad input from a user: one line, exit 2, no traceback, checked before the work, nothing left
behind that looks valid. And what is not an error: a cache that cannot be written, hidden files."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from conftest import copy_artifacts
from safetensors.torch import save_file

import cvt_ref
from cvt_export import calibration, metrics
from helpers import assert_user_error, run_cli


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims side x side pixels (400 megapixels at 20000): PIL refuses it as
    a decompression bomb when it opens the header, so the file needs no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_in_predict_and_calib(tmp_path: Path, photos: list[Path]) -> None:
    bomb = bomb_png(tmp_path / "bomb.png")
    assert_user_error(run_cli("cvt-export", "predict", str(bomb)), "too many pixels")
    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(bomb, calib / "bomb.png")
    shutil.copy(photos[0], calib / photos[0].name)
    out = tmp_path / "out"
    assert_user_error(run_cli("cvt-export", "onnx", "--precision", "int8", "--calib", str(calib),
                              "--out", str(out)), "too many pixels")
    assert not out.exists()  # refused before the export made anything


def test_images_beyond_the_decode_budget_are_one_line(tmp_path: Path) -> None:
    """A 138-byte PNG of 20000x1 (its shorter side scaled to 256 would be a 3.9 GB image), a header
    of 10000x10000 (100 Mpx: PIL only warns there) and a FIFO (opening it would wait forever):
    one line each, no PIL warning, and quickly."""
    import os
    import time

    from PIL import Image

    thin = tmp_path / "thin.png"
    Image.new("L", (20000, 1)).save(thin)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    cases = [(thin, "aspect ratio beyond 100:1"), (bomb_png(tmp_path / "big.png", 10000), "too many pixels"),
             (fifo, "not a regular file")]
    for path, fragment in cases:
        started = time.monotonic()
        result = run_cli("cvt-export", "predict", str(path))
        assert_user_error(result, fragment)
        assert "Warning" not in result.stderr and time.monotonic() - started < 60
    from cvt_ref.errors import ImageError
    from cvt_ref.preprocess import decode_image

    with pytest.raises(ImageError, match=r"request: .*aspect ratio"):
        decode_image(thin.read_bytes(), "request")  # what Triton's preprocessing and the decode workers use


def test_export_into_a_read_only_folder(readonly_dir: Path) -> None:
    for out, fragment in ((readonly_dir, "cannot write there"), (readonly_dir / "sub", "cannot create")):
        assert_user_error(run_cli("cvt-export", "onnx", "--out", str(out)), fragment)
    assert not any(readonly_dir.iterdir())


@pytest.mark.slow
def test_derived_files_on_a_read_only_artifact_folder(exported: Path, readonly_dir: Path,
                                                      tmp_path: Path) -> None:
    src = readonly_dir.parent / "ro-src"  # the mount shows this folder read-only
    folder = copy_artifacts(exported, src, "art")
    shutil.rmtree(folder / "openvino", ignore_errors=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("openvino", None)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    art = readonly_dir / "art"
    assert_user_error(run_cli("cvt-export", "openvino", "--artifacts", str(art)), "copy the folder")
    rep = tmp_path / "rep"
    assert_user_error(run_cli("cvt-bench", "--backend", "openvino", "--precision", "fp32", "--artifacts",
                              str(art), "--out", str(rep), "--iters", "1"), "copy the folder")
    assert not rep.exists()


@pytest.mark.slow
def test_report_outputs_are_checked_before_the_run(exported: Path, tmp_path: Path,
                                                   readonly_dir: Path) -> None:
    folder = copy_artifacts(exported, tmp_path)
    shutil.rmtree(folder / "ort", ignore_errors=True)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    base = ["--backend", "ort", "--precision", "fp32", "--artifacts", str(folder), "--iters", "1"]
    cases = [
        (["--out", str(a_file)], "is a file"),
        (["--out", str(tmp_path / "rep"), "--json", str(tmp_path / "missing" / "r.json")], "does not exist"),
        (["--out", str(readonly_dir / "rep")], "cannot write there"),
        (["--out", str(tmp_path / "rep"), "--threads", "0"], "--threads 0"),
    ]
    for args, fragment in cases:
        assert_user_error(run_cli("cvt-bench", *base, *args), fragment)
    assert not (folder / "ort").exists()  # no backend ran
    # outputs that would overwrite what the command reads
    manifest = (folder / "manifest.json").read_bytes()
    baseline = tmp_path / "baseline.json"
    baseline.write_bytes(Path("reports/baseline/cvt-13.json").read_bytes())
    before = baseline.read_bytes()
    cases = [
        (["--out", str(folder)], "is the --artifacts"),
        (["--out", str(tmp_path / "rep"), "--json", str(folder / "manifest.json")], "inside the export"),
    ]
    for args, fragment in cases:
        assert_user_error(run_cli("cvt-bench", *base, *args), fragment)
    regress = ["regress", "--backend", "ort", "--precision", "fp32", "--baseline", str(baseline)]
    for args, fragment in [(["--json", str(baseline)], "is the --baseline"),
                           (["--out", str(folder)], "export folder"),
                           (["--artifacts", str(folder), "--out", str(folder)], "is the --artifacts")]:
        assert_user_error(run_cli("cvt-bench", *regress, *args), fragment)
    assert baseline.read_bytes() == before and (folder / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".md", ".png")) == []


@pytest.mark.slow
def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "cache-is-a-file"
    not_a_folder.write_text("")
    out = tmp_path / "out"
    result = run_cli("cvt-export", "onnx", "--precision", "int8", "--out", str(out),
                     env={"CVT_EXPORT_CACHE": str(not_a_folder)})
    assert result.returncode == 0, result.stderr
    assert "not writable" in result.stderr and "Traceback" not in result.stderr
    assert (out / "model.int8.onnx").is_file() and (out / "manifest.json").is_file()


def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path: Path) -> None:
    result = run_cli("cvt-export", "predict", "--weights", "models/cvt13.pth", cwd=tmp_path)
    assert_user_error(result, "models/cvt13.pth: no such file or folder")
    assert "hub" not in result.stderr


def test_safetensors_content_is_recognised_whatever_the_name(hf_folder: object, tmp_path: Path,
                                                             batch_224: torch.Tensor) -> None:
    folder = hf_folder(cvt_ref.get_variant("cvt-13"))  # type: ignore[operator]
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    renamed = tmp_path / "weights.pt"
    save_file(state, renamed)
    a = cvt_ref.create_model("cvt-13", folder)
    b = cvt_ref.create_model("cvt-13", renamed)
    with torch.inference_mode():
        assert torch.equal(a(batch_224[:1]), b(batch_224[:1]))


def test_hidden_files_in_image_folders_are_skipped(tmp_path: Path, photos: list[Path]) -> None:
    shutil.copy(photos[0], tmp_path / photos[0].name)
    (tmp_path / f"._{photos[0].name}").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / ".thumbs").mkdir()
    shutil.copy(photos[1], tmp_path / ".thumbs" / photos[1].name)
    calib, _ = calibration.calibration_set(tmp_path)
    assert [p.name for p in calib.paths] == [photos[0].name]


def test_every_command_documents_its_options_and_shows_an_example() -> None:
    import click
    import typer

    from cvt_export.cli import bench as bench_cli
    from cvt_export.cli import export as export_cli

    for app, name in ((export_cli.app, "cvt-export"), (bench_cli.app, "cvt-bench")):
        group = typer.main.get_command(app)
        commands = dict(getattr(group, "commands", {}))
        if name == "cvt-bench":
            commands[name] = group
        for cmd_name, cmd in commands.items():
            assert "Example" in (cmd.help or ""), f"{name} {cmd_name}: no example in --help"
            for param in cmd.params:
                if isinstance(param, click.Option) and param.name != "help":
                    assert param.help, f"{name} {cmd_name} --{param.name}: no description"


@pytest.mark.parametrize("command", [["predict"], ["onnx"], ["backends"], ["openvino"], ["trt"],
                                     ["variants"]])
@pytest.mark.slow
def test_help_runs(command: list[str]) -> None:
    result = run_cli("cvt-export", *command, "--help")
    assert result.returncode == 0 and "Example" in result.stdout


@pytest.mark.heavy
def test_tables_are_whole_when_the_output_is_not_a_terminal() -> None:
    """In a CI log or `| cat` (no terminal, no COLUMNS) rich would cut tables to 80 columns
    ("cvt-… │ micr…"); every variant's hub id must appear whole, and nothing ends in an ellipsis."""
    import os
    import subprocess

    from cvt_ref.variants import VARIANTS
    from helpers import BIN

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run([str(BIN / "cvt-export"), "variants"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    for variant in VARIANTS.values():
        assert f" {variant.hub_id} " in result.stdout
    # a table's title (predict's image path) is a line of its own, not wrapped to the table's width
    predicted = subprocess.run([str(BIN / "cvt-export"), "predict", "--weights", "random:0", "--top", "1"],
                               capture_output=True, text=True, env=env, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    photos = sorted((Path(cvt_ref.__file__).parent / "data" / "photos").glob("*.jpg"))
    assert photos and all(str(photo) in predicted.stdout.splitlines() for photo in photos)
    # --help into a pipe: the option boxes are 120 columns wide, not squeezed to rich's 80
    helped = subprocess.run([str(BIN / "cvt-export"), "deploy", "--help"], capture_output=True, text=True,
                            env={k: v for k, v in env.items() if k != "TERMINAL_WIDTH"}, timeout=120)
    boxes = [line for line in helped.stdout.splitlines() if line.startswith(("╭", "│", "╰"))]
    assert helped.returncode == 0 and boxes and {len(line) for line in boxes} == {120}
    assert any("--budget" in line and "repeatable" in line for line in boxes)


@pytest.mark.heavy
def test_a_benchmark_in_a_pipe_is_whole(exported_copy: Path, tmp_path: Path) -> None:
    """`cvt-bench ... | cat`: the table's long "runs as" text (ORT's FP16 explains itself in 56
    characters) was cut to 30 with an ellipsis; every row's figures and text must be whole, on one
    line, as report.json has them."""
    import json
    import os
    import subprocess

    from helpers import BIN

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(BIN / "cvt-bench"), "--artifacts", str(exported_copy), "--backend", "ort",
                             "--precision", "fp32,fp16", "--batch", "1", "--iters", "2", "--warmup", "0",
                             "--limit", "4", "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["results"]
    lines = result.stdout.splitlines()
    for row in rows:
        if row["status"] != "ok":
            continue
        key = [row["backend"], row["precision"]]
        line = next(x for x in lines if [c.strip() for c in x.split("│")][1:3] == key)
        assert row["executed"] in line, (row["executed"], line)
        assert f"{row['latency']['1']['median_ms']:.1f}" in line
    assert any("CPU EP casts to fp32 where it lacks fp16 kernels" in x for x in lines)


@pytest.mark.parametrize(("args", "fragment"), [
    (("cvt-export", "onnx", "--opset", "abc"), "Invalid value for '--opset'"),
    (("cvt-export", "nosuch"), "No such command 'nosuch'"),
    (("cvt-bench", "regress", "--nope"), "No such option: --nope"),
    (("cvt-export", "onnx", "--out"), "'--out' requires an argument"),
    (("cvt-bench", "--iters", "many"), "Invalid value for '--iters'"),
    # NaN passes a check written as `x <= 0` or `x > max`: the gate would be blind, a run endless
    (("cvt-bench", "regress", "--max-slowdown", "nan"), "'--max-slowdown': nan is not a finite number"),
    (("cvt-bench", "--seconds", "nan", "--backend", "ort"), "'--seconds': nan is not a finite number"),
    (("cvt-bench", "triton", "--rate", "nan", "--url", "127.0.0.1:9"), "--rate 'nan'"),
])
def test_parser_errors_are_one_line(args: tuple[str, ...], fragment: str) -> None:
    """The parser's own errors (wrong type, unknown option or command, a missing value) are the
    project's one `error:` line with exit 2, not a framed box of 3-5 lines."""
    assert_user_error(run_cli(*args), fragment)


@pytest.mark.parametrize("args", [
    ("cvt-export", "onnx", "--opset", "abc"),        # the parser's error
    ("cvt-bench", "--budget", "cosine>=2"),          # the command's own, before the toolchain loads
    ("cvt-export", "predict", "no-such-photo.jpg"),  # after torch and the model loaded
    ("cvt-export", "variants"),                      # a table on stdout, exit 0
])
def test_a_command_called_in_process_answers_as_its_process(args: tuple[str, ...],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`make check` calls the commands in the test's interpreter (helpers.run_cli): what it sees
    must be what the installed console script gives a user: exit code, stdout and stderr."""
    import helpers

    monkeypatch.setattr(helpers, "CLI_MODE", "process")
    process = run_cli(*args)
    monkeypatch.setattr(helpers, "CLI_MODE", "in-process")
    called = run_cli(*args)
    assert (called.returncode, called.stdout, called.stderr) == \
        (process.returncode, process.stdout, process.stderr)


def test_github_annotations_escape_as_documented(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """GitHub's workflow-command rules: data escapes %, CR and LF; properties also ':' and ','.
    Outside Actions nothing is printed or written."""
    from cvt_export.cli import github

    assert (github.annotation("error", "FAIL ort/int8: a,b", "100% off\nnext")
            == "::error title=FAIL ort/int8%3A a%2Cb::100%25 off%0Anext")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    assert github.summary("# x") is None and not summary.exists()
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert github.summary("# x") is None and summary.read_text() == "# x\n\n"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path))  # a folder: a warning, not a failure
    assert "cannot append to the job summary" in (github.summary("# y") or "")


def test_long_work_in_a_log_is_one_line_per_step(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a terminal a spinner prints nothing: each new step is a line with the elapsed time
    (a repeated step is not), and the error contract's helper sees past those lines."""
    from cvt_export.cli.common import status
    from helpers import STEP_LINE

    with status("export") as live:
        for text in ("calibrating 3/8", "calibrating 3/8", "OpenVINO IR fp16"):
            live.update(text)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(STEP_LINE.match(line) for line in lines), lines
    assert [line.split("] ", 1)[1] for line in lines] == ["export", "calibrating 3/8", "OpenVINO IR fp16"]


def test_a_counted_series_says_how_long_it_has_left() -> None:
    """Steps "(k/N)" get an estimate from the pace since the series' first step: with steps 10 s
    apart, step 2 of 4 leaves steps 2, 3 and 4, about 30 s; a count going back starts anew."""
    from cvt_export.cli.common import TimeLeft

    now = [0.0]
    left = TimeLeft(clock=lambda: now[0])
    assert left("ort fp32 (1/4)") == "ort fp32 (1/4)"
    now[0] = 10.0
    assert left("ort int8 (2/4)") == "ort int8 (2/4, about 30 s left)"
    now[0] = 20.0
    assert left("ov fp32: per-block drift (3/4)") == "ov fp32: per-block drift (3/4, about 20 s left)"
    now[0] = 25.0
    assert left("sensitivity: block 0 alone in INT8 (1/13)") == "sensitivity: block 0 alone in INT8 (1/13)"
    assert left("calibrating INT8") == "calibrating INT8"


def test_a_counted_series_on_a_terminal_has_a_progress_bar() -> None:
    """On a terminal the status line of a counted series starts with a bar of the steps done
    (step 3 of 4: two done, half the bar); a step without a count has none."""
    from cvt_export.cli.common import _Spinner, bar

    shown: list[str] = []

    class Live:
        def update(self, text: str) -> None:
            shown.append(text)

    now = [0.0]
    spinner = _Spinner(Live(), clock=lambda: now[0])
    spinner.update("calibrating INT8 on 4 images (1/4)")
    now[0] = 10.0
    spinner.update("calibrating INT8 on 4 images (3/4)")
    spinner.update("validating")
    assert shown == ["░" * 20 + " calibrating INT8 on 4 images (1/4)",
                     "█" * 10 + "░" * 10 + " calibrating INT8 on 4 images (3/4, about 10 s left)",
                     "validating"]
    assert bar(4, 4, 8) == "██████░░" and bar(5, 4, 8) == "████████" and bar(1, 0, 4) == "░░░░"


def test_deploy_refuses_a_search_of_years() -> None:
    """--requests 1000000000 was accepted: 31 years per candidate at the SLO's rate."""
    from cvt_export import deploy

    slo = deploy.Slo.parse("p99<=300ms@rate=5")
    budgets = [metrics.parse_budget("cosine>=0.99")]
    with pytest.raises(deploy.DeployError, match="--requests"):
        deploy.Settings(slo=slo, budgets=budgets, requests=1_000_000_000).check()
    deploy.Settings(slo=slo, budgets=budgets).check()


def test_a_port_left_in_time_wait_is_free_and_a_listening_one_is_not() -> None:
    """`cvt-export serve` on the port of a server stopped seconds ago: its connections in TIME_WAIT
    must not make the port check refuse what tritonserver can listen on."""
    import socket

    from cvt_export.triton.server import TritonError, check_port

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    with pytest.raises(TritonError, match="cannot listen"):
        check_port(port, "--http-port")  # a server is listening there
    served.close()  # the server's side closes first: its end of the connection is in TIME_WAIT
    listener.close()
    client.close()
    check_port(port, "--http-port")


def _numeric_options() -> list[tuple[str, list[str], str, type]]:
    """(tool, subcommand words, option, int or float) for every numeric option of both command
    lines, read from the parsers themselves: a new option is covered when it is added."""
    import typing

    import typer.main

    from cvt_export.cli import bench, export

    found = []
    for tool, app in (("cvt-bench", bench.app), ("cvt-export", export.app)):
        command = typer.main.get_command(app)
        subs = [([], command), *(([name], sub) for name, sub in getattr(command, "commands", {}).items())]
        for words, sub in subs:
            for param in sub.params:
                desc = getattr(param, "type_descriptor", None)
                kinds = {desc.annotation, *typing.get_args(desc.annotation)} if desc else set()
                for kind in (int, float):
                    if kind in kinds and param.opts[0].startswith("--"):
                        found.append((tool, words, max(param.opts, key=len), kind))
    return found


def test_every_numeric_option_refuses_nan_infinity_and_huge_values() -> None:
    """NaN and +-infinity for every float option, 10**12 for every option with a bound: one line,
    exit 2, at parse time (nothing loaded or run). Every numeric option is classified."""
    from cvt_export.cli.common import NUMBER_BOUNDS

    options = _numeric_options()
    assert len(options) >= 30
    unclassified = sorted({o for _, _, o, _ in options if o not in NUMBER_BOUNDS})
    assert not unclassified, f"numeric options with no bound and no reason in NUMBER_BOUNDS: {unclassified}"
    cases = 0
    for tool, words, option, kind in options:
        values = (["nan", "inf", "-inf"] if kind is float else []) + (
            [str(10**12)] if NUMBER_BOUNDS[option] is not None else [])
        for value in values:
            result = run_cli(tool, *words, option, value)
            assert_user_error(result, option)
            assert any(w in result.stderr for w in ("finite", "more than it takes", "less than or equal")), \
                result.stderr
            cases += 1
    assert cases >= 40


@pytest.mark.heavy
def test_bench_of_a_missing_or_stale_mixed_file_is_refused_before_any_row(exported_copy: Path) -> None:
    """`--precision mixed` alone: refused at once (no row started), as triton and openvino do."""
    import json
    import shutil

    args = ["--artifacts", str(exported_copy), "--backend", "ort", "--precision", "mixed", "--seconds", "0.2"]
    missing = run_cli("cvt-bench", *args)
    assert_user_error(missing, "has no model.mixed.onnx; make it with `cvt-export tune")
    assert "running" not in missing.stderr
    # a mix tune made from an FP32 file that has since been replaced (the manifest says so)
    manifest = json.loads((exported_copy / "manifest.json").read_text())
    entry = dict(manifest["files"]["model.int8.onnx"], **{"from": "0" * 64, "int8_from": "0" * 64})
    manifest["files"]["model.mixed.onnx"] = entry
    shutil.copy(exported_copy / "model.int8.onnx", exported_copy / "model.mixed.onnx")
    (exported_copy / "manifest.json").write_text(json.dumps(manifest))
    stale = run_cli("cvt-bench", *args)
    assert_user_error(stale, "made from another FP32 export; re-run `cvt-export tune")
    assert "running" not in stale.stderr


def test_a_url_with_a_scheme_is_one_line_in_a_real_process(exported: Path) -> None:
    """tritonclient's client, half made from "http://...", printed a traceback from its destructor
    after the error line; a real process shows what the interpreter prints at exit too."""
    import subprocess

    from helpers import BIN

    result = subprocess.run([str(BIN / "cvt-bench"), "triton", "--url", "http://127.0.0.1:9", "--artifacts",
                             str(exported), "--requests", "5"], capture_output=True, text=True, timeout=120)
    assert_user_error(result, "give HOST:PORT without a scheme (127.0.0.1:9)")
    assert "Exception ignored" not in result.stderr


def test_messages_name_the_option_the_user_gave(tmp_path: Path) -> None:
    """A folder the user never named as --out is not called --out: --update's baseline folder, and
    the default report folder under --artifacts."""
    (tmp_path / "afile").write_text("x")
    update = run_cli("cvt-bench", "regress", "--baseline", str(tmp_path / "afile" / "b.json"), "--update")
    assert_user_error(update, "--baseline's folder")
    data = tmp_path / "val"
    (data / "1").mkdir(parents=True)
    default = run_cli("cvt-bench", "accuracy", "--dataset", str(data), "--artifacts", str(data / "art"))
    assert_user_error(default, "the default --out (ARTIFACTS/accuracy)")
    assert "--out " not in default.stderr.replace("the default --out (", "")


@pytest.mark.heavy
def test_ctrl_c_while_a_command_starts_is_never_a_traceback(tmp_path: Path) -> None:
    """SIGINT at 12 moments of `cvt-export serve`'s first second and a half (Python starting,
    the imports, the repository check): a line or nothing, never a KeyboardInterrupt traceback."""
    import signal
    import subprocess
    import time

    from helpers import BIN

    codes = set()
    for i in range(12):
        proc = subprocess.Popen([str(BIN / "cvt-export"), "serve", str(tmp_path / "no-repo")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.05 + 0.12 * i)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (0.05 + 0.12 * i, err)
        codes.add(proc.returncode)
    assert 130 in codes  # at least one landed while it was starting
