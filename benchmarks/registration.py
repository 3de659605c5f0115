"""Register an image folder of 10,000 small PNGs through the CLI; write 10^6 samples into PostgreSQL.

    .venv/bin/python -m benchmarks.registration [--images 10000] [--pg-samples 1000000] [--end-to-end 100000]
                                                [--database-url URL] [--no-folder] [--no-postgres]

Folder: times `nds datasets add` as a user runs it (a new process: imports, scan, store), with
the default scan threads and, in the same run, with one scan thread (the naive way).
Target: under 30 s for 10,000 images.

PostgreSQL (server mode): the catalog write of a registration, the old way (SQLAlchemy's
executemany of ``insert(Sample)``, what ``store_items`` ran before) beside the new one
(:func:`nds.catalog.bulk.bulk_insert`: COPY through the session's connection), in the same
run on the same server, each on a freshly migrated schema:

* ``--pg-samples`` rows through the real ``store_items`` (its batches, parts, one transaction
  per batch) with the scan replaced by generated ScannedImage rows (WebDataset-like: a shard
  per 1,000 samples, 1,000 labels, a JSON meta per sample): scanning 10^6 real images takes
  minutes of CPU on 2 cores and would hide the write. Its rows/s, the time inside the insert
  calls alone, and the same loop writing nothing (the generating and batching, to subtract);
* the same number of assignment rows, as an index version's commit or a sync writes them
  (executemany in 10,000-row slices against one ``bulk_insert``), in one transaction;
* ``--end-to-end`` samples registered for real (WebDataset shards of 32x32 PNGs, the
  registration job run in-process: scan, decode, hash and store), old write beside new.

The server is a private PostgreSQL started with tests/services.sh (the test suite's; its
settings: fsync and synchronous_commit off, 64 MB shared buffers) and stopped (by PID)
afterwards, or ``--database-url``: a THROW-AWAY database, its schema is dropped and migrated.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "tests" / "services.sh"


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


def folder_table(images: int) -> Table:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "pngs"
        t0 = time.perf_counter()
        write_folder(folder, images)
        made = time.perf_counter() - t0
        fast = time_add(work, folder, scan_workers=None, tag="default")
        naive = time_add(work, folder, scan_workers=1, tag="one-thread")
    table = Table(title=f"registration of {images:,} PNGs (32x32, 10 labels) on {platform.machine()} with {os.cpu_count()} cores",
                  caption=f"(writing the PNGs took {made:.1f} s, not counted)")
    for col in ("variant", "seconds", "images/s", "target"):
        table.add_column(col)
    table.add_row("nds datasets add (default threads)", f"{fast:.2f}", f"{images / fast:,.0f}", "< 30 s " + ("met" if fast < 30 else "MISSED"))
    table.add_row("same, one scan thread (naive)", f"{naive:.2f}", f"{images / naive:,.0f}", f"ratio {naive / fast:.2f}x")
    return table


# --------------------------------------------------------------------------- PostgreSQL


@contextlib.contextmanager
def postgres(url: str | None, work: Path) -> Iterator[tuple[str, str]]:
    """(url, what it is): the given throw-away database, or a private server from
    tests/services.sh, stopped (by PID) on the way out."""
    if url:
        yield url, "the database of --database-url"
        return
    state = work / "services"
    state.mkdir()
    started = subprocess.run(["bash", str(SERVICES), "start", str(state)], capture_output=True, text=True, timeout=180)
    try:
        if started.returncode != 0:
            raise SystemExit(f"cannot start PostgreSQL with tests/services.sh (run 'make services-install' first?):\n{started.stderr[-2000:]}")
        env = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines() if "=" in line)
        yield env["NDS_TEST_DATABASE_URL"], "a private server from tests/services.sh (fsync off), on loopback"
    finally:
        subprocess.run(["bash", str(SERVICES), "stop", str(state)], capture_output=True, text=True, timeout=180)


def fresh_catalog(url: str, home: Path) -> Any:  # noqa: ANN401 - a CatalogContext
    """A CatalogContext on ``url`` with the schema dropped and migrated anew."""
    from sqlalchemy import create_engine, text

    from nds.catalog.context import CatalogContext
    from nds.catalog.db import upgrade
    from nds.catalog.settings import load_settings

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    settings = load_settings(home=home, database_url=url, data_roots=[home.parent], qdrant_url=None, broker_url=None)
    upgrade(settings)
    return CatalogContext.open(settings)


def new_dataset(ctx: Any, name: str) -> int:  # noqa: ANN401
    from nds.catalog.db import session_scope
    from nds.catalog.tables import Dataset

    with session_scope(ctx.engine) as session:
        dataset = Dataset(name=name, source="webdataset", uri="/bench/{00000..00999}.tar")
        session.add(dataset)
        session.flush()
        return int(dataset.id)


def generated_items(n: int, per_shard: int = 1000) -> Iterator[Any]:
    """WebDataset-like items (no bytes: the scan is replaced), a shard per ``per_shard``."""
    from nds.plugins.contract import SourceItem

    for i in range(n):
        shard = f"/bench/shards/{i // per_shard:05d}.tar"
        yield SourceItem(f"{shard}#{i:09d}.png", f"class{i % 1000}", shard=shard, offset=1536 + 2048 * (i % per_shard), size=1000,
                         origin="", meta={"key": f"{i:09d}", "caption": f"a photo\tof thing {i}: \"quoted\" \\ 猫"})


def fake_scan(pool: Any, items: list[Any], first: int, roots: Any, chunk: int = 64, **_: Any) -> list[Any]:  # noqa: ANN401
    """scan_batch's results without reading or decoding anything (a 32x32 image each)."""
    from nds.catalog.registration import ScannedImage

    return [ScannedImage(position=first + j, uri=it.uri, label=it.label, width=32, height=32, byte_size=it.size,
                         sha256=hashlib.sha256(it.uri.encode()).hexdigest(), shard=it.shard, offset=it.offset, meta=it.meta)
            for j, it in enumerate(items)]


