"""Peak memory of registering and indexing hostile files: a 3 GB sparse file and a 13,000 x 13,000 PNG.

    .venv/bin/python -m benchmarks.hostile_files [--sparse-gb 3] [--side 13000] [--old-tree DIR]

Writes both files into a temporary folder (the sparse one costs no disk; the PNG is a
mostly-constant RGB image, about 0.5 MB), and a third of the sparse file's size that is a
valid 32 x 32 PNG followed by zeros (the one kind of big file that gets hashed: a file that
is not an image is refused from its first bytes), then measures each step in a fresh process and
reports its peak RSS (VmHWM) and its growth over the process's RSS before the step:

* registration: the old way (the file read whole, Pillow opened on a bytes copy, a 2^28
  pixel cap, a full decode: the scan as it was before NDS_MAX_FILE_BYTES and
  NDS_MAX_IMAGE_PIXELS, copied here) vs ours, ``nds.catalog.registration.scan_one`` with the
  default settings, and ours with the caps raised to admit the file (hashed in 1 MiB
  chunks; decoded from the file);
* indexing (decode to 64 x 64, the default image size): the old way (full decode, RGB copy,
  crop, resize) vs ours, ``nds_client.images.load_images`` with the default cap, and with the
  cap raised to admit the PNG (decoded once, shrunk by an integer factor, no full-size copy);
* end to end: ``nds datasets add`` of a manifest listing both files and one small image, on
  a fresh NDS_HOME; with ``--old-tree DIR`` (e.g. ``git archive <rev> | tar -x -C DIR``) the
  same command runs that tree's code too.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

OLD_MAX_IMAGE_PIXELS = 1 << 28  # the old scan's cap, above Pillow's own limit


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            found = re.search(field + r":\s+(\d+) kB", fh.read())
        return int(found.group(1)) if found else None
    except OSError:
        return None


def _old_scan(path: Path) -> str:
    """The registration scan of one file before the caps (nds.catalog.registration.scan_one)."""
    from PIL import Image, UnidentifiedImageError

    data = path.read_bytes()
    if not data:
        return "skipped: empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > OLD_MAX_IMAGE_PIXELS:
                return "skipped: too many pixels"
            im.load()
            width, height = im.size
    except UnidentifiedImageError:
        return "skipped: not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "skipped: corrupt image"
    hashlib.sha256(data).hexdigest()
    return f"registered {width}x{height}"


def _old_load(path: Path, size: int) -> str:
    """The indexing decode of one file before the cap (nds_client.images.load_image)."""
    from PIL import Image, UnidentifiedImageError

    from nds_client.images import square_resize

    try:
        with Image.open(path) as im:
            im.load()
            square_resize(im, size)
    except UnidentifiedImageError:
        return "failed: not an image"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"failed: {exc}"
    return "decoded"


def _child(step: str, path: Path, max_file_bytes: int | None, max_pixels: int | None) -> dict:
    """One measured step, in this (fresh) process."""
    warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning above 89.5 Mpx
    import PIL.Image  # noqa: F401 - imports are in the baseline, not the step

    from nds.catalog.registration import DEFAULT_MAX_FILE_BYTES, scan_one
    from nds.plugins.contract import SourceItem
    from nds_client.images import DEFAULT_MAX_IMAGE_PIXELS, load_images

    before = _status_kib("VmRSS")
    start = time.perf_counter()
    if step == "register-old":
        outcome = _old_scan(path)
    elif step == "register":
        s = scan_one(0, SourceItem(path, None, "bench"), [path.parent.resolve()], max_file_bytes=max_file_bytes or DEFAULT_MAX_FILE_BYTES,
                     max_pixels=max_pixels or DEFAULT_MAX_IMAGE_PIXELS)
        outcome = f"skipped: {s.skipped}" if s.skipped else f"registered {s.width}x{s.height}"
    elif step == "index-old":
        outcome = _old_load(path, 64)
    elif step == "index":
        loaded = load_images([path], 64, workers=1, max_pixels=max_pixels or DEFAULT_MAX_IMAGE_PIXELS)
        outcome = "decoded" if len(loaded.index) else f"failed: {loaded.failed[0][1].split(': ', 1)[-1].replace(': ' + str(path), '')}"
    else:
        raise SystemExit(f"unknown step {step}")
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"outcome": outcome, "seconds": seconds, "peak_mib": peak / 1024, "growth_mib": (peak - (before or 0)) / 1024}


def measure(step: str, path: Path, *, max_file_bytes: int | None = None, max_pixels: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.hostile_files", "--child", step, str(path)]
    if max_file_bytes:
        cmd += ["--max-file-bytes", str(max_file_bytes)]
    if max_pixels:
        cmd += ["--max-pixels", str(max_pixels)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"{step} {path.name}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


PEAK = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": done.returncode, "out": done.stdout, "err": done.stderr[-2000:], "seconds": time.perf_counter() - t,
                  "peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def add_manifest(work: Path, manifest: Path, tag: str, tree: Path | None) -> dict:
    """``nds datasets add`` in a fresh process on a fresh NDS_HOME; its peak RSS (measured by a small parent)."""
    env = {**os.environ, "NDS_HOME": str(work / f"home-{tag}"), "NDS_DATA_ROOTS": str(work), "NDS_DATABASE_URL": "",
           "NDS_BROKER_URL": "", "NDS_QDRANT_URL": ""}
    cwd = Path(__file__).resolve().parent.parent
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
        cwd = tree
    cli = [sys.executable, "-W", "ignore", "-c", "from nds.api.cli import app; app()"]
    subprocess.run([*cli, "db", "upgrade"], env=env, cwd=cwd, check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-c", PEAK, *cli, "datasets", "add", tag, str(manifest), "--source", "manifest", "--json"],
                          env=env, cwd=cwd, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    if report["rc"] != 0:
        raise RuntimeError(f"nds datasets add ({tag}): {report['err']}")
    result = json.loads(report["out"])
    skipped = ", ".join(f"{n} {r}" for r, n in result["skipped_reasons"].items()) or "none"
    return {"outcome": f"{result['num_samples']} registered; skipped: {skipped}", "seconds": report["seconds"], "peak_mib": report["peak_mib"]}


def write_files(work: Path, sparse_gb: float, side: int) -> tuple[Path, Path, Path, Path]:
    import numpy as np
    from PIL import Image, ImageDraw

    sparse = work / "sparse.png"
    with sparse.open("wb") as fh:
        fh.truncate(int(sparse_gb * 2**30))
    png = work / "huge.png"
    im = Image.new("RGB", (side, side), (120, 140, 160))
    ImageDraw.Draw(im).rectangle((100, 100, 600, 400), fill=(250, 20, 20))
    im.save(png)
    del im
    small = work / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(small)
    padded = work / "padded.png"
    padded.write_bytes(small.read_bytes())
    with padded.open("r+b") as fh:
        fh.truncate(int(sparse_gb * 2**30))
    return sparse, png, small, padded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparse-gb", type=float, default=3.0)
    parser.add_argument("--side", type=int, default=13_000)
    parser.add_argument("--old-tree", type=Path, default=None, help="a tree of older code to run `nds datasets add` from too")
    parser.add_argument("--child", nargs=2, metavar=("STEP", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--max-file-bytes", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-pixels", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], Path(args.child[1]), args.max_file_bytes, args.max_pixels)))
        return 0

    from rich.console import Console
    from rich.table import Table

    from nds.catalog.settings import load_settings

    defaults = load_settings()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sparse, png, small, padded = write_files(work, args.sparse_gb, args.side)
        sparse_size, png_size = sparse.stat().st_size, png.stat().st_size
        admit_bytes = sparse_size + 1
        admit_pixels = args.side * args.side
        rows = [
            ("sparse", "registration", "old way (read whole, no cap)", measure("register-old", sparse)),
            ("sparse", "registration", "ours (default NDS_MAX_FILE_BYTES)", measure("register", sparse)),
            ("sparse", "registration", "ours, cap raised to admit it (refused from its header)", measure("register", sparse, max_file_bytes=admit_bytes)),
            ("padded", "registration", "old way (read whole, no cap)", measure("register-old", padded)),
            ("padded", "registration", "ours (default NDS_MAX_FILE_BYTES)", measure("register", padded)),
            ("padded", "registration", "ours, cap raised to admit it (hashed in 1 MiB chunks)", measure("register", padded, max_file_bytes=admit_bytes)),
            ("sparse", "indexing", "old way", measure("index-old", sparse)),
            ("sparse", "indexing", "ours", measure("index", sparse)),
            ("png", "registration", "old way (2^28 cap, full decode of a bytes copy)", measure("register-old", png)),
            ("png", "registration", "ours (default NDS_MAX_IMAGE_PIXELS)", measure("register", png)),
            ("png", "registration", "ours, cap raised to admit it (full decode, from the file)", measure("register", png, max_pixels=admit_pixels)),
            ("png", "indexing", "old way (full decode, RGB copy, crop, resize)", measure("index-old", png)),
            ("png", "indexing", "ours (default NDS_MAX_IMAGE_PIXELS)", measure("index", png)),
            ("png", "indexing", "ours, cap raised to admit it (decoded once, reduced)", measure("index", png, max_pixels=admit_pixels)),
        ]
        manifest = work / "hostile.csv"
        manifest.write_text(f"uri,label\n{small.name},a\n{sparse.name},a\n{png.name},a\n")
        e2e = [("manifest of both + 1 small image", "nds datasets add", "ours (default settings)", add_manifest(work, manifest, "ours", None))]
        if args.old_tree is not None:
            e2e.append(("manifest of both + 1 small image", "nds datasets add", f"old tree {args.old_tree}", add_manifest(work, manifest, "old", args.old_tree.resolve())))

    names = {"sparse": f"sparse file, {sparse_size / 2**30:g} GiB", "padded": f"32x32 PNG + zeros, {sparse_size / 2**30:g} GiB",
             "png": f"PNG {args.side:,} x {args.side:,}, {png_size / 1e6:.2f} MB"}
    table = Table(title=f"hostile files: peak RSS of each step in a fresh process ({platform.machine()}, Python {platform.python_version()}; "
                        f"defaults NDS_MAX_FILE_BYTES={defaults.max_file_bytes:,}, NDS_MAX_IMAGE_PIXELS={defaults.max_image_pixels:,})")
    for col in ("file", "step", "way", "outcome", "peak RSS MiB", "growth MiB", "seconds"):
        table.add_column(col, justify="right" if col in ("peak RSS MiB", "growth MiB", "seconds") else "left")
    for file, step, way, r in rows:
        table.add_row(names[file], step, way, r["outcome"], f"{r['peak_mib']:,.0f}", f"{r['growth_mib']:,.0f}", f"{r['seconds']:.2f}")
    for file, step, way, r in e2e:
        table.add_row(file, step, way, r["outcome"], f"{r['peak_mib']:,.0f}", "", f"{r['seconds']:.2f}")
    Console(width=220).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
