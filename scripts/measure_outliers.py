"""Issue 12's figures on cvt-13 (random:0), one run: the outlier stress, INT8 with and without
the SmoothQuant migration, `cvt-export tune` on OpenVINO, and cvt-bench's recommendation.

    python scripts/measure_outliers.py [--out reports/outliers-cvt-13] [--artifacts artifacts/outliers]

Everything goes through the console scripts a user runs; this file only compares logits the
tools do not compare themselves (stressed vs unstressed FP32) and collects the reports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import cvt_ref
from cvt_export import machine
from cvt_export.backends import get_backend
from cvt_export.calibration import default_calibration_set
from cvt_ref.rescale import OutlierSpec, stress

BIN = Path(sys.executable).parent


def run(*args: str) -> str:
    print("$", " ".join(args), flush=True)
    done = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.exit(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("reports/outliers-cvt-13"))
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/outliers"))
    parser.add_argument("--budget", default="cosine>=0.9995")
    parser.add_argument("--summary-only", action="store_true",
                        help="rewrite README.md from the reports already in --out")
    args = parser.parse_args()
    out, art = args.out, args.artifacts
    out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        run_tools(out, art, args.budget)
    summary(out, art, args.budget)


def run_tools(out: Path, art: Path, budget: str) -> None:
    common = ["--weights", "random:0", "--outliers", "4", "--precision", "fp32,fp16,int8"]
    run("cvt-export", "onnx", *common, "--no-smooth", "--out", str(art / "naive"))
    run("cvt-export", "onnx", *common, "--out", str(art / "smooth"))
    run("cvt-export", "onnx", "--weights", "random:0", "--precision", "fp32,fp16,int8",
        "--out", str(art / "plain"))
    for name in ("naive", "smooth", "plain"):
        run("cvt-bench", "--artifacts", str(art / name), "--backend", "ort,openvino",
            "--precision", "fp32,fp16,bf16,int8", "--batch", "1,8", "--out", str(out / name))
    for backend in ("openvino", "ort"):
        tuned = art / f"tuned-{backend}"
        shutil.rmtree(tuned, ignore_errors=True)
        shutil.copytree(art / "smooth", tuned)
        run("cvt-export", "tune", "--artifacts", str(tuned), "--backend", backend, "--budget", budget)
        shutil.copy(tuned / "tune.md", out / f"tune-{backend}.md")
    run("cvt-bench", "--artifacts", str(art / "tuned-openvino"), "--backend", "openvino",
        "--precision", "fp32,fp16,bf16,int8,mixed", "--batch", "1,8", "--budget", budget,
        "--out", str(out / "tuned-openvino"))


def summary(out: Path, art: Path, budget: str) -> None:
    # Stressed FP32 files against the unstressed PyTorch model, on both executors.
    photos = cvt_ref.bundled_photos()
    x = cvt_ref.preprocess_batch(list(photos), "cvt-13")
    with torch.inference_mode():
        plain = cvt_ref.create_model("cvt-13", "random:0")(x).numpy()
    lines = ["# Outlier stress, robust INT8 and tune on cvt-13 (random:0, --outliers 4)", "",
             f"{machine.describe()['cpu']}; ISA {' '.join(machine.describe()['isa'])}.", "",
             "## Stressed FP32 vs unstressed PyTorch FP32 (11 bundled photos)", "",
             "| backend | max-abs |", "|---|---|"]
    for backend in ("ort", "openvino"):
        with get_backend(backend).compile(art / "smooth", "fp32") as runner:
            lines.append(f"| {backend} | {np.abs(runner(x.numpy()) - plain).max():.2e} |")

    held = {p.name for p in photos} - {p.name for p in default_calibration_set()}
    lines += ["", f"## INT8 on the {len(held)} held-out photos (cvt-bench, same run)", "",
              "| model | backend | cosine min | top-1 agreement | b8 ms | FP32 b8 ms | drift grows most at |",
              "|---|---|---|---|---|---|---|"]
    for name in ("plain", "naive", "smooth"):
        rows = json.loads((out / name / "report.json").read_text())["results"]
        for backend in ("ort", "openvino"):
            by = {r["precision"]: r for r in rows if r["backend"] == backend and r["status"] == "ok"}
            q, f = by["int8"], by["fp32"]
            fid = q["fidelity"]["held_out"]
            lines.append(f"| {name} | {backend} | {fid['cosine_min']:.6f} | "
                         f"{100 * fid['top1_agreement']:.0f}% | {q['latency']['8']['median_ms']:.1f} | "
                         f"{f['latency']['8']['median_ms']:.1f} "
                         f"| {q['drift_located']} |")

    stressed = stress(cvt_ref.create_model("cvt-13", "random:0"), OutlierSpec(4))
    lines += ["", "## Where the naive INT8 loses: per-block drift (ONNX Runtime, first 4 photos)", "",
              "1 − cosine of each block's output against PyTorch; growth = the rise from the block "
              "before. Stressed blocks (seed 0): " + ", ".join(stressed) + ".", "",
              "| block | stressed | naive error | growth | smooth error | growth |",
              "|---|---|---|---|---|---|"]
    drifts = {}
    for name in ("naive", "smooth"):
        rows = json.loads((out / name / "report.json").read_text())["results"]
        drifts[name] = next(r for r in rows if r["backend"] == "ort" and r["precision"] == "int8")["drift"]
    before = {"naive": 0.0, "smooth": 0.0}
    for i, point in enumerate(d["point"] for d in drifts["naive"]):
        cells = []
        for name in ("naive", "smooth"):
            err = drifts[name][i]["error"]
            cells += [f"{err:.4f}", f"{err - before[name]:+.4f}"]
            before[name] = err
        lines.append(f"| {point} | {'yes' if point in stressed else ''} | " + " | ".join(cells) + " |")
    for backend in ("openvino", "ort"):
        lines += ["", f"## tune on {backend} ({budget}, throughput-b8)", "",
                  (out / f"tune-{backend}.md").read_text().split("\n", 2)[2]]
    rows = json.loads((out / "tuned-openvino" / "report.json").read_text())["results"]
    lines += ["", "## cvt-bench on the tuned folder (OpenVINO, same run)", "",
              "| precision | runs as | b1 ms | b8 ms | b8 img/s | held-out cosine min |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok" and r["backend"] == "openvino":
            held_fid = r["fidelity"].get("held_out") or r["fidelity"]
            lines.append(f"| {r['precision']} | {r['executed']} | {r['latency']['1']['median_ms']:.1f} | "
                         f"{r['latency']['8']['median_ms']:.1f} | {r['latency']['8']['images_per_s']:.1f} | "
                         f"{held_fid['cosine_min']:.6f} |")
    rec = json.loads((out / "plain" / "recommendation.json").read_text())
    lines += ["", "## Recommendation on the unstressed model (cvt-bench, each precision's bounds)", ""]
    for objective, pick in rec["objectives"].items():
        lines.append(f"- {objective}: {pick['backend']} {pick['precision']}")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
