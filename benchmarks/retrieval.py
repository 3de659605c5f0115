"""Weighted retrieval: query latency as N grows (next to numpy.random.choice over per-sample weights, and at N = 10^9); manifest export, previous path vs snapshot path.

    .venv/bin/python -m benchmarks.retrieval [--quick] [--repeats 20] [--samples-at-max] [--sections latency,huge,export]

**Latency, G = 1,000.** For N = 10^5, 10^6 and 10^7 indexed samples (synthetic catalog rows:
10 datasets x 10 clusters x 10 labels = 1,000 groups of random sizes summing to N, random
rotation-expert scores) it times :func:`nds.catalog.retrieval.queries.run_query`, the whole
server-side query (validation, group reads, weights, O(G + B) sampling, summary, storing the
picks and the query row), for budgets 10^4 and 10^5, ~20 seeds each, p50 and p95, in
interleaved rounds (every catalog and B once per round, so a noisy neighbour slows all sizes
alike). In the same run it times the original service's way, ``numpy.random.choice(N, B, p=w)``
over the per-sample weight vector ``w = np.repeat(mass / size, size)`` built from the same group
masses: the naive figure is building ``w`` (the original rebuilt it for every query, since it
depends on the scores; timed once per N) plus the choice call (timed per seed); the choice
call alone is shown too. Queries run back to back, as a server runs them: no forced garbage
collection between them (a ``gc.collect()`` before each one, as earlier versions of this
benchmark did, leaves the caches cold and adds about 1.8 ms to every query). Targets:
naive / ours >= 50x at N = 10^7, and our p50 flat in N (p50 at the largest N within 1.5x of
the p50 at the smallest). ``sample_groups`` alone (group masses -> picks, the like-for-like
counterpart of the choice call) and each stage of ``run_query`` are timed too, to show where
the time goes. One size also goes through HTTP (POST /v1/queries, FastAPI TestClient) to
show the overhead.

**Latency at huge N, G = 10^5** (section ``huge``). Two more catalogs with the same G = 10^5
groups (10 datasets x 100 clusters x 100 labels, 1,000 rotation experts) and N = 10^5 (every
group one sample) and N = 10^9 samples: group layout only, no sample rows (a query reads
groups and experts, never samples), built with
:func:`nds.samples.synthetic.add_indexed_dataset` ``sizes=`` (a second or two each: its groups
go in with one executemany, so no bulk insert is needed). Their queries run in the same
interleaved rounds as above; p50 / p95 for the same budgets. Target: p50 flat in N,
p50(N = 10^9) / p50(N = 10^5) within 1.5x. Memory: each of the two catalogs is queried
(a warm-up, then the seeds of both budgets) in a fresh subprocess whose current RSS is polled
every 5 ms; the table gives RSS after start-up, the peak during the queries and the growth.
Target: the growth at N = 10^9 within 1.25x (or +8 MiB) of the growth at N = 10^5, i.e. O(G),
not O(N) (the naive per-sample weight vector would be 8N bytes: 7.5 GiB at N = 10^9). The
stages of ``run_query`` are shown for N = 10^9 too.

**Manifest export** (section ``export``). A manifest of 10^6 rows (budget 10^6 without
replacement over a 10^6-sample catalog with sample rows: every sample once) and one of 10^5
rows are streamed through the csv and parquet exporters into files, each export in a fresh
subprocess, by two paths in the same run (interleaved: each (format, rows) by one path then
the other):

- *previous*: the SQL path, ``iter_manifest_sql`` -> ``ManifestRow.as_dict`` ->
  ``exporter.stream`` (row objects, SQL lookups per chunk of 2,000 picks);
- *snapshot*: what the manifest route runs now, ``iter_manifest_batches`` ->
  ``exporter.stream_batches`` (pyarrow record batches taken from the memory-mapped Arrow
  snapshot of each index version).

The snapshots are built beforehand in the parent (``write_snapshot`` for each dataset, timed
and printed: it is not part of an export's time); a snapshot worker opens (maps and checks) its
snapshots before the clock starts, as a warm server has them open (that time is printed too).
Per export: rows/s; the growth of the current RSS during the export (polled every 5 ms; all
resident pages, and the anonymous ones alone: resident less file-backed, since the snapshot's
mapped pages are page cache, shared and reclaimable, and grow with the rows read); the peak
of pyarrow's allocator over the export (polled likewise; tracemalloc does not see it); the
tracemalloc peak in a second run (tracemalloc slows Python down, so it never shares a run with
the timing); ru_maxrss (usually set by the imports); and whether the file has the same bytes
as the other path's. Targets: snapshot path >= 1,000,000 rows/s in csv and in parquet at
10^6 rows; memory flat in the row count for both paths (10x the rows: tracemalloc peak within
1.25x or +1 MiB, the parquet footer's ~1 KB per 2,000-row row group; anonymous RSS growth
within 1.25x or +8 MiB); the previous path's 20,000 rows/s bar
and all-resident RSS growth are shown as information.

``--quick``: N = 10^5 and 10^6 (the latter without sample rows) at G = 1,000; N = 10^5 and
10^8 at G = 10^4 for the huge-N section; 5 seeds; exports of 10^4 and 10^5 rows from a
10^5-sample catalog: a smoke run of a minute or two.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.table import Table

from nds.catalog.context import CatalogContext
from nds.catalog.db import session_scope, upgrade
from nds.catalog.retrieval.manifest import ManifestRow, iter_manifest_batches, iter_manifest_sql, rows_batch
from nds.catalog.retrieval.picks import open_picks, save_picks
from nds.catalog.retrieval.queries import build_groups, get_query, run_query, summarize
from nds.catalog.retrieval.request import QueryRequest
from nds.catalog.retrieval.sampling import sample_groups
from nds.catalog.retrieval.snapshot import open_snapshot, write_snapshot
from nds.catalog.retrieval.weights import GroupTable
from nds.catalog.settings import Settings, load_settings
from nds.samples.synthetic import add_indexed_dataset

SHAPE = (10, 10, 10)          # datasets x clusters x labels: G = 1,000
HUGE_SHAPE = (10, 100, 100)   # G = 10^5, for the huge-N section
QUICK_HUGE_SHAPE = (10, 10, 100)  # G = 10^4
RATIO_TARGET = 50.0
FLAT_TARGET = 1.5
MEMORY_GROWTH_TARGET = 1.25
#: a parquet file's footer holds ~1 KB of metadata per row group (one per 2,000-row chunk): ~0.5 MiB at 10^6 rows, kept until the end
TRACE_SLACK_MIB = 1.0
RSS_SLACK_MIB = 8.0
EXPORT_RATE_BAR = 20_000         # rows/s: the previous path's bar (information)
SNAPSHOT_RATE_TARGET = 1_000_000  # rows/s: the snapshot path's target at 10^6 rows
FORMATS = ("csv", "parquet")
PATHS = ("previous", "snapshot")
PATH_NOTES = {"previous": "SQL rows: iter_manifest_sql -> as_dict -> exporter.stream",
              "snapshot": "iter_manifest_batches -> exporter.stream_batches"}
SECTIONS = ("latency", "huge", "export")
ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


# --------------------------------------------------------------------------- catalog


def group_sizes(n: int, rng: np.random.Generator, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """datasets x clusters x labels random-ish sizes (log-normal shares), each >= 1, summing to n exactly."""
    g = int(np.prod(shape))
    assert n >= g, f"{n} samples cannot fill {g} groups"
    share = rng.lognormal(0.0, 0.6, g)
    raw = share / share.sum() * (n - g)
    sizes = np.floor(raw).astype(np.int64)
    rest = (n - g) - int(sizes.sum())
    sizes[np.argsort(raw - sizes)[::-1][:rest]] += 1  # largest remainders
    sizes += 1
    assert int(sizes.sum()) == n
    return sizes.reshape(shape)


def settings_for(home: Path) -> Settings:
    # manifest_snapshots on whatever the environment says: the snapshot path must not fall back to SQL unseen
    return load_settings(home=home, database_url=None, broker_url=None, qdrant_url=None, data_roots=[home], manifest_snapshots=True)


@dataclass
class Catalog:
    home: Path
    settings: Settings
    ctx: CatalogContext
    scores: dict[int, float]
    n: int
    groups: int
    with_samples: bool
    build_s: float
    dataset_ids: list[int] = field(default_factory=list)
    table: GroupTable | None = None  # the group table of these scores, for timing sample_groups alone
    unique: dict[int, list[int]] = field(default_factory=dict)  # budget -> unique samples picked per query


def build_catalog(home: Path, n: int, *, with_samples: bool, shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> Catalog:
    settings = settings_for(home)
    upgrade(settings)
    ctx = CatalogContext.open(settings)
    rng = np.random.default_rng(seed)
    datasets, clusters, labels_n = shape
    sizes = group_sizes(n, rng, shape)
    labels = [f"class{j}" for j in range(labels_n)]
    start = time.perf_counter()
    scores: dict[int, float] = {}
    ids = []
    for d in range(datasets):
        ds = add_indexed_dataset(ctx, f"synth{d}", clusters=clusters, labels=labels, sizes=sizes[d], with_samples=with_samples)
        ids.append(ds.dataset_id)
        for expert_id in ds.expert_ids.values():
            scores[expert_id] = float(rng.uniform(0.25, 0.9))  # rotation accuracies: chance is 0.25
    build_s = time.perf_counter() - start
    (home / "scores.json").write_text(json.dumps({str(k): v for k, v in scores.items()}))  # for the query worker
    return Catalog(home, settings, ctx, scores, n, int(np.prod(shape)), with_samples, build_s, ids)


# --------------------------------------------------------------------------- latency


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_ours(cat: Catalog, budget: int, repeats: int, *, seed: int = 0, warm: bool = True) -> list[float]:
    if warm:
        run_query(cat.ctx, QueryRequest(expert_scores=cat.scores, budget=budget, seed=10_000))  # warm-up, not counted
    times = []
    for s in range(seed, seed + repeats):
        start = time.perf_counter()
        query = run_query(cat.ctx, QueryRequest(expert_scores=cat.scores, budget=budget, seed=s))
        times.append(time.perf_counter() - start)
        cat.unique.setdefault(budget, []).append(query.summary["unique_samples"])
    return times


def time_core(cat: Catalog, budget: int, repeats: int, *, seed: int = 0) -> list[float]:
    """sample_groups alone (group masses -> picks), the like-for-like counterpart of the naive choice call."""
    if cat.table is None:
        with cat.ctx.engine.connect() as conn:
            cat.table = build_groups(cat.ctx, conn, QueryRequest(expert_scores=cat.scores, budget=budget)).table
        sample_groups(cat.table, budget, replacement=True, seed=10_000)  # warm-up
    table = cat.table
    times = []
    for s in range(seed, seed + repeats):
        start = time.perf_counter()
        sample_groups(table, budget, replacement=True, seed=s)
        times.append(time.perf_counter() - start)
    return times


def naive_weights(cat: Catalog) -> tuple[np.ndarray, float]:
    """The per-sample weight vector the original service sampled from, from our group masses."""
    query = run_query(cat.ctx, QueryRequest(expert_scores=cat.scores, budget=1, seed=0))
    with open_picks(cat.ctx, query.id) as (table, _, _):
        pass
    start = time.perf_counter()
    w = np.repeat(table.mass / table.size, table.size)
    w /= w.sum()
    built = time.perf_counter() - start
    assert len(w) == cat.n
    return w, built


def time_naive(w: np.ndarray, budget: int, repeats: int, *, seed: int = 0) -> list[float]:
    times = []
    for s in range(seed, seed + repeats):
        np.random.seed(s)
        start = time.perf_counter()
        np.random.choice(len(w), budget, p=w)
        times.append(time.perf_counter() - start)
    return times


STAGES = ("validate + read groups + weights", "sample_groups (O(G+B))", "summarize", "save_picks (raw picks file)", "store query row")


def time_stages(cat: Catalog, budget: int, repeats: int) -> dict[str, float]:
    """run_query's stages one by one (same calls, same order), p50 ms each: where the time goes."""
    from nds.catalog.retrieval.queries import _request_json
    from nds.catalog.retrieval.request import validate_request
    from nds.catalog.tables import Query

    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    for seed in range(repeats):
        request = QueryRequest(expert_scores=cat.scores, budget=budget, seed=seed)
        t0 = time.perf_counter()
        validate_request(request, max_budget=cat.ctx.settings.max_budget)
        with cat.ctx.engine.connect() as conn:
            groups = build_groups(cat.ctx, conn, request)
            table, versions = groups.table, groups.versions
        t1 = time.perf_counter()
        picks = sample_groups(table, budget, replacement=True, seed=seed)
        t2 = time.perf_counter()
        summary = summarize(groups, picks, request)
        t3 = time.perf_counter()
        qid = str(uuid.uuid4())
        save_picks(cat.ctx, qid, table, picks)
        t4 = time.perf_counter()
        with session_scope(cat.ctx.engine) as session:
            session.add(Query(id=qid, request=_request_json(request), index_versions={str(k): v for k, v in sorted(versions.items())}, summary=summary))
        t5 = time.perf_counter()
        for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[key].append(dt)
    return {k: statistics.median(v) * 1000 for k, v in stages.items()}


