"""The accuracy pass on a Ray cluster: the same shards, evaluated by one actor per node.

Ray is the engine (`pip install "cvt-export[ray]"`); nothing here schedules work across machines
by itself. The driver (this process) plans the shards exactly as the single-machine pass does and
keeps two shards in flight per actor; each actor, pinned to its node, opens the artifact folder
and the dataset at the same paths (a shared file system on a real cluster), holds its own
reference model and backend sessions, decodes and evaluates whole shards and hands back their
per-image arrays. The driver alone writes shard files and the reference cache, so the files, and
the figures made from them, are the single-machine pass's. An actor whose node is lost fails its
calls; the shards it held go back to the queue and run on the nodes still there.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from cvt_export.artifacts import ArtifactFolder
from cvt_export.harness import accuracy as acc
from cvt_export.records import AccuracyReport, ClusterInfo
from cvt_ref.errors import CvtError

log = logging.getLogger(__name__)

IN_FLIGHT = 2  # shards per actor: one running, one queued behind it


class ClusterError(CvtError):
    """No Ray, no cluster at the address, or no node left to run on."""


class NodeEvaluator:
    """The body of the per-node actor (Ray wraps it with `ray.remote`)."""

    def __init__(self, artifacts: str, rows: list[acc.Row], batch: int, workers: int,
                 threads: int | None) -> None:
        folder = ArtifactFolder.open(artifacts)
        self.evaluator = acc.Evaluator(folder, rows, batch=batch, workers=workers, threads=threads)

    def evaluate(self, shard: acc.Shard, wanted: list[str], known: dict[str, Any]
                 ) -> tuple[acc.Parts, list[str], Any]:
        """A shard's parts, and the reference logits computed here (for the driver's cache)."""
        import numpy as np

        fresh_digests: list[str] = []
        fresh_logits: list[np.ndarray] = []

        def lookup(digests: list[str]) -> dict[int, np.ndarray]:
            return {i: known[d] for i, d in enumerate(digests) if d in known}

        def keep(digests: list[str], logits: np.ndarray) -> None:
            fresh_digests.extend(digests)
            fresh_logits.append(logits)

        parts = self.evaluator.evaluate(shard, wanted, lookup, keep)
        return parts, fresh_digests, (np.concatenate(fresh_logits) if fresh_logits else None)


def reachable(address: str, timeout: float = 5.0) -> None:
    """A cluster's head answers at HOST:PORT, or one line now (Ray itself retries for minutes)."""
    import socket

    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--ray {address}: give the head's address as HOST:PORT (such as "
                           "10.0.0.5:6379) or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e}); start one "
                           "with `ray start --head` or give its address") from None


def connect(address: str) -> Any:
    try:
        import ray
    except ImportError:
        raise ClusterError('--ray needs Ray: pip install "cvt-export[ray]"') from None
    reachable(address)
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"--ray {address}: cannot connect to a Ray cluster there ({e}); start one "
                               "with `ray start --head` or give its address") from None
    return ray


