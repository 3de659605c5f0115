"""Load: concurrent clients sending queries and downloading manifests, server mode on PostgreSQL.

    .venv/bin/python -m benchmarks.load [--clients 32] [--seconds 60] [--api-workers 2]

Starts a throw-away PostgreSQL and Redis on free loopback ports (``tests/services.sh``,
installed with apt-get when missing), migrates a catalog there and fills it with a
synthetic indexed catalog (10 datasets x 10 clusters x 10 labels, 100,000 samples with
their rows), creates a ``client`` API key, and starts ``nds serve --workers N`` on
127.0.0.1. Then one client alone for ``--solo-seconds`` (the latency a user sees), and
``--clients`` asyncio clients, each in a loop for ``--seconds``: ``POST /v1/queries``
(budget 1,000, a fresh seed, every rotation expert scored) and
``GET /v1/queries/{id}/manifest?format=csv``, read to the end. Every request is timed;
anything but 201/200 (or a transport error) counts as an error.

Both manifest paths run in the same run on the same catalog, each on a fresh ``nds serve``:
the columnar snapshots (the default) and the previous path (``NDS_MANIFEST_SNAPSHOTS=false``:
SQL lookups and a Python object per row), unless ``--no-previous``. A first query and
manifest before each is not counted (a snapshot is built on first use when missing). A table
of requests/s, p50/p99 and errors per kind and phase is printed, with the targets (snapshot
path): a 1,000-row manifest alone under 10 ms p50; 32 clients at 150 requests/s or more,
query p99 under 500 ms, 0 errors. The exit status is 1 if there was any error. Everything it
started is stopped by PID at the end. Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "tests" / "services.sh"


def build_catalog(settings, n: int) -> tuple[dict[str, float], str]:  # noqa: ANN001 - Settings
    from nds.catalog import access
    from nds.catalog.context import CatalogContext
    from nds.catalog.db import session_scope, upgrade
    from nds.samples.synthetic import add_indexed_dataset

    upgrade(settings)
    rng = np.random.default_rng(0)
    labels = [f"class{j}" for j in range(10)]
    per = n // 1000
    scores: dict[str, float] = {}
    with CatalogContext.open(settings) as ctx:
        for d in range(10):
            sizes = rng.integers(max(1, per // 2), per * 3 // 2 + 1, size=(10, 10))
            ds = add_indexed_dataset(ctx, f"load{d}", clusters=10, labels=labels, sizes=sizes)
            scores.update({str(e): float(rng.uniform(0.25, 0.9)) for e in ds.expert_ids.values()})
        with session_scope(ctx.engine) as session:
            _, key = access.create_key(session=session, name="load", role="client")
    return scores, key


async def run_clients(url: str, key: str, scores: dict[str, float], *, clients: int, seconds: float, budget: int,
                      at_least: int = 0) -> dict[str, list]:
    import httpx

    results: dict[str, list] = {"query": [], "manifest": [], "errors": []}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=limits) as http:

        async def one(k: int) -> None:
            i = 0
            while time.monotonic() < deadline or i < at_least:
                i += 1
                seed = k * 1_000_000 + i
                t = time.perf_counter()
                try:
                    r = await http.post("/v1/queries", json={"expert_scores": scores, "budget": budget, "seed": seed})
                except httpx.TransportError as exc:
                    results["errors"].append(f"query: {exc!r}")
                    continue
                results["query"].append(time.perf_counter() - t)
                if r.status_code != 201:
                    results["errors"].append(f"query: {r.status_code} {r.text[:200]}")
                    continue
                t = time.perf_counter()
                try:
                    async with http.stream("GET", f"/v1/queries/{r.json()['id']}/manifest", params={"format": "csv"}) as m:
                        size = 0
                        async for chunk in m.aiter_bytes():
                            size += len(chunk)
                except httpx.TransportError as exc:
                    results["errors"].append(f"manifest: {exc!r}")
                    continue
                results["manifest"].append(time.perf_counter() - t)
                if m.status_code != 200 or size == 0:
                    results["errors"].append(f"manifest: {m.status_code}")

        await asyncio.gather(*(one(k) for k in range(clients)))
    return results


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of this process (the clients), of nds serve and its
    worker processes, and of PostgreSQL's processes, read from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        procs[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    out = {"clients": 0.0, "nds serve": 0.0, "PostgreSQL": 0.0}
    for pid, (ppid, cpu, cmd) in procs.items():
        chain, up = {pid}, ppid
        while up in procs and up not in chain:
            chain.add(up)
            up = procs[up][0]
        if pid == os.getpid():
            out["clients"] += cpu
        elif server_pid in chain:
            out["nds serve"] += cpu
        elif "postgres" in cmd:
            out["PostgreSQL"] += cpu
    return out


PATHS = (("snapshot", "true", "manifests from the index versions' columnar snapshots"),
         ("previous (SQL)", "false", "NDS_MANIFEST_SNAPSHOTS=false: resolved with SQL row by row, as before"))


def measure(base_env: dict[str, str], work: Path, key: str, scores: dict[str, float], snapshots: str, args: argparse.Namespace,
            console) -> dict:  # noqa: ANN001 - a rich Console
    """Start nds serve with NDS_MANIFEST_SNAPSHOTS=``snapshots``; one client alone, then the crowd; stop it."""
    from nds.api.local_server import LocalServer

    env = {**base_env, "NDS_MANIFEST_SNAPSHOTS": snapshots}
    server = LocalServer(env, work / f"serve-{snapshots}.log", args=["--workers", str(args.api_workers), "--log-level", "warning"]).start()
    try:
        # a first query and manifest (not counted): a snapshot a version lacks is built on first use
        asyncio.run(run_clients(server.url, key, scores, clients=1, seconds=0.0, budget=args.budget, at_least=1))
        solo = asyncio.run(run_clients(server.url, key, scores, clients=1, seconds=args.solo_seconds, budget=args.budget))
        console.log(f"NDS_MANIFEST_SNAPSHOTS={snapshots}: {args.clients} clients for {args.seconds:.0f} s")
        load0 = os.getloadavg()[0]
        cpu0 = cpu_seconds(server.proc.pid)
        t = time.perf_counter()
        crowd = asyncio.run(run_clients(server.url, key, scores, clients=args.clients, seconds=args.seconds, budget=args.budget))
        wall = time.perf_counter() - t
        cpu = {k: v - cpu0[k] for k, v in cpu_seconds(server.proc.pid).items()}
        return {"solo": solo, "crowd": crowd, "wall": wall, "load": (load0, os.getloadavg()[0]), "cpu": cpu, "log": server.output()[-3000:]}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from nds.catalog.settings import load_settings
    from tests.services import Services

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--solo-seconds", type=float, default=15.0, help="seconds of one client alone before the crowd")
    parser.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes of nds serve")
    parser.add_argument("--samples", type=int, default=100_000, help="indexed samples in the synthetic catalog")
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--no-previous", action="store_true", help="skip the previous (SQL) path")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)

    subprocess.run(["bash", str(SERVICES), "install"], check=True)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="nds-load-") as tmp:
        work = Path(tmp)
        (work / "services").mkdir()
        subprocess.run(["bash", str(SERVICES), "start", str(work / "services")], check=True)
        try:
            services = Services.from_dir(work / "services")
            settings = load_settings(home=work / "home", database_url=services.database_url,
                                     broker_url=services.broker_url, qdrant_url=None, data_roots=[work])
            t = time.perf_counter()
            scores, key = build_catalog(settings, args.samples)
            console.log(f"catalog of {args.samples:,} samples in PostgreSQL built in {time.perf_counter() - t:.0f} s")
            env = {**os.environ, "NDS_HOME": str(settings.home), "NDS_DATABASE_URL": settings.database_url,
                   "NDS_BROKER_URL": settings.broker_url, "NDS_DATA_ROOTS": str(work), "NDS_QDRANT_URL": ""}
            for name, flag, _ in PATHS[:1] if args.no_previous else PATHS:
                runs[name] = measure(env, work, key, scores, flag, args, console)
        finally:
            subprocess.run(["bash", str(SERVICES), "stop", str(work / "services")], check=False)

    table = Table(title=f"load: 1 client x {args.solo_seconds:.0f} s, then {args.clients} clients x {args.seconds:.0f} s, against "
                        f"nds serve --workers {args.api_workers} (server mode, PostgreSQL), on {platform.machine()} with {os.cpu_count()} cores")
    for col in ("manifests from", "clients", "request", "count", "per second", "p50 ms", "p99 ms", "errors"):
        table.add_column(col, justify="left" if col in ("manifests from", "request") else "right")
    labels = (("query", f"POST /v1/queries (budget {args.budget:,})"), ("manifest", "GET .../manifest?format=csv"))
    failed = False
    for name, run in runs.items():
        for phase, clients, wall in (("solo", 1, args.solo_seconds), ("crowd", args.clients, run["wall"])):
            results = run[phase]
            total = 0
            for kind, label in labels:
                times = np.array(results[kind]) * 1000
                total += len(times)
                if len(times):
                    table.add_row(name, str(clients), label, f"{len(times):,}", f"{len(times) / wall:,.1f}", f"{np.percentile(times, 50):.1f}",
                                  f"{np.percentile(times, 99):.1f}", "")
            table.add_row(name, str(clients), "all", f"{total:,}", f"{total / wall:,.1f}", "", "", str(len(results["errors"])))
            failed |= bool(results["errors"])
        table.add_section()
    snap = runs["snapshot"]
    solo_manifest = np.percentile(np.array(snap["solo"]["manifest"]) * 1000, 50)
    crowd = snap["crowd"]
    rate = (len(crowd["query"]) + len(crowd["manifest"])) / snap["wall"]
    p99 = np.percentile(np.array(crowd["query"]) * 1000, 99)
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    table.caption = (
        f"{args.samples:,} indexed samples in 1,000 groups; clients and server share the machine (load average "
        f"{snap['load'][0]:.1f} -> {snap['load'][1]:.1f}). Targets (snapshot path): 1,000-row manifest alone < 10 ms p50: "
        f"{solo_manifest:.1f} ms {met(solo_manifest < 10)}; {args.clients} clients >= 150 requests/s: {rate:.1f} {met(rate >= 150)}; "
        f"query p99 < 500 ms: {p99:.0f} ms {met(p99 < 500)}; 0 errors: {len(crowd['errors'])} {met(not crowd['errors'])}"
    )
    console.print(table)
    cpu_table = Table(title=f"where the CPU went while {args.clients} clients ran (CPU seconds per request; {os.cpu_count()} cores)")
    for col in ("manifests from", "requests", "clients", "nds serve", "PostgreSQL", "cores busy"):
        cpu_table.add_column(col, justify="left" if col == "manifests from" else "right")
    for name, run in runs.items():
        n = max(len(run["crowd"]["query"]) + len(run["crowd"]["manifest"]), 1)
        cpu = run["cpu"]
        cpu_table.add_row(name, f"{n:,}", *(f"{cpu[k] / n * 1000:.1f} ms" for k in ("clients", "nds serve", "PostgreSQL")),
                          f"{sum(cpu.values()) / run['wall']:.2f}")
    console.print(cpu_table)
    for name, run in runs.items():
        errors = run["solo"]["errors"] + run["crowd"]["errors"]
        for e in errors[:10]:
            console.print(f"[red]{name}: {e}[/]", highlight=False)
        if errors:
            console.print(run["log"], highlight=False)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
