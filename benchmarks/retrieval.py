"""Weighted retrieval: query latency as N grows, next to numpy.random.choice over per-sample weights; manifest export.

    .venv/bin/python -m benchmarks.retrieval [--quick] [--repeats 20] [--samples-at-max]

For N = 10^5, 10^6 and 10^7 indexed samples (synthetic catalog rows: 10 datasets x 10
clusters x 10 labels = 1,000 groups of random sizes summing to N, random rotation-expert
scores) it times :func:`nds.catalog.retrieval.queries.run_query`, the whole server-side query
(validation, group reads, weights, O(G + B) sampling, summary, storing the picks and the
query row), for budgets 10^4 and 10^5, ~20 seeds each, p50 and p95, in interleaved rounds
(every N and B once per round, so a noisy neighbour slows all sizes alike). In the same run it
times the original service's way, ``numpy.random.choice(N, B, p=w)`` over the per-sample
weight vector ``w = np.repeat(mass / size, size)`` built from the same group masses: the
naive figure is building ``w`` (the original rebuilt it for every query, since it depends
on the scores; timed once per N) plus the choice call (timed per seed); the choice call
alone is shown too. Queries run back to back, as a server runs them: no forced garbage
collection between them (a ``gc.collect()`` before each one, as earlier versions of this
benchmark did, leaves the caches cold and adds about 1.8 ms to every query). Targets:
naive / ours >= 50x at N = 10^7, and our p50 flat in N (p50 at the largest N within 1.5x of
the p50 at the smallest). ``sample_groups`` alone (group masses ->
picks, the like-for-like counterpart of the choice call) and each stage of ``run_query`` are
timed too, to show where the time goes. One size also goes through HTTP (POST /v1/queries,
FastAPI TestClient) to show the overhead.

Then a manifest of 10^6 rows (budget 10^6 without replacement over the 10^6-sample catalog:
every sample once) and one of 10^5 rows are streamed through the csv and parquet exporters
into files as the manifest route does (iter_manifest -> ManifestRow.as_dict -> exporter.stream),
each export in a fresh subprocess: rows/s, the growth of the current RSS during the export
(polled every 5 ms; ru_maxrss is shown too, but its high-water mark is usually set by the
imports) in one subprocess, the tracemalloc peak in another (tracemalloc slows Python down,
so it never shares a run with the timing). Targets: peak memory must not grow with the row
count (10x the rows: tracemalloc peak within 1.25x; RSS growth within 1.25x or 8 MiB), and
>= 20,000 rows/s.

``--quick``: N = 10^5 and 10^6 (the latter without sample rows), 5 seeds, exports of 10^4 and
10^5 rows: a smoke run of a minute or so.
"""

from __future__ import annotations

import argparse
import gc
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
from rich.console import Console
from rich.table import Table

from nds.catalog.context import CatalogContext
from nds.catalog.db import session_scope, upgrade
from nds.catalog.retrieval.manifest import iter_manifest
from nds.catalog.retrieval.picks import open_picks, save_picks
from nds.catalog.retrieval.queries import build_groups, get_query, run_query, summarize
from nds.catalog.retrieval.request import QueryRequest
from nds.catalog.retrieval.sampling import sample_groups
from nds.catalog.retrieval.weights import GroupTable
from nds.catalog.settings import Settings, load_settings
from nds.samples.synthetic import add_indexed_dataset

DATASETS, CLUSTERS, LABELS = 10, 10, 10
RATIO_TARGET = 50.0
FLAT_TARGET = 1.5
MEMORY_GROWTH_TARGET = 1.25
RSS_SLACK_MIB = 8.0
EXPORT_RATE_BAR = 20_000  # rows/s below which the export counts as slow
FORMATS = ("csv", "parquet")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- catalog


def group_sizes(n: int, rng: np.random.Generator) -> np.ndarray:
    """DATASETS x CLUSTERS x LABELS random-ish sizes (log-normal shares), each >= 1, summing to n exactly."""
    g = DATASETS * CLUSTERS * LABELS
    share = rng.lognormal(0.0, 0.6, g)
    raw = share / share.sum() * (n - g)
    sizes = np.floor(raw).astype(np.int64)
    rest = (n - g) - int(sizes.sum())
    sizes[np.argsort(raw - sizes)[::-1][:rest]] += 1  # largest remainders
    sizes += 1
    assert int(sizes.sum()) == n
    return sizes.reshape(DATASETS, CLUSTERS, LABELS)


