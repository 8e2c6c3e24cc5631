"""Preprocessing against transformers' image processor for CvT and against hand computation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cvt_ref
from cvt_ref.preprocess import load_image, to_rgb

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def hf_processor(size: int):  # type: ignore[no-untyped-def]
    """The processor the hub's microsoft/cvt-* configs name (ConvNext: crop_pct 0.875 below 384,
    plain resize at 384), with its PIL backend since torchvision is not installed."""
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

    return ConvNextImageProcessorPil(size={"shortest_edge": size}, crop_pct=0.875,
                                     resample=Image.Resampling.BICUBIC,
                                     image_mean=MEAN.tolist(), image_std=STD.tolist())


@pytest.mark.parametrize("name", ["cvt-13", "cvt-13-384"])
def test_matches_transformers_image_processor_on_photos(name: str, photos: list[Path]) -> None:
    variant = cvt_ref.VARIANTS[name]
    processor = hf_processor(variant.image_size)
    compared = 0
    for path in photos:
        image = Image.open(path).convert("RGB")
        if variant.crop == "center" and _odd_margin(image.size, variant):
            continue  # transformers floors the crop offset there; see test_odd_margin_rounds_*
        compared += 1
        expected = processor(image, return_tensors="np")["pixel_values"][0]
        got = cvt_ref.preprocess(path, name).numpy()
        assert got.shape == expected.shape == (3, variant.image_size, variant.image_size)
        # transformers rescales in float64 and may differ in the last float32 bit only
        assert np.abs(got - expected).max() <= 1e-5, path.name
    assert compared >= 6


def _odd_margin(size: tuple[int, int], variant: cvt_ref.Variant) -> bool:
    w, h = size
    short = variant.resize_size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    return any((n - variant.image_size) % 2 for n in new)


def test_odd_margin_rounds_like_torchvision_center_crop() -> None:
    """383 px wide: torchvision's CenterCrop starts at int(round(159 / 2)) = 80 (round half to
    even); transformers' processor would start at 79. The original pipeline is torchvision's."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(256, 383, 3), dtype=np.uint8)
    got = cvt_ref.preprocess(Image.fromarray(pixels), "cvt-13").numpy()
    crop = pixels[16:240, 80:304].astype(np.float32) / 255
    np.testing.assert_allclose(got, ((crop - MEAN) / STD).transpose(2, 0, 1), atol=1e-6)


