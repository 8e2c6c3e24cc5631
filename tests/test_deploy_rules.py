"""deploy's confirmation rules, on a load whose answers the test fixes: the interleaved rounds
against the default, which configuration is written and why, and the sustained-rate ladders
walked together. (The search and the confirmation on the real tritonserver: test_deploy.py.)

Oracles: the ladder's rates and the order of the runs worked out here by hand from the
definition (factor 1.25 up from the SLO rate while the bound holds, else down until it holds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cvt_export import deploy, metrics
from cvt_export.deploy import measure
from cvt_export.records import Fidelity, OpenLoopRun
from helpers import assert_user_error, run_cli


class Load:
    """deploy.Bench's two calls, answering from a table: each configuration holds the bound up to
    its capacity (requests/s) with the given percentile; every call is logged."""

    def __init__(self, capacity: dict[str, float], percentile: dict[str, float], cosine: float = 0.9999,
                 confirm_requests: int = 40) -> None:
        self.capacity, self.percentile, self.cosine = capacity, percentile, cosine
        self.settings = deploy.Settings(slo=deploy.Slo.parse("p99<=100ms@rate=3"),
                                        budgets=[metrics.parse_budget("cosine>=0.999")],
                                        confirm_requests=confirm_requests)
        self.calls: list[tuple[str, float, int, int | None]] = []

    def progress(self, text: str) -> None:
        pass

    def fidelity(self, target: Any, role: str) -> Fidelity:
        return Fidelity(max_abs=0.01, mean_abs=0.001, cosine_min=self.cosine, cosine_mean=self.cosine,
                        top1_agreement=1.0, top5_agreement=1.0, kl_mean=0.0, kl_max=0.0, worst_image="a",
                        worst_cosine=self.cosine, n=6)

    def load(self, target: Any, role: str, rate: float, requests: int,
             seed: int | None = None) -> OpenLoopRun:
        label = target.model
        self.calls.append((label, rate, requests, seed))
        ok = rate <= self.capacity[label] + 1e-9
        value = self.percentile[label] if ok else 400.0
        return OpenLoopRun(percentile_ms=value, p99_ms=value, answered=requests, failed=0,
                           achieved_rate=rate if ok else self.capacity[label], offered_rate=rate,
                           meets=value <= self.settings.slo.limit_ms and ok)


def targets(*labels: str) -> dict[str, Any]:
    from cvt_export.harness.served import Target

    return {label: Target("127.0.0.1:1", label) for label in labels}


def test_the_ladders_start_from_the_confirmation_and_are_judged_like_it() -> None:
    bench = Load({"default": 4.0, "chosen": 6.0, "slow": 2.0}, {"default": 80, "chosen": 60, "slow": 90})
    confirmed = deploy.confirm(bench, targets("default", "chosen", "slow"))
    at_slo = len(bench.calls)
    got = deploy.sustained_rates(bench, targets("default", "chosen", "slow"), bench.settings.slo,
                                 requests=40, confirmed=confirmed)
    up = [3 * 1.25 ** k for k in range(5)]        # 3, 3.75, 4.69, 5.86, 7.32
    down = [3 / 1.25 ** k for k in range(4)]      # 3, 2.4, 1.92
    assert got["default"].highest_rate == pytest.approx(up[1])
    assert got["chosen"].highest_rate == pytest.approx(up[3])
    assert got["slow"].highest_rate == pytest.approx(down[2])
    assert [s.rate for s in got["chosen"].steps] == pytest.approx(up)
    assert [s.rate for s in got["slow"].steps] == pytest.approx(sorted(down[:3]))
    for label in ("default", "chosen", "slow"):  # the step at the SLO rate is the confirmation itself
        step = next(s for s in got[label].steps if s.rate == 3)
        assert step.percentile_ms == confirmed[label].percentile_ms
        assert (step.meets, step.met_rounds) == (confirmed[label].meets, confirmed[label].met_rounds)
    # every further step: three rounds of 14/13/13 requests on seeds 1, 2, 3 (the confirmation's
    # arrivals), the order swapping each round; each configuration at its own next rate
    order = [(label, round(rate, 3), n, seed) for label, rate, n, seed in bench.calls[at_slo:]]

    def step(*pairs: tuple[str, float]) -> list[tuple[str, float, int, int]]:
        runs = []
        for r, (n, seed) in enumerate([(14, 1), (13, 2), (13, 3)]):
            runs += [(label, rate, n, seed) for label, rate in (pairs if r % 2 == 0 else pairs[::-1])]
        return runs

    assert order == (step(("default", 3.75), ("chosen", 3.75), ("slow", 2.4))
                     + step(("default", 4.688), ("chosen", 4.688), ("slow", 1.92))
                     + step(("chosen", 5.859),) + step(("chosen", 7.324),))


def test_a_ladder_measures_the_slo_rate_itself_without_a_confirmation() -> None:
    bench = Load({"chosen": 3.5}, {"chosen": 60})
    got = deploy.sustained_rates(bench, targets("chosen"), bench.settings.slo, requests=30, steps_at_most=3)
    assert [round(rate, 3) for _, rate, _, _ in bench.calls] == [3] * 3 + [3.75] * 3
    assert got["chosen"].highest_rate == 3 and len(got["chosen"].steps) == 2


def test_the_confirmation_interleaves_rounds_on_shared_arrivals() -> None:
    bench = Load({"default": 2.0, "chosen": 6.0}, {"default": 80, "chosen": 60}, confirm_requests=40)
    got = deploy.confirm(bench, targets("default", "chosen"))
    assert [(label, n, seed) for label, _, n, seed in bench.calls] == [
        ("default", 14, 1), ("chosen", 14, 1), ("chosen", 13, 2), ("default", 13, 2),
        ("default", 13, 3), ("chosen", 13, 3)]
    assert got["chosen"].held and got["chosen"].met_rounds == 3
    assert not got["default"].meets and got["default"].met_rounds == 0
    assert got["chosen"].percentile_ms == 60 and got["default"].percentile_ms == 400


@pytest.mark.parametrize(("capacity", "percentile", "cosine", "written", "says"), [
    # the default misses the SLO at its rate, the chosen one holds it: the chosen one is written
    ({"default": 2.0, "chosen": 6.0}, {"default": 80, "chosen": 60}, 0.9999, "chosen", "0 of 3"),
    # both hold it and the default is no slower: the search's difference did not hold
    ({"default": 6.0, "chosen": 6.0}, {"default": 70, "chosen": 72}, 0.9999, "default", "did not hold"),
    # both hold it, the chosen one is faster: written
    ({"default": 6.0, "chosen": 6.0}, {"default": 90, "chosen": 60}, 0.9999, "chosen", "3 of 3"),
    # neither holds it: the chosen one is written and the SLO did not hold (deploy exits 1)
    ({"default": 2.0, "chosen": 2.0}, {"default": 80, "chosen": 60}, 0.9999, "chosen", "neither"),
])
def test_the_default_is_replaced_only_when_the_confirmation_says_so(
        capacity: dict[str, float], percentile: dict[str, float], cosine: float, written: str,
        says: str) -> None:
    bench = Load(capacity, percentile, cosine)
    confirmed = deploy.confirm(bench, targets("default", "chosen"))
    label, why = deploy.decide(confirmed)
    assert label == written and says in why, why
    assert confirmed[label].held == (capacity[label] >= 3 and percentile[label] <= 100)


def test_answers_outside_the_budget_never_hold() -> None:
    bench = Load({"default": 6.0, "chosen": 6.0}, {"default": 90, "chosen": 60}, cosine=0.99)
    confirmed = deploy.confirm(bench, targets("default", "chosen"))
    assert confirmed["chosen"].meets and not confirmed["chosen"].held
    assert deploy.decide(confirmed)[1].endswith("neither held it in every round")


def test_a_search_that_chose_the_default_confirms_it_alone() -> None:
    bench = Load({"chosen": 6.0}, {"chosen": 60})
    confirmed = deploy.confirm(bench, targets("chosen"))
    assert deploy.decide(confirmed) == ("chosen", "the search chose the default configuration")
    assert {label for label, *_ in bench.calls} == {"chosen"}


def test_a_short_run_is_judged_by_its_span_a_long_one_by_its_rate() -> None:
    # 13 arrivals at 3/s span 4 s; answers spread over 5 s (the last one 1 s late): 80% of the
    # rate, but within a 2 s bound of the arrivals' span: the server kept up
    assert measure.kept_up(13, 12 / 5.0, 3.0, limit_ms=2000)
    assert not measure.kept_up(13, 12 / 5.0, 3.0, limit_ms=500)
    # 400 arrivals at 3/s (133 s) answered at 2.5/s: 20 s behind, far beyond any bound here
    assert not measure.kept_up(400, 2.5, 3.0, limit_ms=2000)
    assert measure.kept_up(400, 2.8, 3.0, limit_ms=100)  # 93% of the rate
    assert not measure.kept_up(1, 3.0, 3.0, limit_ms=2000) and not measure.kept_up(13, 0.0, 3.0, 2000)


@pytest.mark.parametrize(("files", "refused"), [
    ({}, False),
    ({"cvt.deploy.json": '{"schema": "cvt-deploy/1"}', "cvt.deploy.md": "# Deploy search"}, False),
    ({"cvt.deploy.md": "my notes"}, True),                             # no record: the user's file
    ({"cvt.deploy.json": '{"mine": 1}', "cvt.deploy.svg": "<svg/>"}, True),
    ({"cvt.deploy.json": "not json"}, True),
    ({"other.deploy.json": "not json"}, False),                        # another name's files
])
def test_deploy_replaces_only_its_own_records(tmp_path: Path, files: dict[str, str], refused: bool) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    if refused:
        with pytest.raises(deploy.DeployError, match="was not written by `cvt-export deploy`"):
            deploy.check_record_files(tmp_path, "cvt")
    else:
        deploy.check_record_files(tmp_path, "cvt")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_deploy_record_behind_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.json").write_text('{"schema": "cvt-deploy/1"}')
    (tmp_path / "cvt.deploy.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(deploy.DeployError, match=r"cvt\.deploy\.json exists"):
        deploy.check_record_files(tmp_path, "cvt")


def test_the_command_refuses_a_users_file_before_the_search(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    (out / "cvt.deploy.md").write_text("my notes")
    result = run_cli("cvt-export", "deploy", "--artifacts", str(exported), "--out", str(out),
                     "--slo", "p99<=1000ms@rate=2", "--budget", "cosine>=0.99")
    assert_user_error(result, "cvt.deploy.md exists and was not written by `cvt-export deploy`")
    assert sorted(p.name for p in out.iterdir()) == ["cvt.deploy.md"]
    assert (out / "cvt.deploy.md").read_text() == "my notes"
