"""The structure the code relies on: one bounds table that export, bench and regress all obey,
imports that run one way, light modules that stay light."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cvt_export import build, exporter, metrics, regress, validate
from cvt_export.harness import bench
from cvt_export.records import FileEntry, HeldFidelity, Tolerance
from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cvt_export"


def _figures(**fid: float) -> HeldFidelity:
    return HeldFidelity(**{"max_abs": 0.0, "cosine_min": 1.0, "top1_agreement": 1.0, "n": 4, "cosine_p5": 1.0,
                           "top1_agreement_ci": (0.5, 1.0), **fid})


def _beyond(precision: str) -> HeldFidelity:
    """A fidelity summary that breaks every bound of the precision by a hair."""
    return _figures(**{key: bound * 1.0001 if key in metrics.UPPER else bound - 1e-4
                       for key, bound in metrics.BOUNDS[precision].items()})


@pytest.mark.parametrize("precision", list(metrics.BOUNDS))
def test_bench_and_regress_obey_the_one_bounds_table(precision: str) -> None:
    assert metrics.within_bounds(precision, _figures(**metrics.BOUNDS[precision])) == []
    broken = metrics.within_bounds(precision, _beyond(precision))
    assert [b.split()[0] for b in broken] == list(metrics.BOUNDS[precision])
    # cvt-bench flags the same rows, naming the same bounds
    ref = np.eye(4, 10, dtype=np.float32) * 5
    fid = bench.judge(precision, ref, ref, ["a", "b", "c", "d"])
    assert fid.passed and fid.bounds == dict(metrics.BOUNDS[precision])
    assert not bench.judge(precision, ref, -ref, ["a", "b", "c", "d"]).passed
    # the regression gate never lets a tolerance fall below the table, even from a lax baseline
    lax = {"max_abs_max": 1.0, "cosine_min_min": 0.0, "top1_agreement_min": 0.0}
    made = regress.tolerance(precision, 0.0, 0.0, 10)
    assert all(getattr(made, f"{k}_max" if k in metrics.UPPER else f"{k}_min") == v
               for k, v in metrics.BOUNDS[precision].items())  # a new baseline starts at the table
    given = {k: lax[k] for k, v in dataclasses.asdict(made).items() if v is not None}
    floor = regress.floored(precision, Tolerance(**given))
    for key, bound in metrics.BOUNDS[precision].items():
        name = f"{key}_max" if key in metrics.UPPER else f"{key}_min"
        assert getattr(floor, name) == bound


def test_export_obeys_the_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """validate (what export keeps or warns about) reads the same table at call time."""
    ref = np.eye(3, 10, dtype=np.float32) * 5
    monkeypatch.setattr(validate, "ort_session", lambda path: None)
    monkeypatch.setattr(validate, "run_logits", lambda session, x: ref + 0.5)  # max-abs 0.5
    with pytest.raises(exporter.ExportError, match=r"max_abs 0.5 > 0.0001"):
        validate.validate_fp32(tmp_path / "model.onnx", np.zeros((3, 3, 8, 8), np.float32), ref, 3)
    monkeypatch.setitem(metrics.BOUNDS["fp32"], "max_abs", 1.0)
    assert validate.validate_fp32(tmp_path / "model.onnx", np.zeros((3, 3, 8, 8), np.float32), ref, 3)
    near = ref + 0.05 * np.eye(3, 10, k=1, dtype=np.float32)  # cosine 0.99995 per row
    monkeypatch.setattr(validate, "run_logits", lambda session, x: near)
    fid, warning = validate.measure(tmp_path / "m.onnx", "int8", np.zeros((3, 3, 8, 8), np.float32), ref,
                                    [0, 1, 2], "3 images")
    assert fid.bounds == dict(metrics.BOUNDS["int8"]) and warning is None
    monkeypatch.setitem(metrics.BOUNDS["int8"], "cosine_min", 0.99999)
    _, warning = validate.measure(tmp_path / "m.onnx", "int8", np.zeros((3, 3, 8, 8), np.float32), ref,
                                  [0, 1, 2], "3 images")
    assert warning is not None and "cosine_min" in warning


def test_no_other_module_keeps_its_own_bounds() -> None:
    for module in (exporter, validate, build, bench, regress):
        names = {n for n in vars(module) if n.isupper()}
        assert not names & {"FP32_TOLERANCE", "TARGETS", "BOUNDS", "FP32_MAX_ABS"}, module.__name__


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_nothing_below_the_harness_imports_it() -> None:
    above = {"harness", "regress.py", "tune.py", "deploy", "cli"}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in above:
            continue
        bad = [m for m in _imports(path) if m.startswith("cvt_export.harness")]
        assert not bad, f"{rel} imports {bad}"


def test_leaf_modules_import_nothing_of_the_project() -> None:
    records = {"cvt_export.records"}
    for name in ("metrics.py", "machine.py", "runtime.py", "quiet.py", "clock.py", "precisions.py",
                 "records.py"):
        found = _imports(PACKAGE / name)
        project = [m for m in found if m.startswith(("cvt_export", "cvt_ref"))
                   and not (m.startswith("cvt_export.records.") and records <= found)]
        # the machine facts live in one module, a leaf itself: ORT's session asks it for VNNI; the
        # bounds are the precision table's (a leaf too: it imports only the error type); figures and
        # machine facts are records (a leaf too: the error type and the activation names)
        allowed = {"cvt_export", "cvt_export.machine"} if name == "runtime.py" else set()
        allowed |= {"cvt_export", "cvt_export.precisions", *records} if name == "metrics.py" else set()
        allowed |= records if name == "machine.py" else set()
        error = {"cvt_ref.errors", "cvt_ref.errors.CvtError"}
        allowed |= error if name in ("precisions.py", "records.py") else set()
        allowed |= {"cvt_ref.source", "cvt_ref.source.Activation"} if name == "records.py" else set()
        assert set(project) <= allowed, f"{name} imports {project}"
    for name in ("source.py", "errors.py", "variants.py", "labels.py"):
        heavy = [m for m in _imports(ROOT / "cvt_ref" / name) if m.split(".")[0] in ("torch", "cvt_export")]
        assert heavy == [], f"cvt_ref/{name} imports {heavy}"


def test_reports_and_manifests_are_read_without_torch() -> None:
    code = ("import sys; import cvt_export.harness.report, cvt_export.metrics, cvt_export.artifacts, "
            "cvt_export.render.report, cvt_export.render.profile, cvt_export.render.deploy, "
            "cvt_export.render.accuracy, cvt_export.render.tune, cvt_export.render.regress; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_command_line_parses_before_the_toolchain_loads() -> None:
    """Both commands' modules import no torch, onnx or backend SDK: `--help`, a parser error or a
    refused option answer in about a second (importing torch alone took 2.8 s of the 4.2 s a
    refused option cost before), and the heavy imports happen inside the command that needs them."""
    code = ("import sys; import cvt_export.cli.export, cvt_export.cli.bench; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'openvino', 'tensorrt', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [
    ("cvt_export.cli.export", "tune", "--backend", "torch", "--budget", "cosine>=0.99"),
    ("cvt_export.cli.export", "tune", "--backend", "nope", "--budget", "cosine>=0.99"),
    ("cvt_export.cli.export", "tune", "--budget", "cosine>=2"),
    ("cvt_export.cli.bench", "--budget", "cosine>=2"),
])
def test_a_refused_option_is_refused_before_torch_loads(args: tuple[str, ...]) -> None:
    module, *argv = args
    code = (f"import atexit, sys; sys.argv = ['cvt', *{argv!r}]; "
            "atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules)); "
            f"from {module} import main; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: "), out.stderr
    assert out.stdout.strip() == "torch loaded: False"


def test_one_place_makes_an_onnx_runtime_session() -> None:
    makers = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")
              if "InferenceSession(" in p.read_text()]
    assert makers == [Path("runtime.py")]


def test_profiler_output_is_not_tracked() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    assert "onnxruntime_profile" not in tracked


def test_the_working_tiers_export_cache_follows_what_the_export_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make check` keeps the shared exports between runs (tests/export_cache.py): a kept export is
    used only while every file the build can import and the reference's data are unchanged, and
    an edit elsewhere (a command, the harness) keeps it."""
    from dataclasses import dataclass

    import export_cache

    closure = {str(p.relative_to(ROOT)) for p in export_cache.source_closure("cvt_export.build")}
    assert {"cvt_export/exporter.py", "cvt_export/derive.py", "cvt_export/smoothing.py",
            "cvt_export/calibration.py", "cvt_export/options.py", "cvt_ref/model.py"} <= closure
    elsewhere = ("cvt_export/cli/", "cvt_export/harness/", "cvt_export/tune.py", "cvt_export/regress.py")
    assert not any(p.startswith(elsewhere) for p in closure)

    copy = tmp_path / "tree"
    for package in ("cvt_ref", "cvt_export"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(export_cache, "ROOT", copy)
    monkeypatch.setenv("CVT_TEST_EXPORT_CACHE", str(tmp_path / "kept"))
    made: list[Path] = []

    @dataclass
    class Request:
        calib: Path | None = None
        precisions: tuple[str, ...] = ("fp32",)

    calib: list[Path] = []  # each run's calibration cache, empty at the start as in a new session

    def make(request: Request, out: Path) -> None:
        made.append(out)
        (out / "model.onnx").write_text(f"export {len(made)}")
        (calib[-1] / "calibration").mkdir()
        (calib[-1] / "calibration" / "ranges.json").write_text(f"ranges {len(made)}")

    def run(request: Request) -> str:
        n = len(calib)
        out, cache = tmp_path / f"out{n}", tmp_path / f"calib{n}"
        out.mkdir()
        cache.mkdir()
        calib.append(cache)
        return (export_cache.exported("x", request, out, cache, make) / "model.onnx").read_text()

    assert run(Request()) == "export 1" and run(Request()) == "export 1" and len(made) == 1
    assert (calib[-1] / "calibration" / "ranges.json").read_text() == "ranges 1"  # came back with it
    (copy / "cvt_export" / "cli" / "bench.py").write_text("# a command changed\n")
    assert run(Request()) == "export 1" and len(made) == 1
    (copy / "cvt_export" / "smoothing.py").write_text("# the export changed\n")
    assert run(Request()) == "export 2"
    assert run(Request(precisions=("fp32", "int8"))) == "export 3"  # another request
    monkeypatch.delenv("CVT_TEST_EXPORT_CACHE")
    assert run(Request()) == "export 4"  # CI: always afresh


# --- function length (issue #29): no function of the package over MAX_LINES lines --------------

MAX_LINES = 60


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
    """Every function (methods and nested ones included) whose definition, from its `def` line
    (decorators excluded) to its last line, spans more than `limit` lines, parsed with ast."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_over_60_lines() -> None:
    assert long_functions(PACKAGE) + long_functions(ROOT / "cvt_ref") == []


def test_the_length_check_finds_a_planted_long_function(tmp_path: Path) -> None:
    """The check above can fail: a package holding one 61-line method (and a 60-line function,
    which is allowed) is reported with the method alone."""
    package = tmp_path / "planted"
    package.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    (package / "ok.py").write_text(f"def fine():\n{body}")  # 60 lines
    nested = "".join(f"        y{i} = {i}\n" for i in range(60))
    (package / "bad.py").write_text(f"class C:\n    @staticmethod\n    def long():\n{nested}")  # 61 lines
    assert long_functions(package) == ["planted/bad.py:3 long (61 lines)"]



# --- one rendering layer (issue #29): Markdown and plots are made in render/ and nowhere else -------

RENDER_NAMES = ("markdown", "plot", "plots", "svg")


def renderers_outside(package: Path) -> list[str]:
    """Outside `render/`: every function named like a renderer (markdown, plot, plots, svg, or a
    name holding one of them), every import of matplotlib, and every string that starts a Markdown
    table (`|---`) or heading (`# `, `## `), parsed with ast."""
    found = []
    for path in sorted(package.rglob("*.py")):
        module = str(path.relative_to(package))
        if module.startswith("render/"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0)):
            what = None
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                    n in node.name.lower() for n in RENDER_NAMES):
                what = f"def {node.name}"
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                what = next((f"import {n}" for n in names if n.split(".")[0] == "matplotlib"), None)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(
                    ("|---", "# ", "## ")):
                what = f"Markdown {node.value[:12]!r}"
            if what:
                found.append(f"{module}:{node.lineno} {what}")
    return found


def test_markdown_and_plots_are_made_in_render_only() -> None:
    assert renderers_outside(PACKAGE) == []


def test_the_render_check_finds_planted_renderers(tmp_path: Path) -> None:
    """It can fail: a markdown function, a matplotlib import and a table row built outside render/
    are found; the same inside render/, and a string merely holding '|', are not."""
    package = tmp_path / "pkg"
    (package / "render").mkdir(parents=True)
    planted = ('import matplotlib.pyplot as plt\n'
               'def markdown(r):\n    return "\\n".join(["| a |", "|---|", f"| {r} |"])\n'
               'def tune_svg(r):\n    return "a | b"\n')
    (package / "render" / "ok.py").write_text(planted)
    (package / "bad.py").write_text(planted)
    assert renderers_outside(package) == ["bad.py:1 import matplotlib.pyplot", "bad.py:2 def markdown",
                                          "bad.py:3 Markdown '|---|'", "bad.py:4 def tune_svg"]

# --- precision rules (issue #29): no literal precision comparison outside the table ----------------

def precision_comparisons(root: Path, names: tuple[str, ...], table: str = "precisions.py") -> list[str]:
    """Every comparison (==, !=, in, not in, ...) with a precision name written as a literal on
    either side, alone or inside a tuple, list or set literal, in every module but the table."""
    def literal(node: ast.expr) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        return isinstance(node, ast.Tuple | ast.List | ast.Set) and any(literal(e) for e in node.elts)

    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == table:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare) and any(literal(x) for x in (node.left, *node.comparators)):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_precision_rule_outside_the_table() -> None:
    from cvt_export import precisions

    assert precision_comparisons(PACKAGE, precisions.NAMES) == []


def test_the_precision_check_finds_planted_comparisons(tmp_path: Path) -> None:
    """It can fail: each way of writing a precision rule by name is found; the same names used
    otherwise (an argument, a dictionary key) and other strings are not."""
    from cvt_export import precisions

    package = tmp_path / "planted"
    package.mkdir()
    (package / "rules.py").write_text(
        'def f(p, ps, d):\n'
        '    a = p == "int8"\n'
        '    b = "fp16" in ps\n'
        '    c = p not in ("bf16", "x")\n'
        '    e = {"fp32": 1}[p] if p != "other" else d.get("mixed")\n')
    (package / "precisions.py").write_text('X = "int8" == "int8"\n')  # the table itself is allowed
    found = precision_comparisons(package, precisions.NAMES)
    assert [f.split(" ", 1)[0] for f in found] == ["planted/rules.py:2", "planted/rules.py:3",
                                                   "planted/rules.py:4"], found


# --- records (issue #29): what reads cvt-bench's reports, recommendation and profile reads fields -----

# Module -> the functions left out (they check an untrusted file field by field before anything
# uses it); cli/bench.py: the functions that show these records and the served report.
RECORD_READERS = {**{f"render/{p.name}": () for p in sorted((PACKAGE / "render").glob("*.py"))},
                  "harness/recommend.py": ("read", "_field")}
CLI_SHOWING_RECORDS = ("main_command", "_recommend_and_write", "show", "profile", "triton", "_show_served",
                       "_served_failures")
# Reads of other mappings that share a key name with a record's field, each named.
UNRELATED = {("harness/recommend.py", "cosine_min"): "metrics.BOUNDS[precision], the bounds table",
             ("render/tune.py", "selection"): "the held-out roles by name (records.RoleSize values)",
             ("render/tune.py", "confirmation"): "the held-out roles by name (records.RoleSize values)"}


def string_keyed_reads(path: Path, skip: tuple[str, ...] = (),
                       only: tuple[str, ...] = ()) -> list[tuple[int, str]]:
    """Every `x["key"]` and `x.get("key")` with a literal string key, outside the functions in
    `skip` (with `only`: inside the module's functions of those names), parsed with ast."""
    found: list[tuple[int, str]] = []
    tree = ast.parse(path.read_text(), str(path))

    def text(node: ast.expr | None) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in skip:
            return
        key = None
        if isinstance(node, ast.Subscript):
            key = text(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            key = text(node.args[0]) if node.args else None
        if key is not None:
            found.append((node.lineno, key))
        for child in ast.iter_child_nodes(node):
            visit(child)

    for node in tree.body if only else [tree]:
        if not only or (isinstance(node, ast.FunctionDef) and node.name in only):
            visit(node)
    return found


def test_the_report_recommendation_and_profile_are_read_as_fields() -> None:
    """The renderers, the recommendation and cvt-bench's tables read records, not dictionaries."""
    found = [f"{module}:{line} {key!r}" for module, skip in RECORD_READERS.items()
             for line, key in string_keyed_reads(PACKAGE / module, skip) if (module, key) not in UNRELATED]
    found += [f"cli/bench.py:{line} {key!r}"
              for line, key in string_keyed_reads(PACKAGE / "cli" / "bench.py", only=CLI_SHOWING_RECORDS)]
    assert found == []


def test_the_field_check_finds_planted_string_reads(tmp_path: Path) -> None:
    """It can fail: a subscript and a .get by a literal key are found, in and out of methods; a
    left-out function, an attribute and a key held in a variable are not."""
    planted = tmp_path / "render.py"
    planted.write_text(
        'def markdown(report, key):\n'
        '    a = report["results"]\n'
        '    b = report.inputs.get("sha256")\n'
        '    c = report.results[0].name + report[key]\n'
        'class R:\n'
        '    def show(self, r):\n'
        '        return r["latency"]["1"]\n'
        'def read(raw):\n'
        '    return raw["schema"]\n')
    assert string_keyed_reads(planted, ("read",)) == [(2, "results"), (3, "sha256"), (7, "1"), (7, "latency")]
    assert string_keyed_reads(planted, only=("read",)) == [(9, "schema")]


def test_the_tables_exact_precisions_are_the_ones_held_to_max_abs() -> None:
    from cvt_export import precisions

    for name, row in precisions.TABLE.items():
        assert row.exact == ("max_abs" in metrics.BOUNDS[name]), name


@pytest.mark.heavy
def test_a_precision_added_as_one_table_row_shows_up_everywhere(exported: Path, tmp_path: Path) -> None:
    """A copy of the package with one more row in the precision table (a made-up `fp32x` that ONNX
    Runtime runs from the FP32 file, its bounds in the row) and no other edit: cvt-bench runs and
    judges it, and the precision lists of cvt-bench, regress and Triton's refusals name it."""
    copy = tmp_path / "pkg"
    shutil.copytree(PACKAGE, copy / "cvt_export", ignore=shutil.ignore_patterns("__pycache__"))
    table = copy / "cvt_export" / "precisions.py"
    row = ('    Precision("fp32x", "fp32", None, "", ("ort",), "a test\'s precision",\n'
           '              bounds={"cosine_min": 0.9999, "top1_agreement": 1.0}),\n')
    text = table.read_text()
    anchor = "\n)}\nNAMES"  # the end of the table
    assert text.count(anchor) == 1
    table.write_text(text.replace(anchor, "\n" + row + ")}\nNAMES"))
    env = {"PYTHONPATH": str(copy)}
    ran = run_cli("cvt-bench", "--artifacts", str(exported), "--backend", "ort", "--precision", "fp32x",
                  "--iters", "2", "--warmup", "0", "--limit", "4", "--batch", "1",
                  "--out", str(tmp_path / "r"), env=env)
    assert ran.returncode == 0, ran.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    row_ = next(r for r in report["results"] if r["precision"] == "fp32x")
    assert row_["backend"] == "ort" and row_["status"] == "ok" and row_["fidelity"]["pass"], row_
    assert row_["fidelity"]["cosine_min"] > 0.99999  # it ran the FP32 file
    for args in (["cvt-bench", "--artifacts", str(exported), "--precision", "nope"],
                 ["cvt-bench", "regress", "--precision", "nope"]):
        refused = run_cli(*args, env=env)
        assert refused.returncode == 2 and "fp32x" in refused.stderr, refused.stderr
    refused = run_cli("cvt-export", "triton", "--artifacts", str(exported), "--runtime", "openvino",
                      "--precision", "fp32x", "--out", str(tmp_path / "repo"), env=env)
    assert refused.returncode == 2 and "openvino runtime serves" in refused.stderr, refused.stderr
    refused = run_cli("cvt-export", "triton", "--artifacts", str(exported), "--runtime", "onnxruntime",
                      "--precision", "bf16", "--out", str(tmp_path / "repo"), env=env)
    assert refused.returncode == 2 and "fp32x" in refused.stderr, refused.stderr  # what onnxruntime serves


# --- the manifest (issue #29): a record, read through ArtifactFolder alone --------------------

def dictionary_accessors(cls: type) -> list[str]:
    """The public methods and properties of `cls` whose declared result is, or holds, a dictionary
    of anything (`dict[str, Any]`, a bare `dict`, `Any`): what a caller would read by key."""
    import typing
    from collections.abc import Mapping

    def loose(hint: object) -> bool:
        if hint is typing.Any or hint in (dict, Mapping):
            return True
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (dict, Mapping) and args and args[-1] is typing.Any:
            return True
        return any(loose(a) for a in args)

    found = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        if callable(function) and loose(typing.get_type_hints(function).get("return")):
            found.append(name)
    return found


def test_the_folder_hands_out_records_not_dictionaries() -> None:
    """Every accessor of ArtifactFolder returns a record (or plain values): with strict mypy, a
    manifest field read by key anywhere in the package is a type error."""
    from cvt_export.artifacts import ArtifactFolder

    assert dictionary_accessors(ArtifactFolder) == []


class _Planted:
    def raw(self) -> dict[str, Any]:
        return {}

    @property
    def loose(self) -> list[dict] | None:  # type: ignore[type-arg]
        return None

    def entry(self) -> FileEntry | None:
        return None

    def names(self) -> dict[str, str]:
        return {}


def test_the_accessor_check_finds_a_planted_dictionary() -> None:
    assert dictionary_accessors(_Planted) == ["raw", "loose"]


MANIFEST_NAMES = ("manifest.json", ".scratch-manifest.json", "MANIFEST", "SCRATCH_MANIFEST")


def manifest_file_uses(package: Path) -> list[str]:
    """Where a module other than artifacts.py names the manifest file (the literal file name, or
    artifacts' constant for it), parsed with ast. A message that mentions the file is not a use:
    its text is a longer string."""
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "artifacts.py":
            continue
        uses = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = (node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else
                    node.attr if isinstance(node, ast.Attribute) else
                    node.id if isinstance(node, ast.Name) else None)
            if name in MANIFEST_NAMES:
                uses.append((node.lineno, f"{path.relative_to(package.parent)}:{node.lineno} {name}"))
        found += [text for _, text in sorted(uses)]
    return found


def test_no_module_but_the_folder_reads_or_writes_the_manifest() -> None:
    """Only artifacts.py opens, writes or removes manifest.json (records.py defines its contents)."""
    assert manifest_file_uses(PACKAGE) == []


def test_the_manifest_check_finds_planted_uses(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "artifacts.py").write_text('MANIFEST = "manifest.json"\n')
    (package / "reader.py").write_text(
        'import json\n'
        'from pkg import artifacts\n'
        'def read(out, name):\n'
        '    a = json.loads((out / "manifest.json").read_text())\n'
        '    b = (out / artifacts.MANIFEST).unlink()\n'
        '    raise ValueError(f"{out}: no valid manifest.json")\n')
    assert manifest_file_uses(package) == ["pkg/reader.py:4 manifest.json", "pkg/reader.py:5 MANIFEST"]


# The modules that take an artifact folder and read what it records, and the reads by a literal key
# left in them: none is of the manifest (each is named with what it reads).
FOLDER_READERS = ("artifacts.py", "build.py", "reference.py", "derive.py", "validate.py", "probes.py",
                  "exporter.py", "calibration.py", "backends/__init__.py", "backends/torch.py",
                  "backends/ort.py", "backends/openvino.py", "backends/tensorrt.py", "triton/repository.py")
def _named(module: str, what: str, *keys: str) -> dict[tuple[str, str], str]:
    return {(module, key): what for key in keys}


FOLDER_UNRELATED = {
    **_named("artifacts.py", "_read: the raw file's schema number, before the record is built", "schema"),
    **_named("artifacts.py", "scratch_origin: an earlier release's scratch manifest (it may hold only this)",
             "scratch_of"),
    **_named("artifacts.py", "ONNX_FILES (precisions.FILES): a precision's file name", "fp32", "int8"),
    **_named("build.py", "FILES (precisions.FILES)", "fp32", "fp16", "int8", "int8dyn", "mixed"),
    **_named("build.py", "imageset.sizes(): the bundled set's roles", "selection"),
    **_named("calibration.py", "os.environ", "CVT_EXPORT_CACHE", "XDG_CACHE_HOME"),
    **_named("backends/ort.py", "RunnerInfo.details", "threads"),
    **_named("backends/ort.py", "ONNX Runtime's profile (its own JSON)", "ts", "dur", "cat", "name", "args",
             "input_type_shape", "op_name", "provider"),
    **_named("backends/openvino.py", "OpenVINO's runtime model and compiled-model properties",
             "originalLayersNames", "layerType", "INFERENCE_NUM_THREADS"),
    **_named("triton/repository.py", "a Triton config's parameters and the repository's own record",
             "precision_mode", "models", "backend", "threads", "precision"),
}


def test_what_reads_an_artifact_folder_reads_no_key_of_its_manifest() -> None:
    """In the modules that take an artifact folder, no read by a literal key but the named ones
    (and each named one is still there: the list does not outlive what it excuses)."""
    reads = {module: string_keyed_reads(PACKAGE / module) for module in FOLDER_READERS}
    found = [f"{module}:{line} {key!r}" for module, at in reads.items() for line, key in at
             if (module, key) not in FOLDER_UNRELATED]
    assert found == []
    assert {(module, key) for module, at in reads.items() for _, key in at} >= set(FOLDER_UNRELATED)


# Every read by a literal key in the package outside records.py. Issue #29 asks for none of a
# manifest or report field, allowing reads of other dictionaries that share a key name, each named:
# those are FOLDER_UNRELATED above and PACKAGE_UNRELATED here (other programs' data, the environment,
# the bounds table, a file checked field by field before it becomes a record, a dictionary keyed by
# a role or a label). No other read is left (there were 1028 before the records): a read added
# anywhere fails here until it is a record's field or is named with what it reads.
PACKAGE_UNRELATED = {
    **_named("cli/common.py", "os.environ", "TERMINAL_WIDTH"),
    **_named("cli/github.py", "os.environ", "GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY"),
    **_named("startup.py", "sys.modules", "multiprocessing"),
    **_named("machine.py", "/proc/cpuinfo's fields", "model name", "flags"),
    **_named("harness/cluster.py", "Ray's ray.nodes()", "CPU", "Resources", "Alive", "NodeID"),
    **_named("harness/recommend.py", "read(): a recommendation.json checked field by field before use",
             "schema", "objectives", "unmet"),
    **_named("harness/recommend.py", "metrics.BOUNDS[precision], the bounds table", "cosine_min"),
    **_named("regress.py", "load_baseline: the raw file's schema, before the record is built", "schema"),
    **_named("regress.py", "metrics.BOUNDS[precision], the bounds table", "max_abs", "cosine_min",
             "top1_agreement"),
    **_named("render/tune.py", "the held-out roles by name (records.RoleSize values)", "selection",
             "confirmation"),
    **_named("triton/server.py", "os.environ, and the keeper's event lines (its own protocol)",
             "CVT_EXPORT_PYTHONPATH", "LD_LIBRARY_PATH", "PYTHONHOME", "PYTHONPATH", "cause", "code",
             "error", "event", "model", "pid"),
    **_named("harness/served.py", "Triton's model config, repository index and statistics (its own JSON)",
             "config", "name", "input", "output", "dims", "string_value", "parameters", "precision",
             "models", "state", "model_stats", "inference_stats", "ns", "count", "success",
             "batch_size", "compute_infer", "batch_stats"),
    **_named("harness/accuracy.py", "a shard part's .npz arrays by name (numpy's archive: a row's top5 and "
             "cosine, the images' name, label, ok, error)", "top5", "cosine", "name", "label", "ok", "error"),
    **_named("harness/cluster.py", "a shard's images part (.npz arrays): their digests", "sha256"),
    **_named("deploy/measure.py", "the held-out roles by name (Bench.rows)", "selection", "confirmation"),
    **_named("deploy/__init__.py", "the held-out roles by name (Bench.rows)", "selection", "confirmation"),
    **_named("deploy/__init__.py", "the configurations by label", "chosen", "default"),
    **_named("deploy/search.py", "the confirmed configurations by label", "chosen", "default"),
    **_named("deploy/__init__.py", "check_record_files: the raw file's schema, whose record may be "
             "another's", "schema"),
    **_named("triton/guard.py", "the launcher's instructions to the keeper (its own protocol)", "command",
             "env", "http_port", "log", "shm_prefix", "work"),
    **_named("triton/python_model.py", "Triton's arguments and model config to a python model",
             "backend", "input", "model_config", "model_repository", "model_version", "output",
             "parameters", "precision", "string_value", "threads"),
}


def keyed_reads(package: Path, named: Mapping[tuple[str, str], str] | None = None) -> dict[str, int]:
    """Reads by a literal key per module outside records.py, leaving out the `named` ones."""
    named = named or {}
    counts = {}
    for p in sorted(package.rglob("*.py")):
        module = str(p.relative_to(package))
        if p.name != "records.py":
            counts[module] = sum((module, key) not in named for _, key in string_keyed_reads(p))
    return {module: n for module, n in counts.items() if n}


def test_every_read_by_key_across_the_package_is_named() -> None:
    named = {**FOLDER_UNRELATED, **PACKAGE_UNRELATED}
    assert keyed_reads(PACKAGE, named) == {}
    every = {(str(p.relative_to(PACKAGE)), key) for p in PACKAGE.rglob("*.py")
             for _, key in string_keyed_reads(p)}
    assert every >= set(PACKAGE_UNRELATED)  # each name still excuses a read


def test_the_package_count_sees_a_planted_read(tmp_path: Path) -> None:
    copy = tmp_path / "cvt_export"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "clock.py").open("a") as f:
        f.write('\n\ndef planted(report):\n    return report["results"]\n')
    found = keyed_reads(copy, {**FOLDER_UNRELATED, **PACKAGE_UNRELATED})
    assert found == {"clock.py": 1}
