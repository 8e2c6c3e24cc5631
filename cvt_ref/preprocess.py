"""PIL image -> normalized tensor, exactly as the original evaluation pipeline does it.

224 variants: resize the shorter side to int(224 / 0.875) = 256 with bicubic, center-crop 224.
384 variants: resize to 384 x 384 with bicubic (no crop). Then /255 and ImageNet mean/std.
The arithmetic follows torchvision's Resize(int), CenterCrop, ToTensor and Normalize so that
tensors match the original code bit for bit on RGB inputs; torchvision itself is not needed.

Beyond the original (decided here, see README): EXIF orientation is applied first, and
16-bit / 32-bit greyscale is scaled to 8 bits rather than clipped by PIL's convert("RGB").
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cvt_ref.errors import ImageError
from cvt_ref.variants import Variant, get_variant

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# The decode budget, checked from the header before any pixel is decoded. PIL's own guard warns
# from 89 Mpx and refuses from 179 Mpx; here the warning's threshold is the limit, said in one line.
MAX_PIXELS = 89_478_485
# The preprocessing scales the shorter side to 256 (224 variants): a 20000x1 PNG of 138 bytes would
# become a 5,120,000x256 image (3.9 GB). 100:1 keeps that under 7 Mpx.
MAX_ASPECT = 100


def _budget(image: Image.Image, name: str) -> None:
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: refused, too many pixels to decode safely ({w}x{h}, "
                         f"{w * h / 1e6:.0f} Mpx; the limit is {MAX_PIXELS / 1e6:.0f} Mpx); resize it first")
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(f"{name}: {w}x{h} pixels, an aspect ratio beyond {MAX_ASPECT}:1 (the "
                         "preprocessing scales the shorter side up to the model's size); crop it first")


@contextlib.contextmanager
def _opened(source: str | Path | IO[bytes], name: str) -> Iterator[Image.Image]:
    """PIL's image with its header read and checked against the decode budget; every failure to
    read it is one ImageError naming `name`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # _budget says it instead
            image = Image.open(source)
        with image:
            _budget(image, name)
            yield image
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: refused, too many pixels to decode safely (more than twice the "
                         f"{MAX_PIXELS / 1e6:.0f} Mpx limit); resize it first") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot read it as an image ({e})") from None


def _regular(path: Path) -> Path:
    """A path that names a regular file (a FIFO or a device would block or never end)."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise ImageError(f"{path}: not a regular file (a pipe, socket or device); give an image file")
    return path


def load_image(path: str | Path) -> Image.Image:
    """Open, check the decode budget, and fully decode, so a truncated file fails here, not
    later in a worker."""
    path = _regular(Path(path))
    with _opened(path, str(path)) as image:
        try:
            image.load()
            return ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{path}: cannot read it as an image ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Alpha is dropped, not composited (what the original loader's convert('RGB') does).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 0..65535 -> 0..255
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_and_crop(image: Image.Image, variant: Variant) -> Image.Image:
    size = variant.image_size
    if variant.crop == "resize":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    # torchvision Resize(int): shorter side to `short`, longer side int(short * long / shorter).
    short = variant.resize_size
    w, h = image.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = round((new_h - size) / 2.0)  # Python's round: half to even, as torchvision
    left = round((new_w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """Encoded bytes (JPEG, PNG, ...) -> a decoded image, with the same checks as a file: what a
    server receives from a client."""
    with _opened(io.BytesIO(data), name) as image:
        try:
            image.load()
            return ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: cannot read it as an image ({e})") from None


# Bumped whenever the arithmetic below changes what a pixel becomes: caches of model outputs key
# on it (with the variant's size, crop and mean/std), so a changed pipeline never reuses them.
PREPROCESS_VERSION = 1


def crop_uint8(image: Image.Image | str | Path, variant: str | Variant) -> np.ndarray:
    """-> uint8[H, W, 3]: decoded, RGB, resized and cropped, not yet normalized (a quarter of
    the float tensor's bytes: what decode workers hand back)."""
    v = get_variant(variant)
    if not isinstance(image, Image.Image):
        image = load_image(image)
    return np.asarray(resize_and_crop(to_rgb(image), v), dtype=np.uint8)


def normalize(pixels: np.ndarray, variant: str | Variant) -> np.ndarray:
    """uint8[..., H, W, 3] -> float32[..., 3, H, W]: /255, then the variant's mean and std."""
    v = get_variant(variant)
    table = _levels(v.mean, v.std)
    out = np.empty((*pixels.shape[:-3], 3, *pixels.shape[-3:-1]), dtype=np.float32)
    for c in range(3):
        np.take(table[c], pixels[..., c], out=out[..., c, :, :], mode="clip")
    return out


@functools.lru_cache(maxsize=8)
def _levels(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32[3, 256]: every uint8 level of each channel normalized, with the same float32
    operations a per-pixel (x / 255 - mean) / std does, so a table lookup gives the same bits at a
    quarter of the time (a batch of 32 at 224 px: 13 ms instead of 25-60)."""
    x = np.arange(256, dtype=np.float32) / np.float32(255.0)
    m, sd = np.asarray(mean, dtype=np.float32)[:, None], np.asarray(std, dtype=np.float32)[:, None]
    table = (x[None, :] - m) / sd
    table.setflags(write=False)
    return table


def preprocess_array(image: Image.Image | str | Path, variant: str | Variant) -> np.ndarray:
    """-> float32[3, H, W] numpy, normalized (no torch: what a serving process needs)."""
    return normalize(crop_uint8(image, variant), variant)


def preprocess(image: Image.Image | str | Path, variant: str | Variant) -> torch.Tensor:
    """-> float32[3, H, W], normalized; raises ImageError for a file it cannot read."""
    import torch  # here, not at import: `import cvt_ref` stays light for report and manifest readers

    return torch.from_numpy(preprocess_array(image, variant))


def preprocess_batch(images: list[Image.Image | str | Path], variant: str | Variant) -> torch.Tensor:
    import torch

    return torch.stack([preprocess(image, variant) for image in images])


def list_images(folder: str | Path) -> list[Path]:
    """Image files under a folder (recursively), sorted so every run sees the same order."""
    root = Path(folder)
    if not root.is_dir():
        raise ImageError(f"{root}: not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def check_image(path: Path) -> None:
    """Open the header only: an unreadable file, a decompression bomb or an image beyond the
    aspect-ratio bound is refused in milliseconds, before any long job starts."""
    with _opened(_regular(Path(path)), str(path)):
        pass


def bundled_photos() -> list[Path]:
    """The real photographs this package ships (see cvt_ref/data/photos/SOURCES.md): the demo's
    inputs and the regression gate's golden inputs."""
    return list_images(Path(__file__).parent / "data" / "photos")


def more_photos() -> list[Path]:
    """Six more photographs for the evaluation set (see cvt_ref/data/more-photos/SOURCES.md)."""
    return list_images(Path(__file__).parent / "data" / "more-photos")
