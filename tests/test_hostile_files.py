"""Hostile files: a file over NDS_MAX_FILE_BYTES, an image over NDS_MAX_IMAGE_PIXELS (a
13,000 x 13,000 PNG of a few hundred KB), and big sparse files, through the real
registration and indexing paths: skipped with their reason, and in bounded memory
(registration is measured in a fresh process)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from sqlmodel import Session, select

from nds.catalog.context import CatalogContext
from nds.catalog.db import upgrade
from nds.catalog.indexing import IndexRequest, start_indexing
from nds.catalog.jobs import InlineDispatcher, get_job
from nds.catalog.registration import RegistrationRequest, start_registration
from nds.catalog.settings import Settings, load_settings
from nds.catalog.tables import JobStatus, Sample
from nds_client.images import DEFAULT_MAX_IMAGE_PIXELS, load_images
from tests.conftest import write_images

MiB = 2**20
bomb_warning = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, from Image.open, above 89.5 Mpx


def write_png(path: Path, width: int, height: int, value: int = 120) -> Path:
    """A constant 8-bit grayscale PNG, compressed row block by row block: a 13,000 x 13,000
    one is ~170 KB on disk and never exists decoded here."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" + bytes([value]) * width
    with path.open("wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        for start in range(0, height, 512):
            if part := comp.compress(row * min(512, height - start)):
                fh.write(chunk(b"IDAT", part))
        fh.write(chunk(b"IDAT", comp.flush()) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    path = write_png(tmp_path_factory.mktemp("huge") / "huge.png", 13_000, 13_000)
    assert path.stat().st_size < 1 * MiB
    return path


@pytest.fixture
def make_ctx(settings: Settings):
    """A catalog context on the test's NDS_HOME with some settings changed (one open at a time)."""
    opened: list[CatalogContext] = []

    def make(**overrides) -> CatalogContext:
        while opened:
            opened.pop().close()
        changed = load_settings(**{**settings.model_dump(include={"home", "data_roots", "database_url", "qdrant_url", "broker_url"}), **overrides})
        upgrade(changed)
        opened.append(CatalogContext.open(changed))
        return opened[-1]

    yield make
    while opened:
        opened.pop().close()


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """The sizes of every image Pillow decodes while the test runs."""
    sizes: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def load(self):
        if self.tile:  # still to decode (load() is called again on a loaded image)
            sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def register(ctx: CatalogContext, name: str, path: Path, source: str = "imagefolder"):
    dataset, job = start_registration(ctx, RegistrationRequest(name=name, path=str(path), source=source))
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        return get_job(session, job.id)


def test_settings_defaults_and_validation(monkeypatch):
    monkeypatch.delenv("NDS_MAX_FILE_BYTES", raising=False)
    monkeypatch.delenv("NDS_MAX_IMAGE_PIXELS", raising=False)
    s = load_settings()
    assert s.max_file_bytes == 256 * MiB
    assert s.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 1 << 26 <= Image.MAX_IMAGE_PIXELS  # not above Pillow's own limit
    monkeypatch.setenv("NDS_MAX_FILE_BYTES", "1048576")
    monkeypatch.setenv("NDS_MAX_IMAGE_PIXELS", "1000")
    assert (load_settings().max_file_bytes, load_settings().max_image_pixels) == (MiB, 1000)
    for name in ("max_file_bytes", "max_image_pixels"):
        with pytest.raises(ValueError):
            load_settings(**{name: 0})


def test_a_file_over_max_file_bytes_is_skipped_and_the_rest_registers(make_ctx, data_root):
    folder = write_images(data_root / "src", labels=("a", "b"), n=3)
    noise = np.random.default_rng(0).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "a" / "big.png")  # a valid image of ~3.5 MiB
    assert (folder / "a" / "big.png").stat().st_size > 3 * MiB
    ctx = make_ctx(max_file_bytes=MiB)
    job = register(ctx, "capped", folder)
    assert job.status == JobStatus.succeeded, job.error
    assert (job.result["num_samples"], job.result["skipped"]) == (6, 1)
    assert job.result["skipped_reasons"] == {"larger than NDS_MAX_FILE_BYTES": 1}
    [listed] = job.result["skipped_files"]
    assert listed["uri"].endswith("big.png")
    assert listed["reason"] == f"larger than NDS_MAX_FILE_BYTES: {(folder / 'a' / 'big.png').stat().st_size:,} > 1,048,576 bytes"
    with Session(ctx.engine) as session:
        samples = session.exec(select(Sample).where(Sample.dataset_id == job.dataset_id)).all()
    assert len(samples) == 6 and all(
        (s.byte_size, s.sha256, s.width) == (Path(s.uri).stat().st_size, hashlib.sha256(Path(s.uri).read_bytes()).hexdigest(), 32) for s in samples
    )


@bomb_warning
def test_a_13000_square_png_is_skipped_from_its_header(ctx, data_root, huge_png, decoded):
    write_images(data_root / "src", labels=("a",), n=2)
    (data_root / "huge.png").write_bytes(huge_png.read_bytes())
    manifest = data_root / "m.csv"
    manifest.write_text("uri,label\nsrc/a/0.png,a\nhuge.png,a\nsrc/a/1.png,b\n")
    job = register(ctx, "bomb", manifest, source="manifest")
    assert job.status == JobStatus.succeeded, job.error
    assert job.result["num_samples"] == 2
    assert job.result["skipped_reasons"] == {"too many pixels for NDS_MAX_IMAGE_PIXELS": 1}
    [listed] = job.result["skipped_files"]
    assert listed["reason"] == "too many pixels for NDS_MAX_IMAGE_PIXELS: 13000x13000 = 169,000,000 > 67,108,864"
    assert (13_000, 13_000) not in decoded and decoded  # the small ones were decoded, the huge one never


def test_max_image_pixels_is_the_setting(make_ctx, data_root):
    folder = write_images(data_root / "src", labels=("a",), n=3, size=32)
    write_images(data_root / "src", labels=("a",), n=1, size=33, seed=1)  # overwrites a/0.png: 33 x 33 = 1,089 px
    job = register(make_ctx(max_image_pixels=32 * 32), "px", folder)
    assert job.status == JobStatus.succeeded, job.error
    assert job.result["skipped_reasons"] == {"too many pixels for NDS_MAX_IMAGE_PIXELS": 1}
    assert job.result["skipped_files"][0]["reason"].endswith("33x33 = 1,089 > 1,024")


# Registration in a fresh process: a warm-up registration (so imports and caches are in
# the baseline), then the measured one: its peak RSS (VmHWM, reset to the current RSS just
# before) over the RSS before. Not ru_maxrss: after a vfork+exec it starts at the parent's
# peak, so a big pytest process would hide the growth.
MEASURE = """
import json, re, sys
from sqlmodel import Session
from nds.catalog.context import CatalogContext
from nds.catalog.db import upgrade
from nds.catalog.jobs import InlineDispatcher, get_job
from nds.catalog.registration import RegistrationRequest, start_registration
from nds.catalog.settings import load_settings

ctx = CatalogContext.open(load_settings())

def register(name, path):
    dataset, job = start_registration(ctx, RegistrationRequest(name=name, path=path, source="manifest"))
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        job = get_job(session, job.id)
        return {"status": job.status.value, "error": job.error, "result": job.result}

def status(field):
    with open("/proc/self/status") as fh:
        return int(re.search(field + r":\\s+(\\d+) kB", fh.read()).group(1))

register("warm", sys.argv[1])
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    before = status("VmRSS")
except OSError:
    before = status("VmHWM")
done = register("measured", sys.argv[2])
done["delta_mib"] = (status("VmHWM") - before) / 1024
print(json.dumps(done))
"""


def _register_in_a_process(cli_env: dict, data_root: Path, big: Path, **env: str) -> dict:
    write_images(data_root / "imgs", labels=("a",), n=2)
    (data_root / "warm.csv").write_text("uri,label\nimgs/a/0.png,a\n")
    (data_root / "big.csv").write_text(f"uri,label\nimgs/a/1.png,a\n{big.name},a\n")
    full_env = {**os.environ, **cli_env, **env}
    subprocess.run([sys.executable, "-c", "from nds.catalog.db import upgrade; from nds.catalog.settings import load_settings; upgrade(load_settings())"],
                   env=full_env, check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-c", MEASURE, str(data_root / "warm.csv"), str(data_root / "big.csv")],
                          env=full_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["status"] == "succeeded", report
    return report


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc/self/status")


@needs_proc
def test_a_1gb_sparse_file_is_skipped_by_size_without_being_read(cli_env, data_root):
    big = data_root / "sparse.png"
    with big.open("wb") as fh:
        fh.truncate(2**30)
    report = _register_in_a_process(cli_env, data_root, big)
    assert report["result"]["skipped_reasons"] == {"larger than NDS_MAX_FILE_BYTES": 1}
    assert report["result"]["num_samples"] == 1
    assert report["delta_mib"] < 100, report["delta_mib"]  # reading it whole would cost 1,024 MiB


@needs_proc
@pytest.mark.slow
def test_a_300mb_image_under_a_raised_cap_is_hashed_in_chunks(cli_env, data_root):
    """A valid PNG followed by 300 MB of (sparse) zeros: decoded, then hashed whole in bounded memory."""
    big = data_root / "padded.png"
    write_png(big, 64, 48)
    with big.open("r+b") as fh:
        fh.truncate(300 * 10**6)
    report = _register_in_a_process(cli_env, data_root, big, NDS_MAX_FILE_BYTES=str(512 * MiB))
    assert (report["result"]["num_samples"], report["result"]["skipped"]) == (2, 0), report["result"]
    assert report["delta_mib"] < 100, report["delta_mib"]  # reading it whole would cost 286 MiB
    with big.open("rb") as fh:
        expected = hashlib.file_digest(fh, "sha256").hexdigest()
    from sqlmodel import create_engine

    engine = create_engine(load_settings(home=Path(cli_env["NDS_HOME"])).sqlalchemy_url)
    with Session(engine) as session:
        sample = session.exec(select(Sample).where(Sample.uri == str(big.resolve()))).one()
    engine.dispose()
    assert (sample.width, sample.height, sample.byte_size, sample.sha256) == (64, 48, 300 * 10**6, expected)


def test_load_images_refuses_above_the_cap_without_decoding(data_root, decoded):
    small = write_png(data_root / "small.png", 40, 30)
    ok = write_png(data_root / "ok.png", 20, 20, value=7)
    loaded = load_images([small, ok], 16, max_pixels=500)
    assert loaded.index.tolist() == [1] and loaded.images[0].max() == 7
    [(position, reason)] = loaded.failed
    assert position == 0 and reason == "TooManyPixels: too many pixels: 40x30 = 1,200 > 500"
    assert decoded == [(20, 20)]


@bomb_warning
def test_load_images_never_decodes_the_13000_square_png(huge_png, decoded):
    loaded = load_images([huge_png], 32)
    assert len(loaded.index) == 0 and "too many pixels: 13000x13000" in loaded.failed[0][1]
    assert decoded == []


def test_indexing_never_decodes_images_above_the_cap(make_ctx, data_root, decoded):
    """Registered under the default cap, indexed under a lower one (NDS_MAX_IMAGE_PIXELS):
    the index job refuses them from their headers and, none being left, fails cleanly."""
    folder = write_images(data_root / "src", labels=("a", "b"), n=3, size=48)
    job = register(make_ctx(), "larger", folder)
    assert job.status == JobStatus.succeeded and job.result["num_samples"] == 6
    ctx = make_ctx(max_image_pixels=32 * 32)
    decoded.clear()
    index_job = start_indexing(ctx, job.dataset_id, IndexRequest(image_size=32, epochs=1, width=8, min_steps=10, clusters=1))
    InlineDispatcher(ctx).submit(index_job)
    with Session(ctx.engine) as session:
        index_job = get_job(session, index_job.id)
    assert index_job.status == JobStatus.failed
    assert "could be decoded" in index_job.error and "too many pixels: 48x48 = 2,304 > 1,024" in index_job.error
    assert decoded == []


def test_large_allowed_images_are_decoded_reduced_and_small_ones_exactly(data_root):
    """Above 16.8 Mpx: decoded reduced (a JPEG at 1/8 scale by the decoder), close to the exact
    result; small images: exactly the old preprocessing (full decode, RGB, crop, bilinear)."""
    from nds_client.images import LARGE_IMAGE_PIXELS, load_image, square_resize

    rng = np.random.default_rng(0)
    small = data_root / "small.jpg"
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(small, quality=90)
    with Image.open(small) as im:
        im.load()
        assert np.array_equal(load_image(small, 64), square_resize(im, 64))
    gradient = np.linspace(0, 255, 6000, dtype=np.float32)
    big = (gradient[None, :, None] * np.ones((3000, 1, 3), np.float32)).astype(np.uint8)  # 18 Mpx
    assert big.shape[0] * big.shape[1] > LARGE_IMAGE_PIXELS
    Image.fromarray(big).save(data_root / "big.jpg", quality=95)
    with Image.open(data_root / "big.jpg") as im:
        im.load()
        exact = square_resize(im, 64).astype(int)
    reduced = load_image(data_root / "big.jpg", 64).astype(int)
    assert np.abs(reduced - exact).mean() < 2.0
