"""Upsert 100,000 random points of dim 128 into a fresh embedded vector store, then search it.

    .venv/bin/python -m benchmarks.vectors [--points 100000] [--dim 128] [--naive-points 20000]

Times :class:`nds.catalog.vectors.EdgeVectorStore` (Qdrant Edge in-process, lock + open + close per
call) and, in the same run, qdrant-client's local mode (``QdrantClient(path=...)``, pure Python,
"the naive way"), limited to ``--naive-points`` because it is slow. Also reports what opening and
closing a shard costs, and search latency (p50 over 100 queries, k=10), per call and inside a
:meth:`~nds.catalog.vectors.EdgeVectorStore.session`. Target: the 100,000-point upsert under 5 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from nds.catalog.vectors import EdgeVectorStore

TARGET_S = 5.0
QUERIES = 100
K = 10


def points(n: int, dim: int, seed: int = 0) -> tuple[list[int], np.ndarray, list[dict]]:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    payloads = [{"dataset_id": i % 10, "label": f"class{i % 100}", "cluster_id": None} for i in range(n)]
    return list(range(n)), vectors, payloads


def p50_ms(call: Callable[[np.ndarray], object], queries: np.ndarray) -> float:
    times = []
    for query in queries:
        start = time.perf_counter()
        call(query)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def shard_open_close_ms(shard_dir: Path, repeats: int = 20) -> tuple[float, float]:
    from qdrant_edge import EdgeShard

    opens, closes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        shard = EdgeShard.load(str(shard_dir))
        opened = time.perf_counter()
        shard.close()
        opens.append(opened - start)
        closes.append(time.perf_counter() - opened)
    return statistics.median(opens) * 1000, statistics.median(closes) * 1000


def bench_edge(work: Path, n: int, dim: int, queries: np.ndarray) -> dict[str, float]:
    store = EdgeVectorStore(work / "edge")
    ids, vectors, payloads = points(n, dim)
    store.ensure_collection("bench", dim)
    start = time.perf_counter()
    store.upsert("bench", ids, vectors, payloads)
    seconds = time.perf_counter() - start
    if store.count("bench") != n:
        raise SystemExit("edge store lost points")
    small_ids, small_vectors, small_payloads = points(5_000, dim, seed=1)
    store.ensure_collection("small", dim)
    store.upsert("small", small_ids, small_vectors, small_payloads)
    out = {"seconds": seconds}
    out["open_ms"], out["close_ms"] = shard_open_close_ms(store.path / "bench")
    out["open_small_ms"], out["close_small_ms"] = shard_open_close_ms(store.path / "small")
    out["search_call_ms"] = p50_ms(lambda q: store.search("bench", q, K), queries)
    out["search_filtered_ms"] = p50_ms(lambda q: store.search("bench", q, K, dataset_ids=[3]), queries)
    out["search_small_ms"] = p50_ms(lambda q: store.search("small", q, K), queries)
    with store.session("bench"):
        out["search_session_ms"] = p50_ms(lambda q: store.search("bench", q, K), queries)
    store.close()
    return out


def bench_naive(work: Path, n: int, dim: int, queries: np.ndarray, batch: int = 1024) -> dict[str, float]:
    from qdrant_client import QdrantClient, models

    ids, vectors, payloads = points(n, dim)
    client = QdrantClient(path=str(work / "qdrant-local"))
    client.create_collection("bench", vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
    start = time.perf_counter()
    for lo in range(0, n, batch):
        hi = lo + batch
        client.upsert("bench", points=models.Batch(ids=ids[lo:hi], vectors=vectors[lo:hi].tolist(), payloads=payloads[lo:hi]))
    seconds = time.perf_counter() - start
    search_ms = p50_ms(lambda q: client.query_points("bench", query=q.tolist(), limit=K), queries)
    client.close()
    return {"seconds": seconds, "search_ms": search_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--naive-points", type=int, default=20_000)
    args = parser.parse_args(argv)
    queries = np.random.default_rng(42).standard_normal((QUERIES, args.dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        edge = bench_edge(work, args.points, args.dim, queries)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # local mode warns about large collections
            naive = bench_naive(work, args.naive_points, args.dim, queries)

    console = Console()
    title = f"vector upsert, dim {args.dim}, on {platform.machine()} with {os.cpu_count()} cores"
    table = Table(title=title)
    for col in ("backend", "points", "dim", "seconds", "points/s", f"target (<{TARGET_S:g} s for {args.points:,})"):
        table.add_column(col, justify="right" if col not in ("backend",) else "left")
    edge_rate = args.points / edge["seconds"]
    table.add_row(
        "EdgeVectorStore (Qdrant Edge)",
        f"{args.points:,}",
        str(args.dim),
        f"{edge['seconds']:.2f}",
        f"{edge_rate:,.0f}",
        "met" if edge["seconds"] < TARGET_S else "MISSED",
    )
    naive_rate = args.naive_points / naive["seconds"]
    table.add_row(
        "qdrant-client local mode (the naive way)",
        f"{args.naive_points:,}",
        str(args.dim),
        f"{naive['seconds']:.2f}",
        f"{naive_rate:,.0f}",
        f"~{args.points / naive_rate:.0f} s projected",
    )
    console.print(table)

    latency = Table(title=f"latency (median; search: {QUERIES} queries, k={K})")
    latency.add_column("what")
    latency.add_column("ms", justify="right")
    latency.add_row(f"open Qdrant Edge shard, {args.points:,} points", f"{edge['open_ms']:.1f}")
    latency.add_row(f"close Qdrant Edge shard, {args.points:,} points", f"{edge['close_ms']:.1f}")
    latency.add_row("open Qdrant Edge shard, 5,000 points", f"{edge['open_small_ms']:.1f}")
    latency.add_row("close Qdrant Edge shard, 5,000 points", f"{edge['close_small_ms']:.1f}")
    latency.add_row(f"search p50, EdgeVectorStore, {args.points:,} points (lock+open+close per call)", f"{edge['search_call_ms']:.1f}")
    latency.add_row("search p50, same, dataset_ids=[3] filter", f"{edge['search_filtered_ms']:.1f}")
    latency.add_row(f"search p50, EdgeVectorStore inside session(), {args.points:,} points", f"{edge['search_session_ms']:.1f}")
    latency.add_row("search p50, EdgeVectorStore, 5,000 points (per call)", f"{edge['search_small_ms']:.1f}")
    latency.add_row(f"search p50, qdrant-client local mode, {args.naive_points:,} points", f"{naive['search_ms']:.1f}")
    console.print(latency)
    return 0 if edge["seconds"] < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
