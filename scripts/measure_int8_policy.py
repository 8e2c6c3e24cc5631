"""Measure INT8 Q/DQ placements on cvt-13: fidelity on held-out photos and batch-8 latency.

    .venv/bin/python scripts/measure_int8_policy.py [--out reports/int8-policy-cvt-13.md]

Runs ONNX Runtime (CPU EP, all graph optimizations) and OpenVINO (CPU, f32 inference
precision, so INT8 is what the file says and nothing else is lowered) on the same inputs.
The numbers back the default policy in cvt_export/derive.py; this is a measurement script,
not a test (speed belongs in reports, not in assertions).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

import cvt_ref
from cvt_export import build, calibration, derive
from cvt_export.machine import cpu_name
from cvt_export.metrics import fidelity
from cvt_export.runtime import ort_session, run_logits
from cvt_export.validate import reference_logits

POLICIES = {
    "ORT default: Conv+MatMul inputs and outputs, depthwise too":
        derive.Int8Options(quantize_outputs=True, depthwise=True),
    "inputs only, depthwise too": derive.Int8Options(depthwise=True),
    "inputs only, depthwise FP32 (default)": derive.Int8Options(),
    "inputs only, depthwise and attention FP32": derive.Int8Options(attention=False),
}


def median_ms(fn: Callable[[], object], seconds: float = 6.0, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("reports/int8-policy-cvt-13.md"))
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts/cvt-13"))
    args = ap.parse_args()
    import openvino as ov

    result = build.build(build.BuildRequest("cvt-13", "random:0"), args.artifacts)
    fp32 = args.artifacts / "model.onnx"
    model = cvt_ref.create_model("cvt-13", "random:0")
    calib, _ = calibration.calibration_set(None)
    held_paths = [p for p in cvt_ref.bundled_photos() if p not in calib.paths]
    held = cvt_ref.preprocess_batch(held_paths, "cvt-13").numpy()
    ref = reference_logits(model, held)
    x8 = np.resize(held, (8, *held.shape[1:]))
    core = ov.Core()

    def measure(path: Path) -> tuple[dict[str, float], dict[str, float], float, float]:
        session = ort_session(path)
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        f_ort = fidelity(ref, run_logits(session, held))
        f_ov = fidelity(ref, np.array(compiled(held)[0], copy=True))
        return f_ort, f_ov, median_ms(lambda: run_logits(session, x8)), median_ms(lambda: compiled(x8))

    rows = []
    _, _, ort32, ov32 = measure(fp32)
    rows.append(("FP32 (model.onnx)", None, None, ort32, ov32))
    with tempfile.TemporaryDirectory() as tmp:
        for name, opts in POLICIES.items():
            key = calibration.cache_key(calib, cvt_ref.get_variant("cvt-13"),
                                        result.manifest["files"]["model.onnx"]["sha256"], opts)
            out = Path(tmp) / "int8.onnx"
            derive.to_int8(fp32, out, calib.load(cvt_ref.get_variant("cvt-13")), opts,
                              calibration.cache_path(key), tensorrt_rules=False)
            f_ort, f_ov, t_ort, t_ov = measure(out)
            rows.append((name, f_ort, f_ov, t_ort, t_ov))
            print(name, f_ort["cosine_min"], f_ov["cosine_min"], t_ort, t_ov, flush=True)

    cpu = cpu_name()
    lines = [
        "# INT8 Q/DQ placement on cvt-13 (random:0 weights)",
        "",
        f"`python scripts/measure_int8_policy.py`; {cpu}, {os.cpu_count()} cores; onnxruntime "
        f"{version('onnxruntime')}, openvino {version('openvino')}. Calibration: 6 bundled photos "
        f"(MinMax); fidelity on the other {len(held)}; latency: median, batch 8, f32 inference "
        "precision on OpenVINO.",
        "",
        "| placement | cosine min ORT | cosine min OV | top-1 agree ORT/OV | ORT ms | OV ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, f_ort, f_ov, t_ort, t_ov in rows:
        if f_ort is None or f_ov is None:
            lines.append(f"| {name} | – | – | – | {t_ort:.0f} | {t_ov:.0f} |")
        else:
            lines.append(f"| {name} | {f_ort['cosine_min']:.5f} | {f_ov['cosine_min']:.5f} | "
                         f"{100 * f_ort['top1_agreement']:.0f}% / {100 * f_ov['top1_agreement']:.0f}% | "
                         f"{t_ort:.0f} | {t_ov:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
