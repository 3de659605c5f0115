"""Decoding images into fixed-size arrays, the same way on the server and the client.

Experts are trained on images prepared by :func:`load_image` and clients score them on
images prepared by the same function, so both sides see identical pixels: RGB, centre
crop to a square, resize to ``size`` (bilinear). Only PIL and numpy: the client imports it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageSource = str | os.PathLike | bytes


def square_resize(image: Image.Image, size: int) -> np.ndarray:
    """RGB, centre-cropped to a square and resized: uint8 (size, size, 3)."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_image(source: ImageSource, size: int) -> np.ndarray:
    """Decode one image file (or its bytes) into uint8 (size, size, 3); OSError/ValueError if unreadable."""
    data = io.BytesIO(source) if isinstance(source, bytes | bytearray) else os.fspath(source)
    try:
        with Image.open(data) as im:
            im.load()
            return square_resize(im, size)
    except UnidentifiedImageError as exc:
        raise ValueError(f"not an image: {source if not isinstance(source, bytes | bytearray) else 'bytes'}") from exc


@dataclass
class LoadedImages:
    images: np.ndarray                   # uint8 (N, size, size, 3), only the readable ones
    index: np.ndarray                    # int64 (N,): position of each in the input list
    failed: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)


def load_images(
    sources: Sequence[ImageSource],
    size: int,
    *,
    workers: int = 4,
    progress: Callable[[float], None] | None = None,
) -> LoadedImages:
    """Decode many images on a thread pool, keeping their order; unreadable ones are listed, not raised."""
    out = np.zeros((len(sources), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(sources), dtype=bool)
    failed: list[tuple[int, str]] = []

    def one(i: int) -> tuple[int, str | None]:
        try:
            out[i] = load_image(sources[i], size)
            return i, None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return i, f"{type(exc).__name__}: {exc}"

    total = max(len(sources), 1)
    with ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="nds-decode") as pool:
        for done, (i, error) in enumerate(pool.map(one, range(len(sources)), chunksize=32), start=1):
            if error is None:
                ok[i] = True
            else:
                failed.append((i, error))
            if progress is not None and (done % 256 == 0 or done == total):
                progress(done / total)
    index = np.flatnonzero(ok)
    return LoadedImages(images=out[index], index=index, failed=failed)


def list_image_files(folder: Path) -> list[Path]:
    """Image-looking files under ``folder`` (recursively), sorted; hidden entries skipped."""
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
