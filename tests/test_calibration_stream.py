"""Calibration reads its folder a batch at a time: the same ranges as from the whole array, and
a peak that does not grow with the folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_export import CVT13

import cvt_ref
from cvt_export import calibration, derive, imageset
from cvt_export import exporter as onnx_export
from cvt_export.exporter import ExportOptions


@pytest.mark.heavy
def test_streamed_calibration_gives_the_ranges_of_the_whole_array(tmp_path: Path, photos: list[Path]) -> None:
    variant = CVT13.with_depths(1, 1, 1)
    fp32 = tmp_path / "model.onnx"
    onnx_export.export_fp32(cvt_ref.create_model(variant, "random:5"), variant, fp32, ExportOptions())
    array = cvt_ref.preprocess_batch(photos[:4], variant).numpy()  # the whole set in memory: the oracle
    derive.to_int8(fp32, tmp_path / "a.onnx", array, derive.Int8Options(), tmp_path / "a.json")
    streamed = imageset.Pixels(tuple(imageset.file_items(photos[:4])), variant)
    heard: list[str] = []
    derive.to_int8(fp32, tmp_path / "b.onnx", streamed, derive.Int8Options(), tmp_path / "b.json",
                      progress=heard.append)
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert heard[-1] == "calibrating INT8 on 4 images (4/4)"
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


PEAK = """
import resource, sys
from pathlib import Path
from cvt_export import calibration
calib, _ = calibration.calibration_set(Path(sys.argv[1]))
pixels = calib.load(__import__("cvt_ref").VARIANTS["cvt-13"])
n = sum(len(b) for b in pixels.batches(1))
assert n == len(calib.items), n
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_calibration_images_are_read_a_batch_at_a_time(tmp_path: Path) -> None:
    """8 and 40 photographs of 2000x1500 (9 MB decoded each, 0.6 MB as the model's input): the
    peak of the process that lists, fingerprints and reads them all moves by less than 40 MB
    (holding the inputs would add 19 MB more, holding the decoded images 290 MB)."""
    sources = imageset.bundled_sources()
    peaks = {}
    for n in (8, 40):
        folder = tmp_path / f"calib{n}"
        folder.mkdir()
        for i in range(n):
            image = Image.open(sources[i % len(sources)]).convert("RGB").resize((2000, 1500))
            image.rotate(i).save(folder / f"{i:03d}.jpg", quality=85)
        out = subprocess.run([sys.executable, "-c", PEAK, str(folder)], capture_output=True, text=True,
                             check=True)
        peaks[n] = float(out.stdout.split()[-1])
    assert peaks[40] - peaks[8] < 40, peaks
    assert calibration.spread(list(range(10)), 3) == [0, 3, 6]
