"""Register an image folder of 10,000 small PNGs through the CLI, with a fresh NDS_HOME.

    .venv/bin/python -m benchmarks.registration [--images 10000]

Times `nds datasets add` as a user runs it (a new process: imports, scan, store), with
the default scan threads and, in the same run, with one scan thread (the naive way).
Target: under 30 s for 10,000 images.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table


def write_folder(root: Path, images: int, labels: int = 10, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class{i % labels}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")


def time_add(work: Path, folder: Path, *, scan_workers: int | None, tag: str) -> float:
    env = {**os.environ, "NDS_HOME": str(work / f"home-{tag}"), "NDS_DATA_ROOTS": str(work), "NDS_DATABASE_URL": "", "NDS_BROKER_URL": ""}
    if scan_workers:
        env["NDS_SCAN_WORKERS"] = str(scan_workers)
    nds = Path(sys.executable).with_name("nds")
    subprocess.run([nds, "db", "upgrade"], env=env, check=True, capture_output=True)
    start = time.perf_counter()
    subprocess.run([nds, "datasets", "add", "bench", str(folder), "--json"], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "pngs"
        t0 = time.perf_counter()
        write_folder(folder, args.images)
        made = time.perf_counter() - t0
        fast = time_add(work, folder, scan_workers=None, tag="default")
        naive = time_add(work, folder, scan_workers=1, tag="one-thread")
    table = Table(title=f"registration of {args.images:,} PNGs (32x32, 10 labels) on {platform.machine()} with {os.cpu_count()} cores")
    for col in ("variant", "seconds", "images/s", "target"):
        table.add_column(col)
    table.add_row("nds datasets add (default threads)", f"{fast:.2f}", f"{args.images / fast:,.0f}", "< 30 s " + ("met" if fast < 30 else "MISSED"))
    table.add_row("same, one scan thread (naive)", f"{naive:.2f}", f"{args.images / naive:,.0f}", f"ratio {naive / fast:.2f}x")
    Console().print(table)
    Console().print(f"(writing the PNGs took {made:.1f} s, not counted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
