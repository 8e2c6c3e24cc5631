"""The composite action (action.yml) run as GitHub would run it: its steps' shell, in order, with
the `${{ ... }}` expressions of the step's env filled from the inputs, on a temporary repository
holding a baseline. The install step is skipped by its own condition (`install: false`, the test's
environment has cvt-export); its text is checked instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cvt_export import regress
from cvt_export.records import BaselineReference
from helpers import BIN

pytestmark = pytest.mark.slow  # a regression run on the cvt-13 export

ROOT = Path(__file__).resolve().parents[1]
EXPRESSION = re.compile(r"\$\{\{\s*([\w.-]+)\s*\}\}")


def _value(name: str, inputs: dict[str, str]) -> str:
    if name.startswith("inputs."):
        return inputs[name.removeprefix("inputs.")]
    assert name == "github.action_path", name
    return str(ROOT)


def _condition(text: str | None, inputs: dict[str, str]) -> bool:
    """The two condition forms the action uses: inputs.X == 'v' and inputs.X != 'v'."""
    if text is None:
        return True
    m = re.fullmatch(r"(inputs\.[\w-]+) (==|!=) '([^']*)'", text.strip())
    assert m, f"a condition this test cannot evaluate: {text}"
    equal = _value(m[1], inputs) == m[3]
    return equal if m[2] == "==" else not equal


def run_action(repo: Path, given: dict[str, str], summary: Path) -> list[subprocess.CompletedProcess[str]]:
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    declared = action["inputs"]
    assert set(given) <= set(declared), set(given) - set(declared)
    inputs = {name: str(spec.get("default", "")) for name, spec in declared.items()} | given
    results = []
    for step in action["runs"]["steps"]:
        assert step["shell"] == "bash"
        if not _condition(step.get("if"), inputs):
            continue
        env = {k: EXPRESSION.sub(lambda m: _value(m[1], inputs), str(v))
               for k, v in step.get("env", {}).items()}
        assert "${{" not in step["run"], "expressions belong in env, not in the script"
        full = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GITHUB_ACTIONS": "true",
                "GITHUB_STEP_SUMMARY": str(summary), "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **env}
        # GitHub runs a composite bash step as `bash --noprofile --norc -eo pipefail {0}`
        result = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                                cwd=repo, env=full, capture_output=True, text=True, timeout=900)
        results.append(result)
        if result.returncode != 0:
            break
    return results


def test_install_step_installs_the_actions_own_checkout() -> None:
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    install = action["runs"]["steps"][0]
    assert install["if"] == "inputs.install == 'true'"
    assert 'python -m pip install -q "$ACTION_PATH"' in install["run"]
    assert install["env"]["ACTION_PATH"] == "${{ github.action_path }}"


@pytest.fixture(scope="module")
def repo(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A user's repository: a committed baseline for the session's export (ort fp32/int8)."""
    root = tmp_path_factory.mktemp("user-repo")
    baseline = root / "reports" / "baseline" / "cvt-13.json"
    regress.run(baseline, update=True, artifacts_dir=exported, max_slowdown=None, iters=2,
                backends=("ort",), precisions=("fp32", "int8"))
    return {"root": root, "baseline": baseline, "exported": exported}


def test_the_action_passes_on_unchanged_artifacts(repo: dict[str, Any], tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    steps = run_action(repo["root"], {
        "install": "false", "export-command": f"cp -r '{repo['exported']}' artifacts-today",
        "artifacts": "artifacts-today", "backend": "ort", "precision": "fp32,int8",
        "report": "regress-report"}, summary)
    assert len(steps) == 2 and all(s.returncode == 0 for s in steps), steps[-1].stdout + steps[-1].stderr
    assert "regression check passed" in steps[-1].stdout
    assert "## cvt-bench regress: passed" in summary.read_text()
    report = json.loads((repo["root"] / "regress-report" / "report.json").read_text())
    assert {(r["backend"], r["precision"]) for r in report["results"] if r["status"] == "ok"} >= {
        ("ort", "fp32"), ("ort", "int8")}
    shutil.rmtree(repo["root"] / "artifacts-today")


def test_the_action_fails_with_annotations_and_a_summary(repo: dict[str, Any], tmp_path: Path) -> None:
    """A baseline whose reference logits moved by 1e-3 (as a changed kernel would move them)."""
    data = regress.load_baseline(repo["baseline"])
    moved = regress.decode(data.reference.logits) + np.float32(1e-3)
    other = repo["root"] / "moved.json"
    regress.write_baseline(other, dataclasses.replace(data,
                                                      reference=BaselineReference(regress.encode(moved))))
    summary = tmp_path / "summary.md"
    steps = run_action(repo["root"], {"install": "false", "baseline": "moved.json",
                                      "artifacts": str(repo["exported"]), "backend": "ort",
                                      "precision": "fp32"}, summary)
    gate = steps[-1]
    assert len(steps) == 1 and gate.returncode == 1, gate.stdout + gate.stderr
    assert "::error title=cvt-bench regress%3A FAIL PyTorch reference logits::" in gate.stdout
    assert "| FAIL | PyTorch reference logits |" in summary.read_text()