def settings_for(home: Path) -> Settings:
    return load_settings(home=home, database_url=None, broker_url=None, qdrant_url=None, data_roots=[home])


@dataclass
class Catalog:
    settings: Settings
    ctx: CatalogContext
    scores: dict[int, float]
    n: int
    with_samples: bool
    build_s: float
    table: GroupTable | None = None  # the group table of these scores, for timing sample_groups alone
    unique: dict[int, list[int]] = field(default_factory=dict)  # budget -> unique samples picked per query


def build_catalog(home: Path, n: int, *, with_samples: bool, seed: int = 0) -> Catalog:
    settings = settings_for(home)
    upgrade(settings)
    ctx = CatalogContext.open(settings)
    rng = np.random.default_rng(seed)
    sizes = group_sizes(n, rng)
    labels = [f"class{j}" for j in range(LABELS)]
    start = time.perf_counter()
    scores: dict[int, float] = {}
    for d in range(DATASETS):
        ds = add_indexed_dataset(ctx, f"synth{d}", clusters=CLUSTERS, labels=labels, sizes=sizes[d], with_samples=with_samples)
        for expert_id in ds.expert_ids.values():
            scores[expert_id] = float(rng.uniform(0.25, 0.9))  # rotation accuracies: chance is 0.25
    return Catalog(settings, ctx, scores, n, with_samples, time.perf_counter() - start)


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


def time_stages(cat: Catalog, budget: int, repeats: int) -> dict[str, float]:
    """run_query's stages one by one (same calls, same order), p50 ms each: where the time goes."""
    from nds.catalog.retrieval.queries import _request_json
    from nds.catalog.retrieval.request import validate_request
    from nds.catalog.tables import Query

    stages: dict[str, list[float]] = {k: [] for k in ("validate + read groups + weights", "sample_groups (O(G+B))", "summarize", "save_picks (raw picks file)", "store query row")}
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


# --------------------------------------------------------------------------- export (one subprocess per run)


class RssSampler:
    """Current RSS (Linux /proc/self/statm) polled every few ms on a thread: the peak during a block, minus RSS at its start."""

    def __init__(self, every_s: float = 0.005) -> None:
        import threading

        self.every_s = every_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self.page
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


WARM_ROW = {"key": "w/1", "uri": "/w/1.png", "label": "w", "dataset": "w", "cluster": 0, "weight": 1.0, "count": 1}