def old_write(session: Any, table: Any, rows: list[dict]) -> int:  # noqa: ANN401
    """What store_items ran before: SQLAlchemy's executemany of insert(Sample)."""
    from sqlalchemy import insert

    session.execute(insert(table), rows)
    return len(rows)


def no_write(session: Any, statement: Any, rows: list[dict]) -> int:  # noqa: ANN401
    return len(rows)


class Timed:
    """A writer that adds up the seconds spent inside it."""

    def __init__(self, fn: Callable[..., int]) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args: Any) -> int:  # noqa: ANN401
        t = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - t


def store_generated(ctx: Any, n: int, writer: Callable[..., int]) -> tuple[float, float]:  # noqa: ANN401
    """store_items of ``n`` generated samples with ``writer`` as its insert: (wall s, s inside writer)."""
    from unittest import mock

    from nds.catalog import registration

    dataset_id = new_dataset(ctx, "bench")
    timed = Timed(writer)
    with mock.patch.object(registration, "scan_batch", fake_scan), mock.patch.object(registration, "bulk_insert", timed):
        t = time.perf_counter()
        scan = registration.store_items(ctx, dataset_id, generated_items(n), first_position=0, total_parts=-(-n // 1000))
        wall = time.perf_counter() - t
    assert scan.stored == n, scan.stored
    if writer is not no_write:
        from sqlalchemy import func, select

        from nds.catalog.tables import Sample

        with ctx.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(Sample.__table__)).scalar() == n
    return wall, timed.seconds


def write_assignments(ctx: Any, n: int, new: bool) -> float:  # noqa: ANN401
    """``n`` assignment rows of one index version in one transaction, as commit_index or a sync writes them."""
    from sqlalchemy import insert

    from nds.catalog.bulk import bulk_insert
    from nds.catalog.db import session_scope
    from nds.catalog.tables import Assignment

    dataset_id = new_dataset(ctx, "assign")
    a = Assignment.__table__
    clusters = 50
    rows = [{"sample_id": i, "index_version": 1, "dataset_id": dataset_id, "cluster": i % clusters, "label": f"class{i % 1000}",
             "rank": i // clusters} for i in range(n)]
    t = time.perf_counter()
    with session_scope(ctx.engine) as session:
        if new:
            bulk_insert(session, a, rows)
        else:
            for start in range(0, len(rows), 10_000):
                session.execute(insert(a), rows[start : start + 10_000])
    return time.perf_counter() - t


def end_to_end(ctx: Any, folder: Path, pattern: str, n: int, writer: Callable[..., int] | None) -> float:  # noqa: ANN401
    """A real registration (the job in-process: scan, decode, hash, store) of ``n`` samples in shards."""
    from unittest import mock

    from sqlmodel import Session

    from nds.catalog import registration
    from nds.catalog.jobs import InlineDispatcher, get_job
    from nds.catalog.tables import Dataset, JobStatus

    with mock.patch.object(registration, "bulk_insert", writer) if writer else contextlib.nullcontext():
        t = time.perf_counter()
        dataset, job = registration.start_registration(
            ctx, registration.RegistrationRequest(name="e2e", path=str(folder / pattern), source="webdataset"))
        InlineDispatcher(ctx).submit(job)
        wall = time.perf_counter() - t
    with Session(ctx.engine) as session:
        done, stored = get_job(session, job.id), session.get(Dataset, dataset.id)
        assert done.status == JobStatus.succeeded and stored.num_samples == n, (done.status, done.error)
    return wall


def postgres_table(n: int, e2e: int, url: str | None) -> Table:
    from nds.catalog.bulk import bulk_insert

    rows: list[tuple[str, str, float, float, float | None, float | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with postgres(url, work) as (database, where):
            from sqlalchemy import create_engine, text

            engine = create_engine(database)
            with engine.connect() as conn:
                shown = f"PostgreSQL {conn.execute(text('SHOW server_version')).scalar()}, {where}"
            engine.dispose()

            def run(tag: str, fn: Callable[[Any], Any]) -> Any:  # noqa: ANN401
                ctx = fresh_catalog(database, work / f"home-{tag}")
                try:
                    return fn(ctx)
                finally:
                    ctx.close()

            base, _ = run("none", lambda c: store_generated(c, n, no_write))
            old_wall, old_in = run("old", lambda c: store_generated(c, n, old_write))
            new_wall, new_in = run("new", lambda c: store_generated(c, n, bulk_insert))
            rows.append(("store_items, generated rows (scan replaced)", "executemany -> COPY", old_wall, new_wall,
                         old_wall - base, new_wall - base))
            rows.append(("  inside the insert calls alone", "executemany -> COPY", old_in, new_in, None, None))
            old_a = run("a-old", lambda c: write_assignments(c, n, new=False))
            new_a = run("a-new", lambda c: write_assignments(c, n, new=True))
            rows.append(("assignments of an index version, one transaction", "executemany /10k -> COPY", old_a, new_a, None, None))
            if e2e:
                from benchmarks.shard_registration import write_shards

                folder = work / "shards"
                t = time.perf_counter()
                shards = write_shards(folder, e2e, 1000)
                made = time.perf_counter() - t
                pattern = f"{{00000..{shards - 1:05d}}}.tar"
                old_e = run("e-old", lambda c: end_to_end(c, folder, pattern, e2e, old_write))
                new_e = run("e-new", lambda c: end_to_end(c, folder, pattern, e2e, None))
                rows.append((f"end to end: {e2e:,} samples in {shards:,} WebDataset shards (job in-process)", "executemany -> COPY",
                             old_e, new_e, None, None))
    table = Table(title=f"catalog write of a registration into PostgreSQL: {n:,} samples, old beside new, same run "
                        f"({platform.machine()}, {os.cpu_count()} cores, {shown})",
                  caption="rows/s = samples / seconds; 'write only' subtracts the same store_items loop writing nothing "
                          f"({base:.1f} s: generating, batching){'' if not e2e else f'; writing the shards took {made:.0f} s, not counted'}")
    for col in ("what", "old -> new", "old s", "new s", "old rows/s", "new rows/s", "speed-up"):
        table.add_column(col, justify="left" if col in ("what", "old -> new") else "right")
    for what, how, old_s, new_s, old_w, new_w in rows:
        count = e2e if what.startswith("end to end") else n
        table.add_row(what, how, f"{old_s:.1f}", f"{new_s:.1f}", f"{count / old_s:,.0f}", f"{count / new_s:,.0f}", f"{old_s / new_s:.1f}x")
        if old_w is not None and new_w is not None:
            table.add_row("  write only (wall less the no-write loop)", how, f"{old_w:.1f}", f"{new_w:.1f}", f"{count / old_w:,.0f}",
                          f"{count / max(new_w, 1e-9):,.0f}", f"{old_w / max(new_w, 1e-9):.1f}x")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--no-folder", action="store_true", help="skip the image-folder registration through the CLI")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL write")
    parser.add_argument("--pg-samples", type=int, default=1_000_000, help="samples written into PostgreSQL")
    parser.add_argument("--end-to-end", type=int, default=100_000, help="samples registered for real into PostgreSQL (0: none)")
    parser.add_argument("--database-url", default=None,
                        help="a THROW-AWAY PostgreSQL database (its schema is dropped); default: a private server from tests/services.sh")
    args = parser.parse_args(argv)
    console = Console(width=180)
    if not args.no_folder:
        console.print(folder_table(args.images))
    if not args.no_postgres:
        console.print(postgres_table(args.pg_samples, args.end_to_end, args.database_url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
