"""What a decode worker of the accuracy pass runs: file bytes -> cropped uint8 pixels and the
file's sha256. Light on purpose (PIL and numpy, no torch or runtime): each worker process imports
only this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cvt_ref.errors import ImageError
from cvt_ref.preprocess import crop_uint8, decode_image
from cvt_ref.variants import Variant


def watch_parent(parent: int) -> None:
    """A decode worker ends when the pass that started it is gone (SIGKILL included). It runs at
    the lowest priority, so that it decodes in the gaps the inference threads leave rather than
    preempting one of them (which would stall all of them at their next barrier)."""
    with contextlib.suppress(OSError):
        os.nice(19)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the pass stops
    # its workers itself (and they end with it if it is killed), so none prints a traceback
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def decode(paths: Sequence[Path], variant: Variant) -> tuple[np.ndarray, list[str], list[tuple[int, str]]]:
    """uint8[B', H, W, 3] of the images that decode, their files' sha256 (content: the cache's
    key), and (position, reason) of those that do not: one bad file never stops a pass."""
    pixels, digests, failed = [], [], []
    for i, p in enumerate(paths):
        try:
            try:
                data = p.read_bytes()
            except OSError as e:
                raise ImageError(f"{p}: cannot read it ({e.strerror or e})") from None
            image = decode_image(data, str(p))
            pixels.append(crop_uint8(image, variant))
            digests.append(hashlib.sha256(data).hexdigest())
        except ImageError as e:
            failed.append((i, str(e)))
    size = variant.image_size
    return (np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)), digests, failed
