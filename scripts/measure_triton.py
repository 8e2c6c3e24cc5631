"""Served (tritonserver, python runtime, dynamic batching) vs in-process throughput on cvt-13.

    .venv/bin/python scripts/measure_triton.py --precision int8 --requests 240

Writes reports/triton-cvt-13.md (and .json): the in-process ORT runner's batch-8 throughput, and
the served model's per-concurrency latency, throughput and executed batch sizes, same machine,
same run. The clients are threads of this process: on a 2-core machine they take CPU from the
server, which the report states.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from cvt_export import build, machine
from cvt_export.artifacts import ArtifactFolder
from cvt_export.backends import get_backend
from cvt_export.harness import timing
from cvt_export.harness.served import Target, bench_served
from cvt_export.triton.repository import RepoOptions, write_repository
from cvt_export.triton.server import Server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts/cvt-13"))
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--concurrency", default="1,8,16")
    ap.add_argument("--out", type=Path, default=Path("reports/triton-cvt-13"))
    args = ap.parse_args()
    if ArtifactFolder.existing(args.artifacts) is None:
        req = build.BuildRequest("cvt-13", "random:0", precisions=("fp32", "fp16", "int8"))
        build.build(req, args.artifacts)
    folder = args.artifacts
    variant = ArtifactFolder.open(folder).variant
    side = variant.image_size
    x8 = np.random.default_rng(0).standard_normal((8, 3, side, side)).astype(np.float32)
    with get_backend("ort").compile(folder, args.precision) as run:
        inproc = timing.measure(run, x8, warmup=3, iters=None, seconds=10.0)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_repository(folder, repo, RepoOptions(name="cvt", precision=args.precision, max_batch=16,
                                                   preferred_batch=(8, 16), queue_delay_us=5000))
        with Server(repo) as server:
            report = bench_served(Target(server.http_url, "cvt"), folder, args.precision,
                                  tuple(int(c) for c in args.concurrency.split(",")), args.requests)
    report["in_process"] = {"backend": "ort", "precision": args.precision, "batch": 8,
                            "images_per_s": inproc["images_per_s"], "median_ms": inproc["median_ms"]}
    at8 = next((r for r in report["runs"] if r["concurrency"] == 8), None)
    ratio = at8["images_per_s"] / inproc["images_per_s"] if at8 else None
    report["served_vs_in_process_at_8"] = ratio
    m = machine.describe()
    lines = [f"# Triton (python runtime, {args.precision}) vs in-process, cvt-13 ({folder})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, ISA {', '.join(m['isa'])}; tritonserver 2.51 "
             "(PyPI nvidia-pytriton 0.7.0), ORT runner inside Triton's Python backend; clients are "
             "threads of the measuring process on the same cores.", "",
             f"In-process ORT {args.precision} batch 8: {inproc['images_per_s']:.1f} images/s "
             f"(median {inproc['median_ms']:.1f} ms).", "",
             f"Served fidelity vs PyTorch FP32 on {report['inputs']['images']} photos: worst cosine "
             f"{report['fidelity']['cosine_min']:.5f}, max-abs {report['fidelity']['max_abs']:.3g}, top-1 "
             f"{100 * report['fidelity']['top1_agreement']:.0f}%, within bounds: "
             f"{'yes' if report['fidelity']['pass'] else 'NO'}.", "",
             "| concurrency | requests | images/s | p50 ms | p90 ms | p99 ms "
             "| executed batches (size: count) | queue ms/req | compute ms/req |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lat, srv = r["latency_ms"], r["server"]
        batches = ", ".join(f"{b}: {n}" for b, n in srv["executed_batches"].items())
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['images_per_s']:.1f} | "
                     f"{lat['median_ms']:.1f} | {lat['p90_ms']:.1f} | {lat['p99_ms']:.1f} | {batches} | "
                     f"{srv['queue_ms_per_request']:.1f} | {srv['compute_ms_per_request']:.1f} |")
    if ratio is not None:
        lines += ["", f"Served at concurrency 8 / in-process batch 8: {100 * ratio:.0f}% (target 80%)."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
