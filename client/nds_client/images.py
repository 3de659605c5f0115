"""Decoding images into fixed-size arrays, the same way on the server and the client.

Experts are trained on images prepared by :func:`load_image` and clients score them on
images prepared by the same function, so both sides see identical pixels: RGB, centre
crop to a square, resize to ``size`` (bilinear). Only PIL and numpy: the client imports it.

Memory is bounded per image: :func:`open_image` reads the header and refuses an image
whose width x height exceeds ``max_pixels`` (``NDS_MAX_IMAGE_PIXELS`` on the server) before
anything is decoded, and an image above :data:`LARGE_IMAGE_PIXELS` is decoded reduced
(JPEG: at 1/2, 1/4 or 1/8 scale by the decoder itself) and shrunk by an integer factor
before it is cropped, so it is not copied at full size (except once to RGB, for palette,
alpha, CMYK and 16-bit images). Smaller images are decoded exactly as they always were.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from nds_client.errors import NDSError
from nds_client.storage import Location, is_remote, read_location

ImageSource = str | os.PathLike | bytes | Location  # a Location: a sample inside a shard or in object storage

#: file suffixes taken for images (a folder's files, a tar shard's members)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

DEFAULT_MAX_IMAGE_PIXELS = 1 << 26  # 67,108,864 (8192 x 8192): the default of NDS_MAX_IMAGE_PIXELS
LARGE_IMAGE_PIXELS = 1 << 24  # above 16.8 Mpx an image is decoded reduced (smaller ones: exactly as always)


class TooManyPixels(ValueError):
    """An image whose header declares more pixels than allowed; nothing of it was decoded."""

    def __init__(self, pixels: int, max_pixels: int, size: tuple[int, int] | None = None) -> None:
        self.pixels, self.max_pixels, self.size = pixels, max_pixels, size
        shown = f"{size[0]}x{size[1]} = {pixels:,}" if size else f"{pixels:,}"
        super().__init__(f"too many pixels: {shown} > {max_pixels:,}")


def _let_pillow_open(max_pixels: int) -> None:
    """The one place Pillow's global decompression-bomb limit is touched.

    Pillow warns in ``Image.open`` above ``Image.MAX_IMAGE_PIXELS`` (89,478,485 by default)
    and raises ``DecompressionBombError`` above twice it. :func:`open_image` enforces its
    own cap from the header, so Pillow's limit only needs to be no lower than it: it is
    raised to ``max_pixels`` when an operator sets NDS_MAX_IMAGE_PIXELS above it, and is
    never lowered or disabled (other code in the process keeps Pillow's protection)."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


@contextmanager
def open_image(source: str | os.PathLike | bytes | IO[bytes], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """``Image.open`` (a path, bytes or a binary file), header only: raises
    :class:`TooManyPixels` for more than ``max_pixels`` pixels before anything is decoded
    (Pillow's own DecompressionBombError, for an image past twice its limit, becomes one too)."""
    _let_pillow_open(max_pixels)
    data = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with Image.open(data) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise TooManyPixels(width * height, max_pixels, (width, height))
            yield im
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise TooManyPixels(int(found.group(1)) if found else max_pixels + 1, max_pixels) from exc


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


def load_image(source: ImageSource, size: int, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode one image file (or its bytes) into uint8 (size, size, 3); OSError/ValueError if
    unreadable, :class:`TooManyPixels` (a ValueError, nothing decoded) above ``max_pixels``.
    A :class:`~nds_client.storage.Location` (or an object-storage uri) is read through the I/O layer first."""
    if isinstance(source, Location):
        source = read_location(source) if (source.shard is not None or is_remote(source.uri)) else source.uri
    elif isinstance(source, str) and is_remote(source):
        source = read_location(Location(source))
    data = source if isinstance(source, bytes | bytearray) else os.fspath(source)
    try:
        with open_image(data, max_pixels) as im:
            if im.width * im.height > LARGE_IMAGE_PIXELS:
                return _reduced_square_resize(im, size)
            im.load()
            return square_resize(im, size)
    except UnidentifiedImageError as exc:
        raise ValueError(f"not an image: {source if not isinstance(source, bytes | bytearray) else 'bytes'}") from exc


def _reduced_square_resize(im: Image.Image, size: int) -> np.ndarray:
    """:func:`square_resize` of a large image without a full-size copy: JPEGs are decoded at
    the smallest of 1/2, 1/4, 1/8 scale that keeps the short side >= ``size``; then the image
    is shrunk by an integer factor to a short side of about 2 x ``size`` (box filter) before
    the RGB conversion, crop and bilinear resize. Peak: the decoded image (at most
    ``max_pixels`` x 4 bytes, far less for JPEG) plus small copies."""
    im.draft("RGB", (size, size))  # JPEG only; other formats ignore it
    im.load()
    factor = min(im.size) // (2 * size)
    if factor > 1:
        if im.mode not in ("L", "RGB"):  # palette and 1-bit images cannot be averaged; others would average alpha or ink
            im = im.convert("RGB")
        im = im.reduce(factor)
    return square_resize(im, size)


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
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> LoadedImages:
    """Decode many images on a thread pool, keeping their order; unreadable ones, and those
    above ``max_pixels`` (never decoded), are listed, not raised."""
    out = np.zeros((len(sources), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(sources), dtype=bool)
    failed: list[tuple[int, str]] = []

    def one(i: int) -> tuple[int, str | None]:
        try:
            out[i] = load_image(sources[i], size, max_pixels=max_pixels)
            return i, None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return i, f"{type(exc).__name__}: {exc}"
        except NDSError as exc:  # a storage error reading a shard member or an object
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
    suffixes = IMAGE_SUFFIXES
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
