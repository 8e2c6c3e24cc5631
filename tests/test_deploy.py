"""`cvt-export deploy`: an SLO search on the real tritonserver whose candidates' served answers are
checked before their speed counts, a confirmation run separate from the search, and one-line
refusals of what it cannot use.

Oracles: the served answers are compared here with ONNX Runtime run in this process on the same
inputs (not with deploy's own figures); the SLO is judged from the recorded per-candidate figures
against the bound the test chose; the written repository is served again by the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_user_error, run_cli, triton_or_skip

pytestmark = pytest.mark.slow



@pytest.mark.parametrize("args, cause", [
    (["--slo", "fast", "--budget", "cosine>=0.99"], "--slo 'fast': write it as p99<=60ms@rate=40"),
    (["--slo", "p99<=0ms@rate=5", "--budget", "cosine>=0.99"], "the bound must be in (0, 600000]"),
    (["--slo", "p99<=100ms@rate=5"], "--budget: give the fidelity bound"),
    (["--slo", "p99<=100ms@rate=5", "--budget", "cosine>=2"], "cosine"),
    (["--slo", "p99<=100ms@rate=5", "--budget", "cosine>=0.99", "--max-candidates", "0"], "--max-candidates"),
    (["--slo", "p99<=100ms@rate=5", "--budget", "cosine>=0.99", "--name", "a/b"], "--name"),
])
def test_deploy_refuses_bad_input_in_one_line(exported: Path, tmp_path: Path, args: list[str],
                                              cause: str) -> None:
    out = tmp_path / "repo"
    assert_user_error(run_cli("cvt-export", "deploy", "--artifacts", str(exported), "--out", str(out), *args),
                      cause)
    assert not out.exists()


def test_deploy_refuses_to_write_into_the_artifact_folder(exported: Path) -> None:
    result = run_cli("cvt-export", "deploy", "--artifacts", str(exported), "--out", str(exported / "repo"),
                     "--slo", "p99<=1000ms@rate=2", "--budget", "cosine>=0.99")
    assert_user_error(result, "is an artifact folder or inside one")
    assert not (exported / "repo").exists()


def test_deploy_checks_answers_before_speed_and_confirms_separately(exported: Path, tmp_path: Path) -> None:
    """A small search (4 candidates, 20 requests each) under a bound this machine meets with room
    (p99 <= 5 s at 3 requests/s) and a budget that random-weight INT8 misses (cosine >= 0.999; it
    gives about 0.992): INT8 candidates are refused on their answers and never timed."""
    triton_or_skip()
    out = tmp_path / "repo"
    result = run_cli("cvt-export", "deploy", "--artifacts", str(exported), "--out", str(out),
                     "--slo", "p99<=5000ms@rate=3", "--budget", "cosine>=0.999", "--max-candidates", "4",
                     "--requests", "20", "--confirm-requests", "40", "--fidelity-images", "6", timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((out / "cvt.deploy.json").read_text())
    candidates = record["search"]["candidates"]
    assert 1 <= len(candidates) <= 4
    for c in candidates:
        assert c["fidelity"]["n"] == 6  # answers were checked first, for every candidate
        if c["candidate"]["precision"] == "int8":
            assert not c["within_budget"] and "percentile_ms" not in c, c
        if "percentile_ms" in c:
            assert c["within_budget"] and c["fidelity"]["cosine_min"] >= 0.999
            n = c["answered"] - 1  # kept up: answers at >= 90% of the arrival rate, or within 5 s of it
            kept = c["achieved_rate"] >= 0.9 * c["offered_rate"] or \
                n / c["achieved_rate"] <= n / c["offered_rate"] + 5.0
            assert c["meets"] == (c["failed"] == 0 and c["percentile_ms"] <= 5000 and kept)
            assert abs(c["offered_rate"] - 3) < 2  # 20 Poisson arrivals at 3/s
    chosen, conf = record["chosen"], record["confirmation"]
    assert chosen["meets"] and conf["held"] and conf["images"] == 6 and conf["requests"] == 40
    assert conf["written_repository_fidelity"]["n"] == 6
    assert conf["p99_ms"] <= 5000 and conf["failed"] == 0
    for side in ("default", "chosen"):
        steps = record["sustained"][side]["steps"]
        assert steps and record["sustained"][side]["highest_rate"] == max(
            [s["rate"] for s in steps if s["meets"]], default=0.0)
        confirmed = conf["configurations"].get(side, conf["configurations"]["chosen"])
        at_slo = next(s for s in steps if s["rate"] == 3)  # the ladder's step at the SLO rate is
        # the confirmation itself
        assert at_slo["percentile_ms"] == confirmed["percentile_ms"] and at_slo["meets"] == confirmed["meets"]
    assert not list(out.glob(".staging-*"))  # the candidates' repositories went with the run
    assert (out / "cvt.deploy.md").read_text().startswith("# Deploy search")
    assert (out / "cvt.deploy.svg").read_text().startswith("<svg")
    # the written repository serves the written configuration, with answers the oracle agrees with
    from cvt_export.backends import get_backend
    from cvt_export.harness.served import Target, connected, infer
    from cvt_export.triton.repository import parse_config
    from cvt_export.triton.server import Server

    # the confirmation: the chosen and the default configuration in interleaved rounds, and the
    # written one is the chosen one unless the default held the SLO in every round and was no slower
    rounds = {label: c["rounds"] for label, c in conf["configurations"].items()}
    assert all(len(r) == 3 and sum(x["requests"] for x in r) == 40 for r in rounds.values())
    if "default" in rounds:
        d, c = conf["configurations"]["default"], conf["configurations"]["chosen"]
        default_wins = d["held"] and (d["percentile_ms"] <= c["percentile_ms"] or not c["held"])
        assert conf["written"] == ("default" if default_wins else "chosen"), conf["why"]
    picked = conf["written_candidate"]
    config = parse_config(out / "cvt" / "config.pbtxt")
    assert config.max_batch_size == picked["max_batch"]
    assert config.instance_group[0].count == picked["instances"]
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with get_backend(picked["backend"]).compile(exported, picked["precision"]) as run:
        expected = run(x)
    with Server(out) as server:
        target = Target(server.http_url, "cvt")
        with connected(target) as client:
            got = infer(target, client, x)
    assert np.abs(got - expected).max() <= 1e-3