def export_worker(home: str, query_id: str, fmt: str, out: str, trace: bool) -> dict:
    """Stream a query's manifest through an exporter into a file, as the manifest route does."""
    settings = settings_for(Path(home))
    ctx = CatalogContext.open(settings)
    exporter = ctx.exporters.get(fmt)()  # imports the plugin (pyarrow for parquet) before the baseline
    for _ in ctx.exporters.get(fmt)().stream([[WARM_ROW]]):  # and whatever it imports lazily on first use
        pass
    with session_scope(ctx.engine) as session:
        query = get_query(session=session, query_id=query_id)
    for _ in iter_manifest(ctx, query, limit=1):  # SQL compiled once, outside the measurement
        pass
    gc.collect()
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trace:
        tracemalloc.start()
    rows = 0

    def chunks():
        nonlocal rows
        for chunk in iter_manifest(ctx, query):
            rows += len(chunk)
            yield [r.as_dict() for r in chunk]

    start = time.perf_counter()
    written = 0
    with RssSampler() as rss, open(out, "wb") as fh:
        for part in exporter.stream(chunks()):
            fh.write(part)
            written += len(part)
    seconds = time.perf_counter() - start
    result = {"rows": rows, "seconds": seconds, "bytes": written, "base_kib": base_kib,
              "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "rss_growth": rss.peak - rss.start}
    if trace:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result["trace_peak"] = peak
    ctx.close()
    return result


def run_export(home: Path, query_id: str, fmt: str, out: Path, *, trace: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.retrieval", "--export-worker", str(home), query_id, fmt, str(out)] + (["--trace"] if trace else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"export worker failed:\n{proc.stderr}")
    out.unlink(missing_ok=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:,.1f}" if ms < 100 else f"{ms:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N up to 10^6, 5 seeds, exports of 10^4 and 10^5 rows")
    parser.add_argument("--repeats", type=int, default=None, help="seeds per (N, budget) for our query (default 20, 5 with --quick)")
    parser.add_argument("--naive-repeats", type=int, default=5)
    parser.add_argument("--samples-at-max", action="store_true", help="also build the sample rows of the largest N (10^7: a few minutes, a few GB)")
    parser.add_argument("--export-worker", nargs=4, metavar=("HOME", "QUERY", "FORMAT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export_worker:
        print(json.dumps(export_worker(*args.export_worker, trace=args.trace)))
        return 0

    sizes = (10**5, 10**6) if args.quick else (10**5, 10**6, 10**7)
    budgets = (10**4, 10**5)
    repeats = args.repeats or (5 if args.quick else 20)
    export_rows = (10**4, 10**5) if args.quick else (10**5, 10**6)
    export_n = 10**5 if args.quick else 10**6  # the catalog the manifests come from
    http_n = export_n
    lo, hi = sizes[0], sizes[-1]
    console = Console()
    t_all = time.perf_counter()

    latency: dict[tuple[int, int], dict[str, float]] = {}
    builds: dict[int, tuple[float, bool]] = {}
    w_build: dict[int, float] = {}
    stages: dict[int, dict[str, float]] = {}
    http: dict[str, float] = {}
    export: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="nds-bench-retrieval-") as tmp:
        work = Path(tmp)
        cats: dict[int, Catalog] = {}
        weights: dict[int, np.ndarray] = {}
        for n in sizes:
            with_samples = n <= export_n or (args.samples_at_max and n == hi)
            console.log(f"N = {n:,}: building the catalog ({'with' if with_samples else 'without'} sample rows)")
            cats[n] = build_catalog(work / f"home-{n}", n, with_samples=with_samples)
            builds[n] = (cats[n].build_s, with_samples)
            weights[n], w_build[n] = naive_weights(cats[n])

        # Interleaved rounds (every N and B once per round) so that a noisy neighbour hits all sizes alike.
        console.log(f"latency: {repeats} rounds of run_query and sample_groups, numpy.random.choice in the first {args.naive_repeats}")
        ours: dict[tuple[int, int], list[float]] = {(n, b): [] for n in sizes for b in budgets}
        core: dict[tuple[int, int], list[float]] = {(n, b): [] for n in sizes for b in budgets}
        naive: dict[tuple[int, int], list[float]] = {(n, b): [] for n in sizes for b in budgets}
        for n in sizes:
            for b in budgets:
                time_ours(cats[n], b, 0)  # warm-up query, not counted
        for rnd in range(repeats):
            for n in sizes:
                for b in budgets:
                    ours[(n, b)] += time_ours(cats[n], b, 1, seed=rnd, warm=False)
                    core[(n, b)] += time_core(cats[n], b, 1, seed=rnd)
                    if rnd < args.naive_repeats:
                        naive[(n, b)] += time_naive(weights[n], b, 1, seed=rnd)
        for key in ours:
            latency[key] = {"unique": statistics.mean(cats[key[0]].unique[key[1]]), "p50": pct(ours[key], 50), "p95": pct(ours[key], 95), "core_p50": pct(core[key], 50),
                            "naive_p50": pct(naive[key], 50), "naive_p95": pct(naive[key], 95),
                            "naive_total_p50": pct(naive[key], 50) + w_build[key[0]]}
        weights.clear()
        for b in budgets:
            stages[b] = time_stages(cats[hi], b, repeats)
        console.log(f"N = {http_n:,}: POST /v1/queries through TestClient")
        h = time_http(cats[http_n], budgets[0], repeats)
        http = {"p50": pct(h, 50), "p95": pct(h, 95)}

        cat = cats[export_n]
        ids = {}
        for rows in export_rows:
            q = run_query(cat.ctx, QueryRequest(expert_scores=cat.scores, budget=rows, replacement=False, seed=1))
            assert q.summary["unique_samples"] == rows, q.summary["unique_samples"]
            ids[rows] = q.id
        for c in cats.values():
            c.ctx.close()
        for fmt in FORMATS:
            for rows in export_rows:
                console.log(f"export {rows:,} rows as {fmt} (fresh subprocesses: timing + RSS, then tracemalloc)")
                timed = run_export(work / f"home-{export_n}", ids[rows], fmt, work / f"m.{fmt}", trace=False)
                traced = run_export(work / f"home-{export_n}", ids[rows], fmt, work / f"m.{fmt}", trace=True)
                assert timed["rows"] == traced["rows"] == rows
                export[(fmt, rows)] = {**timed, "trace_peak": traced["trace_peak"], "trace_seconds": traced["seconds"]}
    total = time.perf_counter() - t_all

    # ------------------------------------------------------------------- tables
    sample_note = "; ".join(f"N = {n:,}: {'yes' if ws else 'no (groups and experts only)'}" for n, (_, ws) in builds.items())
    t = Table(title=f"query latency, G = {DATASETS * CLUSTERS * LABELS:,} groups, {repeats} seeds, on {platform.machine()} with {os.cpu_count()} cores",
              caption="ours: run_query in-process, the whole server-side query (validation, group reads, weights, sampling, summary,\n"
                      "picks file + query row stored), back to back after one warm-up. core: sample_groups alone (group masses -> picks).\n"
                      f"naive: the original service's per-query work: build the N per-sample weights w from the scores, then\n"
                      f"np.random.choice(N, B, p=w) ({args.naive_repeats} runs); 'choice' columns time the choice call alone.\n"
                      f"The query reads only groups and experts; sample rows in the catalog: {sample_note}.")
    for col in ("N", "B", "unique picks", "ours p50 ms", "ours p95 ms", "core p50 ms", "naive p50 ms", "choice p50 ms", "naive / ours", "choice / ours", "choice / core"):
        t.add_column(col, justify="right")
    for (n, b), r in latency.items():
        t.add_row(f"{n:,}", f"{b:,}", f"{r['unique']:,.0f}", fmt_ms(r["p50"]), fmt_ms(r["p95"]), fmt_ms(r["core_p50"]), fmt_ms(r["naive_total_p50"]), fmt_ms(r["naive_p50"]),
                  f"{r['naive_total_p50'] / r['p50']:,.1f}x", f"{r['naive_p50'] / r['p50']:,.1f}x", f"{r['naive_p50'] / r['core_p50']:,.1f}x")
    console.print(t)

    side = Table(title="around the query")
    side.add_column("what")
    side.add_column("value", justify="right")
    for n, (secs, ws) in builds.items():
        side.add_row(f"build synthetic catalog N = {n:,} ({'groups + sample rows' if ws else 'groups only'})", f"{secs:,.1f} s")
    for n, secs in w_build.items():
        side.add_row(f"naive: build w = np.repeat(mass/size, size), N = {n:,} (part of 'naive' above)", f"{secs * 1000:,.1f} ms")
    if http:
        inproc = latency[(http_n, budgets[0])]
        side.add_row(f"POST /v1/queries via TestClient, N = {http_n:,}, B = {budgets[0]:,}: p50 / p95", f"{fmt_ms(http['p50'])} / {fmt_ms(http['p95'])} ms")
        side.add_row("  HTTP overhead over the in-process p50", f"{(http['p50'] - inproc['p50']) * 1000:+,.1f} ms")
    console.print(side)

    st = Table(title=f"where run_query's time goes, N = {hi:,} (its stages called one by one, p50 ms)")
    st.add_column("stage")
    for b in budgets:
        st.add_column(f"B = {b:,}", justify="right")
    for key in stages[budgets[0]]:
        st.add_row(key, *(f"{stages[b][key]:,.1f}" for b in budgets))
    st.add_row("sum", *(f"{sum(stages[b].values()):,.1f}" for b in budgets))
    console.print(st)

    if export:
        e = Table(title=f"manifest export from the N = {export_n:,} catalog (budget = rows, no replacement), each run in a fresh subprocess",
                  caption="rows/s: iter_manifest -> as_dict -> exporter.stream -> file, untraced. RSS growth: peak of current RSS (polled every 5 ms)\n"
                          "during the export minus RSS at its start. ru_maxrss: the process's high-water mark, imports included.\n"
                          "tracemalloc peak: a second, traced run, from the export's start (after plugin imports and a warm-up).")
        for col in ("format", "rows", "seconds", "rows/s", "file MiB", "RSS growth MiB", "ru_maxrss before / after MiB", "tracemalloc peak MiB"):
            e.add_column(col, justify="right")
        for (fmt, rows), r in export.items():
            e.add_row(fmt, f"{rows:,}", f"{r['seconds']:.1f}", f"{rows / r['seconds']:,.0f}", f"{r['bytes'] / 2**20:,.1f}", f"{r['rss_growth'] / 2**20:,.1f}",
                      f"{r['base_kib'] / 1024:,.0f} / {r['maxrss_kib'] / 1024:,.0f}", f"{r['trace_peak'] / 2**20:,.1f}")
        console.print(e)

    # ------------------------------------------------------------------- summary
    s = Table(title="summary")
    for col in ("benchmark", "figure", "target", "met?"):
        s.add_column(col)
    ok = True

    def verdict(cond: bool, *, checked: bool = True) -> str:
        nonlocal ok
        if not checked:
            return "yes (info)" if cond else "no (info)"
        ok &= cond
        return "yes" if cond else "NO"

    full = hi == 10**7
    for b in budgets:
        r = latency[(hi, b)]
        ratio = r["naive_total_p50"] / r["p50"]
        s.add_row(f"naive (weights + choice) / run_query p50, N = {hi:,}, B = {b:,}", f"{ratio:,.1f}x", f">= {RATIO_TARGET:g}x" + ("" if full else " (at 10^7)"), verdict(ratio >= RATIO_TARGET, checked=full))
        ratio = r["naive_p50"] / r["p50"]
        s.add_row(f"choice alone / run_query p50, N = {hi:,}, B = {b:,}", f"{ratio:,.1f}x", "(info)", verdict(ratio >= RATIO_TARGET, checked=False))
    for b in budgets:
        r = latency[(hi, b)]
        ratio = r["naive_p50"] / r["core_p50"]
        s.add_row(f"naive / sample_groups p50, N = {hi:,}, B = {b:,}", f"{ratio:,.1f}x", f">= {RATIO_TARGET:g}x (like for like)", verdict(ratio >= RATIO_TARGET, checked=False))
    for b in budgets:
        flat = latency[(hi, b)]["p50"] / latency[(lo, b)]["p50"]
        s.add_row(f"run_query p50, N = {hi:,} / N = {lo:,}, B = {b:,}", f"{flat:.2f}x", f"<= {FLAT_TARGET:g}x (flat in N)", verdict(flat <= FLAT_TARGET))
    if export:
        small, big = export_rows
        for fmt in FORMATS:
            a, z = export[(fmt, small)], export[(fmt, big)]
            rate = big / z["seconds"]
            s.add_row(f"{fmt} export, {big:,} rows", f"{rate:,.0f} rows/s", f">= {EXPORT_RATE_BAR:,} rows/s", verdict(rate >= EXPORT_RATE_BAR))
            growth = z["trace_peak"] / a["trace_peak"]
            s.add_row(f"{fmt} tracemalloc peak, {big:,} vs {small:,} rows", f"{z['trace_peak'] / 2**20:,.1f} vs {a['trace_peak'] / 2**20:,.1f} MiB ({growth:.2f}x)",
                      f"<= {MEMORY_GROWTH_TARGET:g}x", verdict(growth <= MEMORY_GROWTH_TARGET))
            ra, rz = a["rss_growth"] / 2**20, z["rss_growth"] / 2**20
            s.add_row(f"{fmt} RSS growth, {big:,} vs {small:,} rows", f"{rz:,.1f} vs {ra:,.1f} MiB",
                      f"<= {MEMORY_GROWTH_TARGET:g}x or +{RSS_SLACK_MIB:g} MiB", verdict(rz <= max(ra * MEMORY_GROWTH_TARGET, ra + RSS_SLACK_MIB)))
    console.print(s)
    console.print(f"total {total:,.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