def test_center_crop_by_hand() -> None:
    """A 256-pixel shorter side is not resized: the tensor is the centre 224 crop, normalized."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(300, 256, 3), dtype=np.uint8)  # H=300, W=256
    got = cvt_ref.preprocess(Image.fromarray(pixels), "cvt-13").numpy()
    top, left = round((300 - 224) / 2), 16
    crop = pixels[top:top + 224, left:left + 224].astype(np.float32) / 255
    expected = ((crop - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_384_is_a_plain_resize_without_crop() -> None:
    pixels = np.zeros((384, 500, 3), dtype=np.uint8)
    pixels[:, :8] = 255  # a white stripe at the left edge survives only if nothing is cropped
    got = cvt_ref.preprocess(Image.fromarray(pixels), "cvt-13-384")
    assert got.shape == (3, 384, 384)
    assert float(got[0, :, 0].mean()) > 2.0 > float(got[0, :, 200].mean())


def _gray_photo(photos: list[Path]) -> Image.Image:
    return Image.open(next(p for p in photos if p.name == "camera.jpg"))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16", "I", "F", "1"])
def test_every_pil_mode_gives_an_rgb_tensor(mode: str, photos: list[Path]) -> None:
    base = Image.open(photos[0]).convert("RGB")
    image = base.convert(mode) if mode not in ("I;16", "I", "F") else None
    if mode == "I;16":
        gray = np.asarray(base.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(gray)
        assert image.mode == "I;16"
    elif mode in ("I", "F"):
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.int32 if mode == "I" else np.float32))
    assert image is not None
    x = cvt_ref.preprocess(image, "cvt-13")
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all()
    if mode in ("L", "I;16", "I", "F"):
        # greyscale at any bit depth is the same picture as its 8-bit version
        expected = cvt_ref.preprocess(base.convert("L"), "cvt-13")
        assert float((x - expected).abs().max()) <= 1e-6


def test_greyscale_photo_replicates_channels(photos: list[Path]) -> None:
    gray = _gray_photo(photos)
    assert gray.mode == "L"
    rgb = to_rgb(gray)
    assert rgb.mode == "RGB"
    arr = np.asarray(rgb)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_transparent_palette_image_converts_without_warning(recwarn: pytest.WarningsRecorder) -> None:
    image = Image.new("P", (300, 300), 3)
    image.info["transparency"] = 3
    assert to_rgb(image).mode == "RGB"
    assert not [w for w in recwarn if "transparency" in str(w.message).lower()]


def test_exif_orientation_is_applied(tmp_path: Path, photos: list[Path]) -> None:
    upright = Image.open(next(p for p in photos if p.name == "rocket.jpg")).convert("RGB")  # landscape
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    path = tmp_path / "sideways.png"
    stored.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.size == upright.size
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(upright))


@pytest.mark.parametrize("content", [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_unreadable_files_raise_image_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(cvt_ref.ImageError, match=r"broken\.jpg"):
        cvt_ref.preprocess(path, "cvt-13")


def test_truncated_jpeg_raises_image_error(tmp_path: Path, photos: list[Path]) -> None:
    buf = io.BytesIO()
    Image.open(photos[0]).save(buf, format="JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(cvt_ref.ImageError, match=r"truncated\.jpg"):
        cvt_ref.preprocess(path, "cvt-13")


def test_missing_file_and_folder_raise_image_error(tmp_path: Path) -> None:
    with pytest.raises(cvt_ref.ImageError, match="no such file"):
        cvt_ref.preprocess(tmp_path / "nope.jpg", "cvt-13")
    with pytest.raises(cvt_ref.ImageError, match="folder"):
        cvt_ref.preprocess(tmp_path, "cvt-13")


def test_unknown_variant_is_a_user_error(photos: list[Path]) -> None:
    with pytest.raises(cvt_ref.CvtError, match=r"unknown variant 'cvt-99'.*cvt-13"):
        cvt_ref.preprocess(photos[0], "cvt-99")


def test_normalize_by_table_gives_the_bits_of_the_formula() -> None:
    """`normalize` looks levels up in a table; every uint8 level of every channel, in any layout,
    must come out with the bits (x / 255 - mean) / std gives in float32, and close to float64's."""
    from cvt_ref.preprocess import normalize

    v = cvt_ref.VARIANTS["cvt-13"]
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 17, 19, 3), dtype=np.uint8)
    pixels[0, 0, :, :] = np.arange(19)[:, None] * 13 % 256  # plenty of levels; 0 and 255 below
    pixels[1, 0, 0], pixels[1, 0, 1] = 0, 255
    x = pixels.astype(np.float32) / np.float32(255.0)
    y = (x - np.asarray(v.mean, dtype=np.float32)) / np.asarray(v.std, dtype=np.float32)
    want = np.ascontiguousarray(np.moveaxis(y, -1, -3))
    got = normalize(pixels, v)
    assert got.dtype == np.float32 and got.shape == (3, 3, 17, 19) and got.flags.c_contiguous
    assert got.tobytes() == want.tobytes()
    exact = (pixels.astype(np.float64) / 255 - np.asarray(v.mean)) / np.asarray(v.std)
    np.testing.assert_allclose(got, np.moveaxis(exact, -1, -3), atol=1e-6)
    assert normalize(pixels[0], v).tobytes() == want[0].tobytes()  # one image, no batch axis