def time_http(cat: Catalog, budget: int, repeats: int) -> list[float]:
    from fastapi.testclient import TestClient

    from nds.api.app import create_app

    body = {"expert_scores": {str(k): v for k, v in cat.scores.items()}, "budget": budget}
    times = []
    with TestClient(create_app(cat.settings), base_url="http://127.0.0.1") as client:
        r = client.post("/v1/queries", json={**body, "seed": 10_000})  # warm-up
        r.raise_for_status()
        for seed in range(repeats):
            start = time.perf_counter()
            r = client.post("/v1/queries", json={**body, "seed": seed})
            times.append(time.perf_counter() - start)
            assert r.status_code == 201, r.text
    return times


# --------------------------------------------------------------------------- memory sampling


class RssSampler:
    """Current RSS (Linux /proc/self/statm) and pyarrow's allocated bytes polled every few ms on a
    thread: their peaks during a block, minus their values at its start. ``growth`` counts every
    resident page, ``anon_growth`` the anonymous ones alone (resident less file-backed: mapped
    files such as a snapshot are page cache), ``arrow_growth`` pyarrow's default memory pool."""

    def __init__(self, every_s: float = 0.005) -> None:
        import threading

        self.every_s = every_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.current()
        self.peak = list(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> tuple[int, int, int]:
        """(resident bytes, anonymous resident bytes, pyarrow allocated bytes)."""
        try:
            with open("/proc/self/statm") as fh:
                fields = fh.read().split()
            resident, shared = int(fields[1]) * self.page, int(fields[2]) * self.page
        except OSError:
            resident = shared = 0
        return resident, resident - shared, pa.total_allocated_bytes()

    def _sample(self) -> None:
        now = self.current()
        self.peak = [max(p, c) for p, c in zip(self.peak, now)]

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def growth(self) -> int:
        return self.peak[0] - self.start[0]

    @property
    def anon_growth(self) -> int:
        return self.peak[1] - self.start[1]

    @property
    def arrow_growth(self) -> int:
        return self.peak[2] - self.start[2]


def current_rss() -> int:
    return RssSampler().current()[0]


# --------------------------------------------------------------------------- query memory (one subprocess per catalog)


def query_worker(home: str, budgets: str, repeats: int) -> dict:
    """Query a catalog in a fresh process: RSS after start-up, after the first query of each
    budget (the group layout read and cached), and its peak during the timed queries."""
    settings = settings_for(Path(home))
    ctx = CatalogContext.open(settings)
    scores = {int(k): float(v) for k, v in json.loads((Path(home) / "scores.json").read_text()).items()}
    bs = [int(b) for b in budgets.split(",")]
    gc.collect()
    base = current_rss()
    for b in bs:
        run_query(ctx, QueryRequest(expert_scores=scores, budget=b, seed=10_000))  # warm-up: layout cached, code paths warm
    warm = current_rss()
    times: dict[int, list[float]] = {b: [] for b in bs}
    with RssSampler() as rss:
        for s in range(repeats):
            for b in bs:
                t0 = time.perf_counter()
                run_query(ctx, QueryRequest(expert_scores=scores, budget=b, seed=s))
                times[b].append(time.perf_counter() - t0)
    ctx.close()
    return {"base": base, "warm": warm, "peak": rss.peak[0], "growth": rss.peak[0] - base,
            "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "p50": {str(b): pct(t, 50) for b, t in times.items()}}


def run_worker(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.retrieval", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[:1]} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- export (one subprocess per run)


WARM_ROW = ManifestRow("w/1", "/w/1.png", "w", "w", 0, 1.0, 1)


def export_worker(home: str, query_id: str, fmt: str, out: str, path: str, *, trace: bool, profile: str | None = None) -> dict:
    """Stream a query's manifest through an exporter into a file, by the previous (SQL rows) path
    or by the snapshot path (record batches, as the manifest route does)."""
    assert path in PATHS, path
    settings = settings_for(Path(home))
    ctx = CatalogContext.open(settings)
    exporter = ctx.exporters.get(fmt)()  # imports the plugin (pyarrow for parquet) before the baseline
    warm = ctx.exporters.get(fmt)()      # and whatever it imports lazily on first use
    for _ in (warm.stream([[WARM_ROW.as_dict()]]) if path == "previous" else warm.stream_batches([rows_batch([WARM_ROW])])):
        pass
    with session_scope(ctx.engine) as session:
        query = get_query(session=session, query_id=query_id)
    open_s = 0.0
    if path == "previous":
        for _ in iter_manifest_sql(ctx, query, limit=1):  # SQL compiled once, outside the measurement
            pass
    else:
        t0 = time.perf_counter()  # a warm server has its snapshots mapped: map and check them before the clock starts
        for did, version in query.index_versions.items():
            open_snapshot(ctx, int(did), int(version))
        open_s = time.perf_counter() - t0
        for _ in iter_manifest_batches(ctx, query, limit=1):
            pass
    gc.collect()
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trace:
        tracemalloc.start()
    rows = 0

    def chunks():  # the previous path: row objects made into dicts
        nonlocal rows
        for chunk in iter_manifest_sql(ctx, query):
            rows += len(chunk)
            yield [r.as_dict() for r in chunk]

    def batches():  # the snapshot path: record batches, as the route streams them
        nonlocal rows
        for batch in iter_manifest_batches(ctx, query):
            rows += batch.num_rows
            yield batch

    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    written = 0
    with RssSampler() as rss, open(out, "wb") as fh:
        if profiler:
            profiler.enable()
        stream = exporter.stream(chunks()) if path == "previous" else exporter.stream_batches(batches())
        for part in stream:
            fh.write(part)
            written += len(part)
        if profiler:
            profiler.disable()
    seconds = time.perf_counter() - start
    result = {"rows": rows, "seconds": seconds, "bytes": written, "base_kib": base_kib, "open_s": open_s,
              "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rss_growth": rss.growth,
              "anon_growth": rss.anon_growth, "arrow_peak": rss.arrow_growth}
    if trace:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result["trace_peak"] = peak
    if profiler and profile:
        profiler.dump_stats(profile)
    h = hashlib.sha256()
    with open(out, "rb") as fh:  # after the clock: the bytes, to compare the two paths
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    result["sha256"] = h.hexdigest()
    ctx.close()
    return result


def run_export(home: Path, query_id: str, fmt: str, out: Path, path: str, *, trace: bool) -> dict:
    try:
        return run_worker(["--export-worker", str(home), query_id, fmt, str(out), path] + (["--trace"] if trace else []))
    finally:
        out.unlink(missing_ok=True)


# --------------------------------------------------------------------------- main


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:,.1f}" if ms < 100 else f"{ms:,.0f}"


def fmt_n(n: int) -> str:
    """10^k for powers of ten, else n with separators."""
    k = round(np.log10(n)) if n > 0 else 0
    return f"10^{k}" if 10**k == n else f"{n:,}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 5 seeds, exports of 10^4 and 10^5 rows: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="seeds per (N, budget) for our query (default 20, 5 with --quick)")
    parser.add_argument("--naive-repeats", type=int, default=5)
    parser.add_argument("--samples-at-max", action="store_true", help="also build the sample rows of the largest N (10^7: a few minutes, a few GB)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"which sections to run, comma-separated (default: {','.join(SECTIONS)})")
    parser.add_argument("--export-worker", nargs=5, metavar=("HOME", "QUERY", "FORMAT", "OUT", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--query-worker", nargs=3, metavar=("HOME", "BUDGETS", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export_worker:
        print(json.dumps(export_worker(*args.export_worker, trace=args.trace, profile=args.profile)))
        return 0
    if args.query_worker:
        home, budgets, reps = args.query_worker
        print(json.dumps(query_worker(home, budgets, int(reps))))
        return 0
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if sections - set(SECTIONS):
        parser.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose among {', '.join(SECTIONS)}")

    full = not args.quick
    sizes = (10**5, 10**6, 10**7) if full else (10**5, 10**6)
    huge_shape = HUGE_SHAPE if full else QUICK_HUGE_SHAPE
    huge_g = int(np.prod(huge_shape))
    huge_sizes = (10**5, 10**9) if full else (10**5, 10**8)
    budgets = (10**4, 10**5)
    repeats = args.repeats or (20 if full else 5)
    export_rows = (10**5, 10**6) if full else (10**4, 10**5)
    export_n = 10**6 if full else 10**5  # the catalog the manifests come from
    http_n = export_n
    G = int(np.prod(SHAPE))
    lo, hi = sizes[0], sizes[-1]
    console = Console(width=250)
    t_all = time.perf_counter()

    # catalogs by (G, N); the latency section's are G = 1,000, the huge-N section's G = huge_g
    keys: list[tuple[int, int]] = []
    if "latency" in sections:
        keys += [(G, n) for n in sizes]
    elif "export" in sections:
        keys += [(G, export_n)]
    if "huge" in sections:
        keys += [(huge_g, n) for n in huge_sizes]
    latency: dict[tuple[int, int, int], dict[str, float]] = {}
    w_build: dict[int, float] = {}
    stages: dict[tuple[int, int, int], dict[str, float]] = {}
    http: dict[str, float] = {}
    memory: dict[tuple[int, int], dict] = {}
    export: dict[tuple[str, int, str], dict] = {}
    snap: dict[str, float] = {}
    cats: dict[tuple[int, int], Catalog] = {}
    with tempfile.TemporaryDirectory(prefix="nds-bench-retrieval-") as tmp:
        work = Path(tmp)
        weights: dict[int, np.ndarray] = {}
        for g, n in keys:
            shape = SHAPE if g == G else huge_shape
            with_samples = g == G and (n <= export_n or (args.samples_at_max and n == hi))
            console.log(f"G = {g:,}, N = {n:,}: building the catalog ({'with' if with_samples else 'without'} sample rows)")
            cats[(g, n)] = build_catalog(work / f"home-{g}-{n}", n, with_samples=with_samples, shape=shape)
            console.log(f"  built in {cats[(g, n)].build_s:,.1f} s")
            if g == G and "latency" in sections:
                weights[n], w_build[n] = naive_weights(cats[(g, n)])

        timed = [k for k in keys if (k[0] == G and "latency" in sections) or (k[0] == huge_g and "huge" in sections)]
        if timed:
            # Interleaved rounds (every catalog and B once per round) so that a noisy neighbour hits all sizes alike.
            console.log(f"latency: {repeats} rounds of run_query and sample_groups over {len(timed)} catalogs, numpy.random.choice in the first {args.naive_repeats}")
            ours: dict[tuple[int, int, int], list[float]] = {(g, n, b): [] for g, n in timed for b in budgets}
            core: dict[tuple[int, int, int], list[float]] = {k: [] for k in ours}
            naive: dict[tuple[int, int, int], list[float]] = {k: [] for k in ours}
            for g, n in timed:
                for b in budgets:
                    time_ours(cats[(g, n)], b, 0)  # warm-up query, not counted
            for rnd in range(repeats):
                for g, n in timed:
                    for b in budgets:
                        ours[(g, n, b)] += time_ours(cats[(g, n)], b, 1, seed=rnd, warm=False)
                        core[(g, n, b)] += time_core(cats[(g, n)], b, 1, seed=rnd)
                        if n in weights and g == G and rnd < args.naive_repeats:
                            naive[(g, n, b)] += time_naive(weights[n], b, 1, seed=rnd)
            for key in ours:
                g, n, b = key
                r = {"unique": statistics.mean(cats[(g, n)].unique[b]), "p50": pct(ours[key], 50), "p95": pct(ours[key], 95), "core_p50": pct(core[key], 50)}
                if naive[key]:
                    r.update(naive_p50=pct(naive[key], 50), naive_p95=pct(naive[key], 95), naive_total_p50=pct(naive[key], 50) + w_build[n])
                latency[key] = r
            weights.clear()
            stage_cats = ([(G, hi)] if "latency" in sections else []) + ([(huge_g, huge_sizes[-1])] if "huge" in sections else [])
            for g, n in stage_cats:
                for b in budgets:
                    stages[(g, n, b)] = time_stages(cats[(g, n)], b, repeats)
        if "latency" in sections:
            console.log(f"N = {http_n:,}: POST /v1/queries through TestClient")
            h = time_http(cats[(G, http_n)], budgets[0], repeats)
            http = {"p50": pct(h, 50), "p95": pct(h, 95)}
        if "huge" in sections:
            for n in huge_sizes:
                console.log(f"G = {huge_g:,}, N = {n:,}: queries in a fresh subprocess (RSS)")
                memory[(huge_g, n)] = run_worker(["--query-worker", str(cats[(huge_g, n)].home), ",".join(map(str, budgets)), str(repeats)])

        if "export" in sections:
            cat = cats[(G, export_n)]
            ids = {}
            for rows in export_rows:
                q = run_query(cat.ctx, QueryRequest(expert_scores=cat.scores, budget=rows, replacement=False, seed=1))
                assert q.summary["unique_samples"] == rows, q.summary["unique_samples"]
                ids[rows] = q.id
            console.log(f"snapshots of the N = {export_n:,} catalog: write_snapshot for each of its {len(cat.dataset_ids)} datasets")
            t0 = time.perf_counter()
            snap_keys = [write_snapshot(cat.ctx, did, 1) for did in cat.dataset_ids]
            snap["build_s"] = time.perf_counter() - t0
            assert all(snap_keys), snap_keys
            snap["bytes"] = sum(cat.ctx.artifacts.open_path(k).stat().st_size for k in snap_keys if k)
        for c in cats.values():
            c.ctx.close()
        if "export" in sections:
            for fmt in FORMATS:
                for rows in export_rows:
                    for path in PATHS:
                        console.log(f"export {rows:,} rows as {fmt}, {path} path (fresh subprocesses: timing + RSS, then tracemalloc)")
                        home = work / f"home-{G}-{export_n}"
                        untraced = run_export(home, ids[rows], fmt, work / f"m.{fmt}", path, trace=False)
                        traced = run_export(home, ids[rows], fmt, work / f"m.{fmt}", path, trace=True)
                        assert untraced["rows"] == traced["rows"] == rows, (untraced["rows"], traced["rows"], rows)
                        export[(fmt, rows, path)] = {**untraced, "trace_peak": traced["trace_peak"], "trace_seconds": traced["seconds"]}
    total = time.perf_counter() - t_all

    # ------------------------------------------------------------------- tables
    machine = f"on {platform.machine()} with {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"
    if "latency" in sections:
        sample_note = "; ".join(f"N = {n:,}: {'yes' if cats[(G, n)].with_samples else 'no (groups and experts only)'}" for n in sizes)
        t = Table(title=f"query latency, G = {G:,} groups, {repeats} seeds, {machine}",
                  caption="ours: run_query in-process, the whole server-side query (validation, group reads, weights, sampling, summary,\n"
                          "picks file + query row stored), back to back after one warm-up. core: sample_groups alone (group masses -> picks).\n"
                          f"naive: the original service's per-query work: build the N per-sample weights w from the scores, then\n"
                          f"np.random.choice(N, B, p=w) ({args.naive_repeats} runs); 'choice' columns time the choice call alone.\n"
                          f"The query reads only groups and experts; sample rows in the catalog: {sample_note}.")
        for col in ("N", "B", "unique picks", "ours p50 ms", "ours p95 ms", "core p50 ms", "naive p50 ms", "choice p50 ms", "naive / ours", "choice / ours", "choice / core"):
            t.add_column(col, justify="right")
        for n in sizes:
            for b in budgets:
                r = latency[(G, n, b)]
                t.add_row(f"{n:,}", f"{b:,}", f"{r['unique']:,.0f}", fmt_ms(r["p50"]), fmt_ms(r["p95"]), fmt_ms(r["core_p50"]), fmt_ms(r["naive_total_p50"]),
                          fmt_ms(r["naive_p50"]), f"{r['naive_total_p50'] / r['p50']:,.1f}x", f"{r['naive_p50'] / r['p50']:,.1f}x", f"{r['naive_p50'] / r['core_p50']:,.1f}x")
        console.print(t)

    if "huge" in sections:
        t = Table(title=f"query latency at fixed G = {huge_g:,} groups ({huge_shape[0]} datasets x {huge_shape[1]} clusters x {huge_shape[2]} labels, "
                        f"{huge_shape[0] * huge_shape[1]:,} experts scored), only N grows; {repeats} seeds, {machine}",
                  caption="Group layout only (no sample rows): a query reads groups and experts. Same interleaved rounds as the G = 1,000 table.\n"
                          "core: sample_groups alone. naive w: the per-sample weight vector the original service built per query (8N bytes; not built here).")
        for col in ("N", "B", "unique picks", "ours p50 ms", "ours p95 ms", "core p50 ms", "naive w would be"):
            t.add_column(col, justify="right")
        for n in huge_sizes:
            for b in budgets:
                r = latency[(huge_g, n, b)]
                t.add_row(f"{n:,}", f"{b:,}", f"{r['unique']:,.0f}", fmt_ms(r["p50"]), fmt_ms(r["p95"]), fmt_ms(r["core_p50"]), f"{8 * n / MIB:,.1f} MiB")
        console.print(t)
        m = Table(title=f"process memory while querying, G = {huge_g:,}: each catalog queried in a fresh subprocess "
                        f"(warm-up, then {repeats} seeds x B = {', '.join(f'{b:,}' for b in budgets)})",
                  caption="start-up: RSS after imports and opening the catalog, before any query. after warm-up: after one query per budget\n"
                          "(group layout read and cached). peak: current RSS polled every 5 ms during the timed queries. growth: peak - start-up.\n"
                          "p50: the same queries' latency in that process (a cross-check of the interleaved figures).")
        for col in ("N", "RSS start-up MiB", "after warm-up MiB", "peak MiB", "growth MiB", "ru_maxrss MiB", *(f"p50 ms B = {b:,}" for b in budgets), "naive w (8N bytes)"):
            m.add_column(col, justify="right")
        for n in huge_sizes:
            r = memory[(huge_g, n)]
            m.add_row(f"{n:,}", f"{r['base'] / MIB:,.1f}", f"{r['warm'] / MIB:,.1f}", f"{r['peak'] / MIB:,.1f}", f"{r['growth'] / MIB:,.1f}",
                      f"{r['maxrss_kib'] / 1024:,.1f}", *(fmt_ms(r["p50"][str(b)]) for b in budgets), f"{8 * n / MIB:,.1f} MiB")
        console.print(m)

    side = Table(title="around the query")
    side.add_column("what")
    side.add_column("value", justify="right")
    for (g, n), c in cats.items():
        side.add_row(f"build synthetic catalog G = {g:,}, N = {n:,} ({'groups + sample rows' if c.with_samples else 'groups only'})", f"{c.build_s:,.1f} s")
    for n, secs in w_build.items():
        side.add_row(f"naive: build w = np.repeat(mass/size, size), N = {n:,} (part of 'naive' above)", f"{secs * 1000:,.1f} ms")
    if http:
        inproc = latency[(G, http_n, budgets[0])]
        side.add_row(f"POST /v1/queries via TestClient, N = {http_n:,}, B = {budgets[0]:,}: p50 / p95", f"{fmt_ms(http['p50'])} / {fmt_ms(http['p95'])} ms")
        side.add_row("  HTTP overhead over the in-process p50", f"{(http['p50'] - inproc['p50']) * 1000:+,.1f} ms")
    if snap:
        side.add_row(f"build the snapshots of the N = {export_n:,} catalog (write_snapshot x {len(cats[(G, export_n)].dataset_ids)} datasets, from SQL; not in the export times)",
                     f"{snap['build_s']:,.1f} s ({export_n / snap['build_s']:,.0f} rows/s, {snap['bytes'] / MIB:,.1f} MiB)")
    console.print(side)

    if stages:
        st = Table(title="where run_query's time goes (its stages called one by one, p50 ms)")
        st.add_column("stage")
        for g, n, b in stages:
            st.add_column(f"G = {g:,}, N = {fmt_n(n)}, B = {fmt_n(b)}", justify="right")
        for key in STAGES:
            st.add_row(key, *(f"{s[key]:,.1f}" for s in stages.values()))
        st.add_row("sum", *(f"{sum(s.values()):,.1f}" for s in stages.values()))
        console.print(st)

    if export:
        e = Table(title=f"manifest export from the N = {export_n:,} catalog (budget = rows, no replacement), each run in a fresh subprocess, {machine}",
                  caption="previous: " + PATH_NOTES["previous"] + ". snapshot: " + PATH_NOTES["snapshot"] + " (the route's path).\n"
                          "rows/s: manifest -> exporter -> file, untraced; snapshots built beforehand and, for the snapshot path, opened (mapped and\n"
                          "checked) before the clock starts ('open s'). RSS growth: peak of current RSS (polled every 5 ms) during the export minus\n"
                          "RSS at its start; anon: the same for anonymous pages (resident less file-backed: the snapshot's mapped pages are page cache).\n"
                          "arrow peak: pyarrow's allocator, likewise. tracemalloc peak: a second, traced run. ru_maxrss: high-water mark, imports included.\n"
                          "same bytes: the file is identical to the other path's.")
        for col in ("format", "rows", "path", "seconds", "rows/s", "vs previous", "open s", "file MiB", "same bytes", "RSS growth MiB", "anon growth MiB",
                    "arrow peak MiB", "tracemalloc peak MiB", "ru_maxrss before / after MiB"):
            e.add_column(col, justify="right")
        for (fmt, rows, path), r in export.items():
            prev = export[(fmt, rows, "previous")]
            other = export[(fmt, rows, "snapshot" if path == "previous" else "previous")]
            e.add_row(fmt, f"{rows:,}", path, f"{r['seconds']:.2f}", f"{rows / r['seconds']:,.0f}", f"{prev['seconds'] / r['seconds']:,.1f}x",
                      f"{r['open_s']:.2f}" if path == "snapshot" else "-", f"{r['bytes'] / MIB:,.1f}", "yes" if r["sha256"] == other["sha256"] else "NO",
                      f"{r['rss_growth'] / MIB:,.1f}", f"{r['anon_growth'] / MIB:,.1f}", f"{r['arrow_peak'] / MIB:,.1f}", f"{r['trace_peak'] / MIB:,.1f}",
                      f"{r['base_kib'] / 1024:,.0f} / {r['maxrss_kib'] / 1024:,.0f}")
        console.print(e)

    # ------------------------------------------------------------------- summary
    s = Table(title="summary")
    for col in ("benchmark", "figure", "target", "met?"):
        s.add_column(col)
    ok = True

    def verdict(cond: bool, *, checked: bool = True) -> str:
        nonlocal ok
        if not checked:
            return "(info)"
        ok &= cond
        return "met" if cond else "MISSED"

    if "latency" in sections:
        for b in budgets:
            r = latency[(G, hi, b)]
            ratio = r["naive_total_p50"] / r["p50"]
            s.add_row(f"naive (weights + choice) / run_query p50, N = {hi:,}, B = {b:,}", f"{ratio:,.1f}x", f">= {RATIO_TARGET:g}x" + ("" if full else " (at 10^7)"),
                      verdict(ratio >= RATIO_TARGET, checked=full))
            ratio = r["naive_p50"] / r["p50"]
            s.add_row(f"choice alone / run_query p50, N = {hi:,}, B = {b:,}", f"{ratio:,.1f}x", "(info)", verdict(ratio >= RATIO_TARGET, checked=False))
        for b in budgets:
            r = latency[(G, hi, b)]
            ratio = r["naive_p50"] / r["core_p50"]
            s.add_row(f"naive / sample_groups p50, N = {hi:,}, B = {b:,}", f"{ratio:,.1f}x", f">= {RATIO_TARGET:g}x (like for like)", verdict(ratio >= RATIO_TARGET, checked=False))
        for b in budgets:
            flat = latency[(G, hi, b)]["p50"] / latency[(G, lo, b)]["p50"]
            s.add_row(f"run_query p50, G = {G:,}, N = {hi:,} / N = {lo:,}, B = {b:,}", f"{flat:.2f}x", f"<= {FLAT_TARGET:g}x (flat in N)", verdict(flat <= FLAT_TARGET))
    if "huge" in sections:
        hlo, hhi = huge_sizes
        for b in budgets:
            a, z = latency[(huge_g, hlo, b)], latency[(huge_g, hhi, b)]
            flat = z["p50"] / a["p50"]
            s.add_row(f"run_query p50, G = {huge_g:,}, N = {fmt_n(hhi)} / N = {fmt_n(hlo)}, B = {b:,}", f"{fmt_ms(z['p50'])} / {fmt_ms(a['p50'])} ms = {flat:.2f}x",
                      f"<= {FLAT_TARGET:g}x (flat in N)", verdict(flat <= FLAT_TARGET))
        a, z = memory[(huge_g, hlo)], memory[(huge_g, hhi)]
        ga, gz = a["growth"] / MIB, z["growth"] / MIB
        s.add_row(f"query process RSS growth, G = {huge_g:,}, N = {fmt_n(hhi)} vs N = {fmt_n(hlo)}", f"{gz:,.1f} vs {ga:,.1f} MiB (peak {z['peak'] / MIB:,.0f} vs {a['peak'] / MIB:,.0f} MiB)",
                  f"<= {MEMORY_GROWTH_TARGET:g}x or +{RSS_SLACK_MIB:g} MiB (O(G), not O(N))", verdict(gz <= max(ga * MEMORY_GROWTH_TARGET, ga + RSS_SLACK_MIB)))
        s.add_row(f"  vs the naive per-sample weights at N = {fmt_n(hhi)}", f"{gz:,.1f} MiB vs {8 * hhi / MIB:,.0f} MiB", "(info)", verdict(True, checked=False))
    if export:
        small, big = export_rows
        for fmt in FORMATS:
            z = export[(fmt, big, "snapshot")]
            rate = big / z["seconds"]
            s.add_row(f"{fmt} export, {big:,} rows, snapshot path", f"{rate:,.0f} rows/s", f">= {SNAPSHOT_RATE_TARGET:,} rows/s" + ("" if full else " (at 10^6 rows)"),
                      verdict(rate >= SNAPSHOT_RATE_TARGET, checked=full))
            p = export[(fmt, big, "previous")]
            s.add_row(f"{fmt} export, {big:,} rows, previous path", f"{big / p['seconds']:,.0f} rows/s (snapshot {p['seconds'] / z['seconds']:,.1f}x faster)",
                      f">= {EXPORT_RATE_BAR:,} rows/s (the previous bar)", verdict(big / p["seconds"] >= EXPORT_RATE_BAR, checked=False))
        for fmt in FORMATS:
            for path in PATHS:
                a, z = export[(fmt, small, path)], export[(fmt, big, path)]
                growth = z["trace_peak"] / a["trace_peak"]
                s.add_row(f"{fmt} {path}: tracemalloc peak, {big:,} vs {small:,} rows", f"{z['trace_peak'] / MIB:,.1f} vs {a['trace_peak'] / MIB:,.1f} MiB ({growth:.2f}x)",
                          f"<= {MEMORY_GROWTH_TARGET:g}x or +{TRACE_SLACK_MIB:g} MiB",
                          verdict(z["trace_peak"] <= max(a["trace_peak"] * MEMORY_GROWTH_TARGET, a["trace_peak"] + TRACE_SLACK_MIB * MIB)))
                ra, rz = a["anon_growth"] / MIB, z["anon_growth"] / MIB
                s.add_row(f"{fmt} {path}: anon RSS growth, {big:,} vs {small:,} rows", f"{rz:,.1f} vs {ra:,.1f} MiB",
                          f"<= {MEMORY_GROWTH_TARGET:g}x or +{RSS_SLACK_MIB:g} MiB", verdict(rz <= max(ra * MEMORY_GROWTH_TARGET, ra + RSS_SLACK_MIB)))
                ra, rz = a["rss_growth"] / MIB, z["rss_growth"] / MIB
                s.add_row(f"{fmt} {path}: all-resident RSS growth (mapped pages included), {big:,} vs {small:,} rows", f"{rz:,.1f} vs {ra:,.1f} MiB",
                          f"<= {MEMORY_GROWTH_TARGET:g}x or +{RSS_SLACK_MIB:g} MiB", verdict(rz <= max(ra * MEMORY_GROWTH_TARGET, ra + RSS_SLACK_MIB), checked=False))
                aa, az = a["arrow_peak"] / MIB, z["arrow_peak"] / MIB
                s.add_row(f"{fmt} {path}: pyarrow allocator peak, {big:,} vs {small:,} rows", f"{az:,.1f} vs {aa:,.1f} MiB",
                          f"<= {MEMORY_GROWTH_TARGET:g}x or +{RSS_SLACK_MIB:g} MiB", verdict(az <= max(aa * MEMORY_GROWTH_TARGET, aa + RSS_SLACK_MIB), checked=False))
        same = all(export[(fmt, rows, "previous")]["sha256"] == export[(fmt, rows, "snapshot")]["sha256"] for fmt in FORMATS for rows in export_rows)
        s.add_row("snapshot path writes the previous path's bytes (every format and size)", "yes" if same else "NO", "same bytes", verdict(same))
    console.print(s)
    console.print(f"total {total:,.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
