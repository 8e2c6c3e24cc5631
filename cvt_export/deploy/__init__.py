"""`cvt-export deploy`: the Triton configuration that meets a latency SLO at a given traffic, with
served answers checked before any speed counts.

On the real tritonserver of this machine (python runtime): every precision the folder offers x
each runner, under the default scheduling (a candidate whose answers on the selection images
miss the budget is never timed); a hill climb over instances, max batch and queue delay from
the best of them; the lowest percentile among those that met the SLO; a confirmation separate
from the search, interleaved with the default configuration on arrivals the search never saw,
and ladders of sustained rates judged the same way; the decided configuration written to the
repository, served from there once more and checked again. The record (`NAME.deploy.json`,
`.md`, `.svg`) is rendered by `cvt_export.render.deploy`. Why each rule is what it is, with the
runs that showed it: docs/triton.md ("SLO search").

This module is the command and its record; `plan` holds the SLO, the settings and a candidate
configuration, `measure` serves and measures one configuration, `search` decides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from cvt_export import artifacts, metrics
from cvt_export.artifacts import ArtifactFolder
from cvt_export.deploy.measure import Bench, _fid
from cvt_export.deploy.plan import ROUNDS, Candidate, DeployError, Settings, Slo, default_candidate
from cvt_export.deploy.search import choose, confirm, decide, search, sustained_rates
from cvt_export.harness import served
from cvt_export.records import Confirmation, DeployRecord, DeploySearch
from cvt_export.render import deploy as render
from cvt_export.triton.repository import RepoOptions, check_destination, write_repository

__all__ = ["Bench", "DeployError", "Settings", "Slo", "check_record_files", "confirm", "decide", "deploy",
           "sustained_rates"]

def deploy(folder: ArtifactFolder | Path, out: Path, name: str, settings: Settings,
           progress: Callable[[str], None] = lambda s: None) -> DeployRecord:
    """Search, choose, write `out/name`, confirm; returns the record written as
    `out/NAME.deploy.json` (and .md, .svg), read back from the file's JSON."""
    folder = artifacts.as_folder(folder)
    settings.check()
    opts = RepoOptions(name=name)
    opts.check()
    check_destination(folder, out, opts)  # refused now, not after the search
    check_record_files(out, name)
    with artifacts.writer(out, "--out"):  # the repository's one writer from the search to the record
        check_destination(folder, out, opts)  # again, now that no other writer can change them
        check_record_files(out, name)
        return _deploy(folder, out, name, settings, progress)


SEARCH_HOW = ("models at the default scheduling, then a hill climb over instances, max batch and queue delay "
              "(one notch per knob, > 5% better to move)")


def _deploy(folder: ArtifactFolder, out: Path, name: str, settings: Settings,
            progress: Callable[[str], None]) -> DeployRecord:
    from cvt_export import machine
    from cvt_export.triton.server import Server

    started = time.time()
    # The candidates' repositories live in a staging folder of the output, under its lock: one that
    # a killed deploy left (its servers die with it) is removed by the next write to this repository.
    with artifacts.staging(out) as scratch:
        bench = Bench(folder, settings, scratch, progress)
        measured = search(bench)
        chosen = choose(measured)
        record = DeployRecord(
            machine=machine.describe(), slo=str(settings.slo), budget=tuple(str(b) for b in settings.budgets),
            artifacts=str(folder.path),
            search=DeploySearch(SEARCH_HOW, tuple(measured), len(bench.rows["selection"]), settings.requests),
            chosen=chosen)
        if chosen is None:
            return _write_record(out, name, record)
        cand = Candidate(**dataclasses.asdict(chosen.candidate))
        default = default_candidate()
        configs = {"chosen": cand} if cand == default else {"default": default, "chosen": cand}
        progress("confirming the chosen configuration against the default, interleaved")
        with contextlib.ExitStack() as stack:
            servers = {label: stack.enter_context(bench.serve(c, scratch / label))
                       for label, c in configs.items()}
            targets = {label: served.Target(server.http_url, "cvt") for label, server in servers.items()}
            confirmed = confirm(bench, targets, {label: c.label() for label, c in configs.items()})
            progress("highest sustained rate: default and chosen, interleaved")
            ladders = sustained_rates(bench, targets, settings.slo, settings.confirm_requests, confirmed)
    written, why = decide(confirmed)
    final = configs[written]
    progress(f"writing {out / name}")
    write_repository(folder, out, final.options(name), held=True)
    with Server(out) as server:  # the repository as written answers as it did
        again = bench.fidelity(served.Target(server.http_url, name), "confirmation")
    it = confirmed[written]
    confirmation = Confirmation(
        fidelity=it.fidelity, within_budget=it.within_budget, percentile_ms=it.percentile_ms,
        p99_ms=it.p99_ms, achieved_rate=it.achieved_rate, failed=it.failed, met_rounds=it.met_rounds,
        meets=it.meets, written=written, written_configuration=final.label(),
        written_candidate=final.configuration(), why=why,
        images=len(bench.rows["confirmation"]), requests=settings.confirm_requests, rounds=ROUNDS,
        written_repository_fidelity=_fid(again), configurations=confirmed,
        held=bool(it.held and metrics.within(settings.budgets, again)))
    sustained = dict(ladders)
    if "default" not in sustained:  # the chosen one is the default
        sustained["default"] = sustained["chosen"]
    done = dataclasses.replace(record, confirmation=confirmation, sustained=sustained,
                               seconds=time.time() - started)
    return _write_record(out, name, done)


RECORD_SUFFIXES = (".deploy.json", ".deploy.md", ".deploy.svg")


def check_record_files(out: Path, name: str) -> None:
    """NAME.deploy.json, .md and .svg are replaced only when an earlier deploy wrote them (its
    JSON record says so); any other file of those names is the user's, and deploy stops before the
    search."""
    record = out / f"{name}.deploy.json"
    ours = False
    if record.is_file() and not record.is_symlink():
        try:
            ours = json.loads(record.read_text()).get("schema") == "cvt-deploy/1"
        except (OSError, ValueError, AttributeError):
            ours = False
    for suffix in RECORD_SUFFIXES:
        path = out / f"{name}{suffix}"
        if (path.exists() or path.is_symlink()) and (not ours or path.is_symlink() or not path.is_file()):
            raise DeployError(f"--out {out}: {path.name} exists and was not written by `cvt-export deploy`; "
                              "choose another --name or --out (nothing was changed)")


def _write_record(out: Path, name: str, record: DeployRecord) -> DeployRecord:
    """The record's file, then its Markdown and plot rendered from the file's own JSON."""
    text = json.dumps(record.to_json(), indent=2) + "\n"
    artifacts.atomic_write(out / f"{name}.deploy.json", text)
    record = DeployRecord.from_json(json.loads(text), str(out / f"{name}.deploy.json"))
    slo = Slo.parse(record.slo)
    artifacts.atomic_write(out / f"{name}.deploy.md", "\n".join(render.markdown(record, slo)) + "\n")
    artifacts.atomic_write(out / f"{name}.deploy.svg", render.pareto_svg(record, slo))
    return record
