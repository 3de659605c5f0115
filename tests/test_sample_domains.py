"""Sample image domains built from packaged images (nds.samples.domains)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from nds.samples import domains as sd
from nds.samples.domains import (
    ALL_DOMAINS,
    DOMAINS,
    DomainImages,
    build_domain,
    build_pool,
    build_target,
    main,
    write_image_folder,
)

EXPECTED_LABELS = {
    "digits": tuple("0123456789"),
    "textures": ("brick", "grass", "gravel"),
    "photos": ("astronaut", "coffee", "chelsea", "rocket", "china", "flower"),
    "glyphs": tuple("ABCDEFGHIJ"),
    "faces": ("face", "nonface"),
}


def _hashes(images: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in images}


def test_domains_listed():
    assert DOMAINS == ("digits", "textures", "photos", "glyphs", "faces")
    assert set(DOMAINS) <= set(ALL_DOMAINS)


@pytest.mark.parametrize("variant", ["source", "target"])
@pytest.mark.parametrize("name", ALL_DOMAINS)
def test_shapes_dtypes_labels(name, variant):
    n = 30
    d = build_domain(name, n, size=32, seed=3, variant=variant)
    assert isinstance(d, DomainImages)
    assert d.name == name
    assert d.images.shape == (n, 32, 32, 3)
    assert d.images.dtype == np.uint8
    assert d.labels.shape == (n,)
    assert d.labels.dtype.kind == "U"
    if name in EXPECTED_LABELS:
        assert d.label_names == EXPECTED_LABELS[name]
    assert set(d.labels.tolist()) <= set(d.label_names)
    # balanced labels: every class present, counts differ by at most one
    counts = [int((d.labels == lab).sum()) for lab in d.label_names]
    assert max(counts) - min(counts) <= 1
    # real content, not blank images
    assert d.images.std() > 10
    assert len(_hashes(d.images)) > n // 2


@pytest.mark.parametrize("name", DOMAINS)
def test_other_sizes_and_empty(name):
    d = build_domain(name, 5, size=20)
    assert d.images.shape == (5, 20, 20, 3)
    e = build_domain(name, 0)
    assert e.images.shape == (0, 32, 32, 3) and e.labels.shape == (0,)


@pytest.mark.parametrize("name", ALL_DOMAINS)
def test_deterministic(name):
    a = build_domain(name, 12, seed=7)
    b = build_domain(name, 12, seed=7)
    c = build_domain(name, 12, seed=8)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_digits_are_mnist_and_variants_disjoint():
    src = build_domain("digits", 4000, variant="source")
    tgt = build_domain("digits", 1000, variant="target")
    assert len(_hashes(src.images)) == 4000  # all distinct MNIST images
    assert not (_hashes(src.images) & _hashes(tgt.images))
    # every class split 400 / 100
    assert all((src.labels == str(k)).sum() == 400 for k in range(10))
    assert all((tgt.labels == str(k)).sum() == 100 for k in range(10))
    # white strokes on black, as in MNIST
    assert src.images[:, 0, 0].max() < 30 and src.images.max() > 200
    with pytest.raises(ValueError, match="4000"):
        build_domain("digits", 4001)
    with pytest.raises(ValueError, match="1000"):
        build_domain("digits", 1001, variant="target")


@pytest.mark.parametrize("name", ["textures", "photos", "space", "medical"])
def test_crop_variants_disjoint(name):
    src = build_domain(name, 300, variant="source", seed=1)
    tgt = build_domain(name, 300, variant="target", seed=1)  # same seed on purpose
    assert not (_hashes(src.images) & _hashes(tgt.images))


def test_crop_regions_never_cross_the_split():
    # A picture that is 0 left of the 70% split and 255 right of it: source crops must be all
    # 0 and target crops all 255, rotation margin included.
    img = np.zeros((400, 1000, 3), np.uint8)
    img[:, 700:] = 255
    spec = sd._CropSpec(pictures=(), side=(40, 120), max_rotation=20.0, gain=(1.0, 1.0), bias=0.0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        assert sd._random_crop(img, spec, "source", 32, rng).max() == 0
        assert sd._random_crop(img, spec, "target", 32, rng).min() == 255


def test_index_splits_disjoint():
    y = np.repeat(np.arange(10), 500)
    src = np.concatenate(sd._split_per_class(y, 10, 400, "source"))
    tgt = np.concatenate(sd._split_per_class(y, 10, 400, "target"))
    assert len(src) == 4000 and len(tgt) == 1000 and not set(src) & set(tgt)
    faces = np.repeat([0, 1], 100)
    fs = np.concatenate(sd._split_per_class(faces, 2, 80, "source"))
    ft = np.concatenate(sd._split_per_class(faces, 2, 80, "target"))
    assert len(fs) == 160 and len(ft) == 40 and not set(fs) & set(ft)


def test_glyph_fonts_disjoint():
    src, tgt = sd._font_split("source"), sd._font_split("target")
    assert not set(src) & set(tgt)
    if sd._glyph_fonts():
        assert src and tgt
        assert set(src) | set(tgt) == set(sd._glyph_fonts())


def test_faces_variants_differ():
    src = build_domain("faces", 200, variant="source", seed=1)
    tgt = build_domain("faces", 200, variant="target", seed=1)
    assert not (_hashes(src.images) & _hashes(tgt.images))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown domain"):
        build_domain("cars", 4)
    with pytest.raises(ValueError, match="variant"):
        build_domain("digits", 4, variant="test")
    with pytest.raises(ValueError):
        build_domain("digits", -1)


def test_write_image_folder_layout(tmp_path):
    d = build_domain("glyphs", 25, size=24)
    root = write_image_folder(d, tmp_path / "glyphs")
    assert root == tmp_path / "glyphs"
    assert {p.name for p in root.iterdir()} == set(d.labels.tolist())
    files = sorted(root.glob("*/*.png"))
    assert len(files) == 25
    for f in files:
        m = re.fullmatch(r"glyphs-(\d+)\.png", f.name)
        assert m, f.name
        i = int(m.group(1))
        assert d.labels[i] == f.parent.name
        assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), d.images[i])


def test_build_pool_and_target(tmp_path):
    pool = build_pool(tmp_path / "sources", per_domain=10, size=16)
    assert list(pool) == list(DOMAINS)
    for name, folder in pool.items():
        assert folder == tmp_path / "sources" / name
        assert len(list(folder.glob("*/*.png"))) == 10
    target = build_target(tmp_path / "targets", "digits", n=7, size=16)
    assert target == tmp_path / "targets" / "digits"
    files = list(target.glob("*/*.png"))
    assert len(files) == 7
    assert Image.open(files[0]).size == (16, 16)
    # the target holds none of the pool's digits
    target_imgs = {np.asarray(Image.open(f).convert("RGB")).tobytes() for f in files}
    pool_imgs = {np.asarray(Image.open(f).convert("RGB")).tobytes() for f in pool["digits"].glob("*/*.png")}
    assert not target_imgs & pool_imgs


def test_build_pool_subset_of_domains(tmp_path):
    pool = build_pool(tmp_path, per_domain=4, domains=("photos", "space"))
    assert set(pool) == {"photos", "space"}


def test_cli_writes_folders(tmp_path, capsys):
    preview = tmp_path / "preview.png"
    rc = main(
        [str(tmp_path / "out"), "--per-domain", "6", "--size", "16", "--targets", "digits,glyphs",
         "--target-size", "5", "--preview", str(preview)]
    )  # fmt: skip
    assert rc == 0
    for name in DOMAINS:
        assert len(list((tmp_path / "out" / "sources" / name).glob("*/*.png"))) == 6
    for name in ("digits", "glyphs"):
        assert len(list((tmp_path / "out" / "targets" / name).glob("*/*.png"))) == 5
    assert not (tmp_path / "out" / "targets" / "faces").exists()
    assert Image.open(preview).size[1] > 0
    assert "target glyphs" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "a"), "--domains", "digits,cars"]) == 2
    assert "unknown domain" in capsys.readouterr().err
    assert main([str(tmp_path / "b"), "--domains", "digits", "--per-domain", "5000"]) == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
