"""The accuracy pass on a real Ray cluster on this machine (a head and a worker node, every
address 127.0.0.1, started and ended here): the same per-image results as the single-machine pass,
and a worker node killed mid-pass costs only its unfinished shards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ray_node import RAY_ENV
from test_accuracy_pass import make_folder

from cvt_export.artifacts import ArtifactFolder
from cvt_export.harness import accuracy as acc

pytestmark = pytest.mark.heavy
ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "cvt-export[ray]"')


@dataclass
class Node:
    proc: subprocess.Popen[bytes]

    def raylets(self) -> set[int]:
        return {pid for pid in _pids() if _pgid(pid) == self.proc.pid and b"raylet" in _cmd(pid)}

    def kill(self) -> None:
        """The node's whole process group, then the workers its raylets started (Ray gives them
        their own sessions)."""
        raylets = self.raylets()
        with _quiet():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for pid in _pids():
            if _raylet_of(pid) in raylets:
                with _quiet():
                    os.kill(pid, signal.SIGKILL)

    def alive(self, raylets: set[int]) -> list[int]:
        return [pid for pid in _pids() if (_pgid(pid) == self.proc.pid or _raylet_of(pid) in raylets)
                and b"(Z)" not in _stat(pid)]


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)  # type: ignore[arg-type]


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _read(pid: int, name: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:
        return b""


def _cmd(pid: int) -> bytes:
    return _read(pid, "cmdline")


def _stat(pid: int) -> bytes:
    return _read(pid, "stat")


def _pgid(pid: int) -> int:
    fields = _stat(pid).rsplit(b")", 1)[-1].split()
    return int(fields[2]) if len(fields) > 2 else -1


def _raylet_of(pid: int) -> int:
    for item in _read(pid, "environ").split(b"\0"):
        if item.startswith(b"RAY_RAYLET_PID="):
            return int(item.split(b"=", 1)[1] or -1)
    return -1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(*args: str) -> Node:
    script = str(Path(__file__).parent / "ray_node.py")
    return Node(subprocess.Popen([sys.executable, script, "start", "--block",
                                  "--node-ip-address", "127.0.0.1", "--num-cpus", "1", *args],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                 env={**os.environ, **RAY_ENV}))


@dataclass
class Cluster:
    address: str
    head: Node
    worker: Node
    other: Node


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    for k, v in RAY_ENV.items():
        monkeypatch.setenv(k, v)
    import ray._private.ray_constants as constants

    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", False)  # the driver, too, stays on 127.0.0.1
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = _start("--head", "--port", str(port), "--include-dashboard", "false", "--disable-usage-stats")
    workers: list[Node] = []
    raylets: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        time.sleep(2)
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        for joined in (2, 3):  # one at a time: two nodes starting together on one machine did not join
            workers.append(_start("--address", address))
            while time.monotonic() < deadline and sum(n["Alive"] for n in ray.nodes()) < joined:
                time.sleep(0.5)
            assert sum(n["Alive"] for n in ray.nodes()) == joined, "a worker node did not join"
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        raylets = head.raylets() | {pid for w in workers for pid in w.raylets()}
        yield Cluster(address, head, workers[0], workers[1])
    finally:
        ray.shutdown()
        raylets |= head.raylets() | {pid for w in workers for pid in w.raylets()}
        nodes = [*workers, head]
        for node in nodes:
            node.kill()
        left = [0]
        deadline = time.monotonic() + 20  # workers notice their raylet is gone within seconds
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = [pid for node in nodes for pid in node.alive(raylets)]
            for pid in left:
                with _quiet():
                    os.kill(pid, signal.SIGKILL)
        assert not left, f"Ray processes left running: {left}"


def _per_image(out: Path, rep_rows: list[acc.Row], shards: list[acc.Shard], ref_key: str
               ) -> dict[str, tuple[list[str], np.ndarray]]:
    images = acc._gather(out, shards, "images", ref_key)
    assert images is not None
    got = {}
    for name, key in [("reference", ref_key), *((r.name, r.key) for r in rep_rows)]:
        part = acc._gather(out, shards, name, key)
        assert part is not None, name
        order = np.argsort(images["name"])
        got[name] = (list(images["name"][order]), part["top5"][order])
    return got


def _assert_same(local_cfg: acc.PassConfig, folder: ArtifactFolder, local: Any, on: Any,
                 tmp_path: Path) -> None:
    """Per image, the same top-5 on the cluster as on one machine; and the same figures."""
    s = acc.setup(local_cfg, folder)
    a = _per_image(tmp_path / "local", s.rows, s.plan.shards, s.plan.ref_key)
    b = _per_image(tmp_path / "ray", s.rows, s.plan.shards, s.plan.ref_key)
    for name in a:
        assert a[name][0] == b[name][0]
        np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)
    for x, y in zip((local.reference, *local.rows), (on.reference, *on.rows), strict=True):
        assert (x.top1, x.top5, x.top1_agreement, x.cosine_min, x.n) == (y.top1, y.top5, y.top1_agreement,
                                                                          y.cosine_min, y.n)


def test_the_cluster_pass_equals_the_single_machine_pass(cluster: Cluster, exported: Path,
                                                          tmp_path: Path) -> None:
    from cvt_export.harness import cluster as on_ray

    make_folder(tmp_path / "val", 18)
    folder = ArtifactFolder.open(exported)
    rows = (("ort", "int8"),)
    local_cfg = acc.PassConfig(tmp_path / "val", tmp_path / "local", rows, batch=2, workers=0, shard_size=3)
    local = acc.run(local_cfg, folder)
    ray_cfg = acc.PassConfig(tmp_path / "val", tmp_path / "ray", rows, batch=2, workers=0, shard_size=3)
    seen: list[int] = []

    def kill_the_worker_after_one_shard(p: acc.Progress) -> None:
        seen.append(p.images)
        if len(seen) == 2:  # the first shard is written: the worker node goes, mid-pass
            cluster.worker.kill()

    on = on_ray.run(ray_cfg, folder, cluster.address, kill_the_worker_after_one_shard)
    assert on.dataset.shards == local.dataset.shards >= 4 and on.dataset.images == 18
    _assert_same(local_cfg, folder, local, on, tmp_path)
    assert on.cluster is not None and (on.cluster.nodes, on.cluster.lost) == (3, 1)
    assert on.cluster.shards_redone >= 1 and local.cluster is None
    assert sum(on.cluster.shards_by_node.values()) == on.dataset.shards
    assert len(on.cluster.shards_by_node) >= 2  # the nodes left shared the work
    assert not cluster.worker.alive(cluster.worker.raylets())


@pytest.mark.slow
def test_2000_images_on_two_workers_one_lost_equal_the_single_machine_pass(
        cluster: Cluster, exported: Path, tmp_path: Path) -> None:
    """2,000 images: every node (the head and both workers) finishes shards, one worker is killed
    at about half way, and the figures and per-image top-5s are the single-machine pass's."""
    from cvt_export.harness import cluster as on_ray

    make_folder(tmp_path / "val", 2000)
    folder = ArtifactFolder.open(exported)
    rows = (("ort", "int8"),)
    local_cfg = acc.PassConfig(tmp_path / "val", tmp_path / "local", rows, batch=32, workers=1,
                               shard_size=100)
    local = acc.run(local_cfg, folder)
    ray_cfg = acc.PassConfig(tmp_path / "val", tmp_path / "ray", rows, batch=32, workers=0, shard_size=100)
    killed_at: list[int] = []

    def kill_a_worker_half_way(p: acc.Progress) -> None:
        if not killed_at and p.images >= p.total // 2:
            killed_at.append(p.images)
            cluster.worker.kill()

    on = on_ray.run(ray_cfg, folder, cluster.address, kill_a_worker_half_way)
    assert killed_at and killed_at[0] < 2000 and on.dataset.images == 2000
    _assert_same(local_cfg, folder, local, on, tmp_path)
    assert on.cluster is not None and (on.cluster.nodes, on.cluster.lost) == (3, 1)
    assert sum(on.cluster.shards_by_node.values()) == on.dataset.shards
    assert len(on.cluster.shards_by_node) == 3, on.cluster.shards_by_node  # both workers ran shards
    assert not cluster.worker.alive(cluster.worker.raylets())