def _actors(ray: Any, cfg: acc.PassConfig, folder: ArtifactFolder, rows: list[acc.Row],
            exclude: set[str]) -> dict[str, Any]:
    """One actor per live node with CPUs, pinned to it (it dies with its node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(NodeEvaluator)
    out = {}
    for node in ray.nodes():
        cpus = int(node.get("Resources", {}).get("CPU", 0))
        if not node.get("Alive") or cpus < 1 or node["NodeID"] in exclude:
            continue
        out[node["NodeID"]] = remote.options(
            num_cpus=cpus, max_restarts=0, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(str(folder.path.resolve()), rows, cfg.batch, cfg.workers, cfg.threads)
    return out


def prepare(folder: ArtifactFolder, rows: list[acc.Row], threads: int | None) -> None:
    """Make each row's derived files (optimized graphs, IRs) here, once, under the folder's lock,
    so the actors only read the folder."""
    from cvt_export.backends import BackendError, get_backend

    with folder.lock():
        for row in rows:
            if row.status == "ok":
                try:
                    with get_backend(row.backend).compile(folder, row.precision, threads=threads):
                        pass
                except BackendError as e:  # the actors would fail the same way: say it once
                    row.status, row.reason = "error", str(e)


def run(cfg: acc.PassConfig, folder: ArtifactFolder, address: str,
        progress: Callable[[acc.Progress], None] = lambda p: None) -> AccuracyReport:
    ray = connect(address)
    s = acc.setup(cfg, folder)
    prepare(folder, s.rows, cfg.threads)
    state = acc.Progress(s.plan.finished_images, len(s.entries))
    progress(state)
    tally = Tally()
    if s.plan.todo:
        _drive(ray, cfg, folder, s, state, progress, tally)
    report = acc.finish(cfg, folder, s, tally.took, state.started)
    info = ClusterInfo(address, len(tally.nodes), len(tally.lost), tally.redone, dict(tally.finished))
    return dataclasses.replace(report, cluster=info)


@dataclasses.dataclass
class Tally:
    took: acc.Took = dataclasses.field(default_factory=acc.Took)
    nodes: set[str] = dataclasses.field(default_factory=set)
    lost: set[str] = dataclasses.field(default_factory=set)
    redone: int = 0
    finished: dict[str, int] = dataclasses.field(default_factory=dict)


def _known(cfg: acc.PassConfig, shard: acc.Shard, cache: acc.ReferenceCache, ref_key: str) -> dict[str, Any]:
    """Reference logits the driver already has for a shard's images: those of a shard whose images
    part is finished (a row added later, a resumed pass), from the cache."""
    images = acc.read_part(cfg.out, shard, acc.IMAGES_PART, ref_key)
    if images is None:
        return {}
    digests = [bytes(d).hex() for d in images["sha256"]]
    found = cache.get(digests)
    return {digests[i]: v for i, v in found.items()}


def _drive(ray: Any, cfg: acc.PassConfig, folder: ArtifactFolder, s: acc.Setup, state: acc.Progress,
           progress: Callable[[acc.Progress], None], tally: Tally) -> None:
    from ray.exceptions import RayActorError

    cache = acc.ReferenceCache(cfg.cache_path, s.plan.ref_key, folder.variant.num_classes)
    queue = collections.deque(sh for sh in s.plan.shards if sh.key in s.plan.todo)
    lost = tally.lost
    actors = _actors(ray, cfg, folder, s.rows, lost)
    if not actors:
        raise ClusterError("the Ray cluster has no live node with a CPU")
    tally.nodes |= set(actors)
    running: dict[Any, tuple[str, acc.Shard]] = {}
    try:
        while queue or running:
            for node, actor in actors.items():
                while queue and sum(1 for n, _ in running.values() if n == node) < IN_FLIGHT:
                    shard = queue.popleft()
                    ref = actor.evaluate.remote(shard, s.plan.todo[shard.key],
                                                _known(cfg, shard, cache, s.plan.ref_key))
                    running[ref] = (node, shard)
            ready, _ = ray.wait(list(running), num_returns=1)
            node, shard = running.pop(ready[0])
            try:
                parts, digests, logits = ray.get(ready[0])
            except RayActorError as e:
                log.warning("node %s lost (%s): its shards go to the nodes left", node[:12], type(e).__name__)
                lost.add(node)
                actors.pop(node, None)
                queue.appendleft(shard)
                tally.redone += 1
                for ref, (n, sh) in list(running.items()):
                    if n == node:
                        running.pop(ref)
                        queue.appendleft(sh)
                        tally.redone += 1
                if not actors:
                    actors = _actors(ray, cfg, folder, s.rows, lost)
                    tally.nodes |= set(actors)
                    if not actors:
                        raise ClusterError("every Ray node was lost: run the same command again to "
                                           "finish from the shards written so far") from None
                continue
            if logits is not None:
                cache.put(digests, logits)
            tally.took.merge(parts)
            tally.finished[node] = tally.finished.get(node, 0) + 1
            acc.save(cfg.out, shard, parts, s.rows, s.plan.ref_key)
            state.images += len(shard.entries)
            progress(state)
    finally:
        cache.close()
        for actor in actors.values():
            ray.kill(actor)
