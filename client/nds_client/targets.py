"""The target images and their labels: where they come from, checked, and decoded once.

A target is a folder (searched recursively), a list of image paths or a uint8 array
(N, H, W, 3) or (N, H, W); labels, when a method uses them, are a list aligned with the
images, a {path: label} mapping (:func:`read_labels_csv` reads one from a ``path,label``
CSV) or ``"imagefolder"`` (:func:`imagefolder_labels`: FOLDER/<label>/<image>).

:func:`resolve_target` checks all of that without decoding anything; :func:`decode_target`
then decodes and resizes each image once per distinct input size, with the server's own
preprocessing (:mod:`nds_client.images`), skipping and counting the unreadable ones.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nds_client.errors import TargetError
from nds_client.images import list_image_files, load_images, square_resize
from nds_client.scores import ProgressFn


def read_labels_csv(path: str | os.PathLike) -> dict[Path, str]:
    """A ``path,label`` CSV (with that header) -> {resolved image path: label}; paths relative to the CSV."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if "path" not in columns or "label" not in columns:
                raise TargetError(
                    f"labels file {path} needs the columns 'path' and 'label', found {', '.join(columns) or 'none'}",
                    field="labels", hint="first line: path,label",
                )
            reader.fieldnames = columns
            out: dict[Path, str] = {}
            for line, row in enumerate(reader, start=2):
                image, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                if not image or not label:
                    raise TargetError(f"labels file {path}, line {line}: empty path or label", field="labels")
                resolved = (path.parent / image).resolve() if not Path(image).is_absolute() else Path(image).resolve()
                if resolved in out and out[resolved] != label:
                    raise TargetError(f"labels file {path}, line {line}: {image} has two labels", field="labels")
                out[resolved] = label
    except OSError as exc:
        raise TargetError(f"cannot read labels file {path}: {exc.strerror or exc}", field="labels") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TargetError(f"cannot parse labels file {path}: {exc}", field="labels") from None
    if not out:
        raise TargetError(f"labels file {path} has no rows", field="labels")
    return out


def imagefolder_labels(folder: str | os.PathLike) -> dict[Path, str]:
    """Labels from an image folder ``FOLDER/<label>/<image>`` -> {resolved path: label}."""
    folder = Path(folder)
    files = list_image_files(folder) if folder.is_dir() else []
    out = {p.resolve(): p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) >= 2}
    if files and len(out) < len(files):
        loose = [str(p.relative_to(folder)) for p in files if len(p.relative_to(folder).parts) < 2]
        raise TargetError(
            f"{len(loose)} images directly under {folder} have no label folder (e.g. {loose[0]})",
            field="labels", hint="--imagefolder expects TARGET/<label>/<image>",
        )
    return out


@dataclass
class Target:
    """The target images, not decoded yet: file paths or an array, and labels aligned with them."""

    paths: list[Path] | None  # file inputs, in order (None for an array)
    array: np.ndarray | None  # uint8 (N, H, W, C) for array inputs
    labels: list[str] | None  # aligned with the inputs
    description: str

    def __len__(self) -> int:
        if self.paths is not None:
            return len(self.paths)
        assert self.array is not None  # one of the two is set (resolve_target)
        return len(self.array)

    def name(self, i: int) -> str:
        return str(self.paths[i]) if self.paths is not None else f"array[{i}]"


