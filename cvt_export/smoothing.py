"""SmoothQuant's migration (Xiao et al., 2023) for CvT, folded into the weights before Q/DQ.

Per-tensor INT8 activations fail when a few channels are 10-100x larger than the rest (as in
trained transformers): the scale follows the outliers and the other channels round to a few
levels. Weights are quantized per output channel, so they can absorb range along their input
axis. For every rescalable activation (`cvt_ref.rescale.SITES`: LayerNorm outputs feeding q/k/v
and fc1, and v feeding the output projection) each channel j is divided by

    s_j = max|X_j|^a / max|W_j|^(1-a)      (a = the migration strength, 0.5 by default)

and the readers' input columns multiplied by it: the FP32 function is unchanged, the
activation's channels are flattened and the weights take part of the spread. max|X_j| comes
from the calibration images only.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from cvt_export.exporter import save
from cvt_export.imageset import Pixels
from cvt_export.runtime import ort_session, run_logits
from cvt_ref.model import CvT
from cvt_ref.rescale import SITES, blocks, channel_ranges, consumers, rescale

log = logging.getLogger(__name__)

BATCH = 4
FLOOR = 1e-5  # a channel never seen active keeps a finite factor


def factors(model: CvT, images: np.ndarray | Pixels, strength: float) -> dict[str, dict[str, torch.Tensor]]:
    """Per block and site, s [C] (divide the activation by it)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"migration strength {strength} must be in [0, 1]")
    peaks: dict[str, dict[str, torch.Tensor]] = {}
    for batch in Pixels.of(images).batches(BATCH):  # decoded a batch at a time: flat memory
        got = channel_ranges(model, torch.from_numpy(batch))
        for name, sites in got.items():
            for site, peak in sites.items():
                old = peaks.setdefault(name, {}).get(site)
                peaks[name][site] = peak if old is None else torch.maximum(old, peak)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, block in blocks(model):
        out[name] = {}
        for site in SITES:
            x = peaks[name][site].double().clamp_min(FLOOR)
            w = torch.stack([lin.weight.detach().abs().amax(0) for lin in consumers(block, site)])
            w = w.amax(0).double().clamp_min(FLOOR)
            out[name][site] = (x ** strength / w ** (1 - strength)).clamp_min(FLOOR)
    return out


def smoothed(model: CvT, images: np.ndarray | Pixels, strength: float) -> tuple[CvT, dict[str, Any]]:
    """A copy of `model` with the migration applied, and a summary for the manifest: per site
    kind, the largest ratio of a channel's range to the median channel's, before and after."""
    found = factors(model, images, strength)
    out = copy.deepcopy(model)
    for name, block in blocks(out):
        for site in SITES:
            rescale(block, site, 1.0 / found[name][site])
    head = Pixels.of(images).head(BATCH)
    before = _spread(model, head)
    after = _spread(out, head)
    return out, {"strength": strength, "sites": list(SITES),
                 "outlier_ratio_before": before, "outlier_ratio_after": after}


def _spread(model: CvT, x: np.ndarray) -> dict[str, float]:
    """Per site kind, the worst block's max-channel / median-channel range."""
    ranges = channel_ranges(model, torch.from_numpy(x))
    worst: dict[str, float] = {}
    for sites in ranges.values():
        for site, peak in sites.items():
            ratio = float(peak.max() / peak.median().clamp_min(FLOOR))
            worst[site] = round(max(worst.get(site, 0.0), ratio), 1)
    return worst


def migrated_file(fp32: Path, before: CvT, after: CvT, dst: Path, x: np.ndarray) -> bool:
    """Write the migrated model as `fp32` with only its changed weights replaced (no second
    export: same graph, same tensor and node names), and check it computes what `after` does on
    `x`. False, with nothing written, when a changed weight is not found exactly once by value
    in the file (an exporter that shared or folded it) or the check fails: then re-export."""
    old = _folded_state(before)
    new = _folded_state(after)
    proto = onnx.load(str(fp32))
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    replace: dict[str, np.ndarray] = {}
    for name, was in old.items():
        now = new[name]
        if np.array_equal(was, now):
            continue
        hits = [(n, False) for n, v in arrays.items() if _same(v, was)]
        if was.ndim == 2:
            hits += [(n, True) for n, v in arrays.items() if _same(v, was.T)]
        shared = sum(1 for w in old.values() if _same(w, was))
        if len(hits) != 1 or shared != 1 or hits[0][0] in replace:
            log.info("migration: %s not found once in %s; exporting the migrated model", name, fp32.name)
            return False
        target, transposed = hits[0]
        replace[target] = now.T if transposed else now
    for t in proto.graph.initializer:
        if t.name in replace:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(replace[t.name], np.float32), t.name))
    got = run_logits(ort_session(proto.SerializeToString()), x)
    with torch.inference_mode():
        want = after(torch.from_numpy(x)).numpy()
    if float(np.abs(got - want).max()) > 1e-4 * max(1.0, float(np.abs(want).max())):
        log.info("migration: the edited %s does not match the migrated model; exporting it", fp32.name)
        return False
    save(proto, dst)
    return True


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


def _folded_state(model: CvT) -> dict[str, np.ndarray]:
    """Parameters as the exporter sees them (BatchNorm folded), float32 numpy."""
    folded = copy.deepcopy(model).eval().fold_batchnorm()
    return {k: v.detach().float().numpy() for k, v in folded.state_dict().items()
            if v.dtype.is_floating_point}
