"""This project's OpenVINO INT8 against the best other way to INT8 CvT on OpenVINO, in one run.

    .venv/bin/python scripts/measure_other_path.py [--rounds 7] [--out reports/other-path-cvt-13]

The other path is what a user without this project would do: transformers'
CvtForImageClassification converted by `openvino.convert_model`, quantized by NNCF's
post-training quantization (`ModelType.TRANSFORMER`) on the same calibration images as this
project's export, compiled for the CPU. It gets every setting that helps it, each measured here:
the BF16 inference hint (OpenVINO's own default on a BF16 CPU) or f32, and a model compiled per
batch size (static shapes) or one dynamic model; its best row per batch size is the comparison.
Both paths start from the same weights (this project's `random:0`, put into transformers' model,
which is checked to compute the reference), and their fidelity is measured against that model's
own PyTorch FP32 logits on the bundled photos the calibration did not use. Timings: median of
per-round medians, the paths interleaved in every round (order reversed every other round), one
process, the machine otherwise idle. A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8)
CALLS = {1: 30, 8: 6}  # timed calls per row and round
WEIGHTS = "random:0"  # the weights of this project's reports


def timed(fn: Any, x: np.ndarray, calls: int) -> float:
    for _ in range(2):
        fn(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "other-path-cvt-13")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cvt-other-path-") as work:  # removed however it ends
        measure(args, Path(work))


def measure(args: argparse.Namespace, work: Path) -> None:
    import nncf
    import openvino as ov
    import torch
    from transformers import CvtConfig, CvtForImageClassification

    import cvt_ref
    from cvt_export import imageset, machine
    from cvt_export.artifacts import ArtifactFolder
    from cvt_export.backends import get_backend
    from cvt_export.backends.openvino import _calibration_images
    from cvt_ref.weights import to_native_keys

    variant = cvt_ref.get_variant("cvt-13")
    # transformers' model holding the weights `random:0` gives this project's reference (checked)
    reference = cvt_ref.create_model(variant, WEIGHTS).eval()
    hf = CvtForImageClassification(CvtConfig(**variant.hf_config())).eval()
    hf_state = hf.state_dict()
    native, _ = to_native_keys(hf_state, "transformers")
    mine = reference.state_dict()
    hf.load_state_dict({k: mine[n].reshape(hf_state[k].shape) for k, n in zip(hf_state, native, strict=True)})
    probe = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = float((hf(probe).logits - reference(probe)).abs().max())
    assert gap < 1e-4, f"transformers' model does not compute the reference: max-abs {gap}"
    print(f"exporting this project's INT8 ({WEIGHTS})", flush=True)
    subprocess.run([str(Path(sys.executable).parent / "cvt-export"), "onnx", "--variant", "cvt-13",
                    "--weights", WEIGHTS, "--precision", "fp32,int8", "--out", str(work / "ours")],
                   check=True, stdout=subprocess.DEVNULL)
    folder = ArtifactFolder.open(work / "ours")
    calib = _calibration_images(folder)  # the very images the project's export calibrated on
    calibrated = {p.name for p in imageset.default_calibration_sources()}
    held_out = [p for p in imageset.bundled_sources() if p.name not in calibrated]
    x_eval = cvt_ref.preprocess_batch(held_out, "cvt-13").numpy()
    with torch.no_grad():
        ref = hf(torch.from_numpy(x_eval)).logits.numpy()

    print("the other path: convert_model, NNCF PTQ (ModelType.TRANSFORMER)", flush=True)
    core = ov.Core()
    ov_model = ov.convert_model(hf, example_input=torch.zeros(1, 3, 224, 224))
    quantized = nncf.quantize(ov_model, nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    ov.save_model(quantized, str(work / "nncf.xml"))

    def other(hint: str, batch: int | None, path: Path = work / "nncf.xml") -> Any:
        model = core.read_model(str(path))
        if batch is not None:
            model.reshape([batch, 3, 224, 224])
        request = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                    "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()

        def run(x: np.ndarray) -> np.ndarray:
            request.infer({0: x})
            return np.array(request.get_output_tensor(0).data, copy=True)
        return run

    ours = get_backend("openvino").compile(folder, "int8")
    ours.activate()
    rows: dict[str, dict[int, Any]] = {"this project, OpenVINO INT8": {b: ours for b in BATCHES}}
    ir = Path(ours.info.artifact)  # this project's INT8 IR with OpenVINO's BF16 hint for the rest
    rows["this project's INT8 IR, bf16 hint, per-batch model"] = {b: other("bf16", b, ir) for b in BATCHES}
    for hint in ("bf16", "f32"):
        rows[f"other path, {hint} hint, per-batch model"] = {b: other(hint, b) for b in BATCHES}
        rows[f"other path, {hint} hint, dynamic model"] = dict.fromkeys(BATCHES, other(hint, None))
    fidelity = {}
    for name, fns in rows.items():
        got = np.concatenate([fns[1](x_eval[i:i + 1]) for i in range(len(x_eval))])
        fidelity[name] = {"cosine_min": cosine_min(ref, got),
                          "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}
    rng = np.random.default_rng(0)
    xs = {b: rng.standard_normal((b, 3, 224, 224)).astype(np.float32) for b in BATCHES}
    ms: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in rows}
    for r in range(args.rounds):
        order = list(rows) if r % 2 == 0 else list(reversed(rows))
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for b in BATCHES:
            for name in order:
                ms[name][b].append(timed(rows[name][b], xs[b], CALLS[b]))
    ours.deactivate()

    median = {name: {b: float(np.median(ms[name][b])) for b in BATCHES} for name in rows}
    best = {b: min((n for n in rows if n.startswith("other")), key=lambda n: median[n][b]) for b in BATCHES}
    for b in BATCHES:
        for name in rows:
            if name.startswith("other"):
                continue
            r = [o / m for o, m in zip(ms[best[b]][b], ms[name][b], strict=True)]
            print(f"batch {b}: {name}: {np.median(r):.2f}x the best other row ({min(r):.2f}-{max(r):.2f})")
    mine = "this project, OpenVINO INT8"
    # the speed-up per round (same round, interleaved), so the ratio's spread is the rounds'
    ratio = {b: [o / m for o, m in zip(ms[best[b]][b], ms[mine][b], strict=True)] for b in BATCHES}
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine.describe(),
              "versions": {p: version(p) for p in ("openvino", "nncf", "transformers", "torch")},
              "rounds": args.rounds, "calls_per_round": CALLS, "held_out_images": len(held_out),
              "median_ms": median, "rounds_ms": ms, "fidelity": fidelity, "best_other": best,
              "speedup_vs_best_other": {b: {"median": float(np.median(ratio[b])), "min": min(ratio[b]),
                                            "max": max(ratio[b])} for b in BATCHES}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    day = time.strftime("%Y-%m-%d")
    lines = [f"# This project's OpenVINO INT8 vs the best other path (cvt-13, {day})", "",
             f"Machine: {machine.cpu_name()}, {', '.join(machine.isa())}; OpenVINO {version('openvino')}, "
             f"NNCF {version('nncf')}, transformers {version('transformers')}. Median of {args.rounds} "
             f"interleaved rounds ({CALLS[1]} calls at batch 1, {CALLS[8]} at batch 8 per round). Fidelity "
             f"against the transformers model's own FP32 logits on {len(held_out)} held-out bundled "
             "photos.", "",
             "| path | b1 ms | b8 ms | cosine min | top-1 agreement |", "|---|---|---|---|---|"]
    for name in rows:
        f = fidelity[name]
        lines.append(f"| {name} | {median[name][1]:.1f} | {median[name][8]:.1f} | {f['cosine_min']:.5f} | "
                     f"{f['top1_agreement']:.2f} |")
    for b in BATCHES:
        s = result["speedup_vs_best_other"][b]
        lines.append(f"\nBatch {b}: best other row '{best[b]}'; this project {s['median']:.2f}x faster "
                     f"(per-round ratios {s['min']:.2f}-{s['max']:.2f}).")
    (args.out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