def resolve_target(images: Any, labels: Any) -> Target:
    """Turn a folder, a list of paths or an array (and optional labels) into a :class:`Target`; no decoding."""
    if isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4 or arr.shape[3] not in (1, 3, 4):
            raise TargetError(f"an image array must be (N, H, W, 3) or (N, H, W), got shape {images.shape}", field="images")
        if arr.dtype != np.uint8:
            raise TargetError(f"an image array must be uint8, got {arr.dtype}", field="images", hint="e.g. (x * 255).round().astype(np.uint8)")
        if len(arr) == 0:
            raise TargetError("the image array is empty", field="images")
        target = Target(paths=None, array=arr, labels=None, description=f"an array of {len(arr)} images")
    elif isinstance(images, str | os.PathLike):
        root = Path(images)
        if root.is_dir():
            paths = [p.resolve() for p in list_image_files(root)]
            if not paths:
                raise TargetError(f"no image files under {root}", field="images", hint="image files: .png .jpg .jpeg .bmp .gif .webp .tif .tiff .ppm .pgm")
            target = Target(paths=paths, array=None, labels=None, description=str(root))
        elif root.is_file():
            target = Target(paths=[root.resolve()], array=None, labels=None, description=str(root))
        else:
            raise TargetError(f"target {root} does not exist", field="images")
    elif isinstance(images, Sequence) and not isinstance(images, bytes | bytearray):
        if len(images) == 0:
            raise TargetError("the list of target images is empty", field="images")
        if not all(isinstance(p, str | os.PathLike) for p in images):
            raise TargetError("a list of target images must hold file paths", field="images", hint="or pass a uint8 array (N, H, W, 3)")
        paths = [Path(p).resolve() for p in images]
        target = Target(paths=paths, array=None, labels=None, description=f"{len(paths)} image files")
    else:
        raise TargetError(f"images must be a folder, a list of paths or a uint8 array, got {type(images).__name__}", field="images")

    if labels is None:
        return target
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if isinstance(labels, str) and labels == "imagefolder":
        if not (isinstance(images, str | os.PathLike) and Path(images).is_dir()):
            raise TargetError("labels='imagefolder' needs images to be a folder FOLDER/<label>/<image>", field="labels")
        labels = imagefolder_labels(images)
    if isinstance(labels, Mapping):
        if target.paths is None:
            raise TargetError("labels for an image array must be a list, one per image", field="labels")
        lookup = {Path(k).resolve(): str(v) for k, v in labels.items()}
        missing = [p for p in target.paths if p not in lookup]
        present = set(target.paths)
        extra = [p for p in lookup if p not in present]
        if extra:
            raise TargetError(
                f"labels name {len(extra)} files that are not among the target images, e.g. {', '.join(str(p) for p in extra[:3])}",
                field="labels", hint="label paths are relative to the labels file (or absolute) and must be image files of the target",
            )
        if missing:
            raise TargetError(
                f"{len(missing)} of the {len(target)} target images have no label, e.g. {', '.join(str(p) for p in missing[:3])}",
                field="labels", hint="give every target image a label, or move the unlabelled ones out",
            )
        target.labels = [lookup[p] for p in target.paths]
    elif isinstance(labels, Sequence) and not isinstance(labels, str | bytes):
        if len(labels) != len(target):
            raise TargetError(f"got {len(labels)} labels for {len(target)} images: they must match one to one", field="labels")
        target.labels = [str(v) for v in labels]
    else:
        raise TargetError("labels must be a list (one per image), a {path: label} mapping or 'imagefolder'", field="labels")
    return target


@dataclass
class Decoded:
    """The readable target images, decoded once per input size, and their labels."""

    arrays: dict[int, np.ndarray]  # input size -> uint8 (N, S, S, 3), the readable images
    labels: list[str] | None
    skipped: list[tuple[str, str]]  # (image, reason)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def skipped_files(self, limit: int = 100) -> list[dict[str, str]]:
        """The first ``limit`` skipped images as ``{"image", "reason"}`` (what :class:`~nds_client.scores.Scores` keeps)."""
        return [{"image": img, "reason": why} for img, why in self.skipped[:limit]]


def decode_target(target: Target, sizes: Sequence[int], progress: ProgressFn | None) -> Decoded:
    """Decode and resize every image once per input size (nds_client.images: the server's own preprocessing)."""
    n, sizes = len(target), sorted(set(sizes))
    total = n * len(sizes)
    ok = np.ones(n, dtype=bool)
    reasons: dict[int, str] = {}
    raw: dict[int, np.ndarray] = {}
    if progress is not None:
        progress("preprocess", 0, total)
    for j, size in enumerate(sizes):
        def report(fraction: float, j: int = j) -> None:
            if progress is not None:
                progress("preprocess", j * n + int(round(fraction * n)), total)

        if target.paths is not None:
            loaded = load_images(target.paths, size, workers=os.cpu_count() or 2, progress=report)
            full = np.zeros((n, size, size, 3), np.uint8)
            full[loaded.index] = loaded.images
            mask = np.zeros(n, dtype=bool)
            mask[loaded.index] = True
            for i, why in loaded.failed:
                reasons.setdefault(i, why)
            ok &= mask
            raw[size] = full
        else:
            arr = target.array
            assert arr is not None  # no paths: an array (resolve_target)
            if arr.shape[1] == arr.shape[2] == size and arr.shape[3] == 3:
                raw[size] = np.ascontiguousarray(arr)
            else:
                raw[size] = np.stack([square_resize(Image.fromarray(img[..., 0] if img.shape[2] == 1 else img), size) for img in arr])
            report(1.0)
    keep = np.flatnonzero(ok)
    skipped = [(target.name(int(i)), reasons.get(int(i), "unreadable")) for i in np.flatnonzero(~ok)]
    if len(keep) == 0:
        first = skipped[0][1] if skipped else "no images"
        raise TargetError(
            f"none of the {n} target images could be read (first error: {first})",
            field="images", hint="image files must be decodable by Pillow",
        )
    labels = [target.labels[i] for i in keep] if target.labels is not None else None
    return Decoded(arrays={s: a[keep] for s, a in raw.items()}, labels=labels, skipped=skipped)
