"""One dataset indexed by one Celery worker and by two: the index job's graph over the workers.

Server mode for real: PostgreSQL and Redis on loopback (``tests/services.sh``), ``nds worker``
processes (``--concurrency 1``, one torch thread each, so the two cores are shared fairly),
one dataset of 10,000 images (digits and letters, 10 labels) registered and indexed with
K = 8. Prints the wall time with 1 and 2 workers side by side, which worker ran which task,
the measured cost of each kind of task, and, from those costs, the time on paper for a
1.28M-image dataset with K = 50 on N GPU workers (its GPU assumption stated beside it).

    .venv/bin/python -m benchmarks.scale_out            # 10,000 images, K = 8 (about 15 minutes here)
    .venv/bin/python -m benchmarks.scale_out --quick    # 1,000 images, K = 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "tests" / "services.sh"
RESULTS = ROOT / "benchmarks" / "results"

#: The on-paper estimate's assumption: how much faster one GPU worker runs a task than one core
#: of this machine does (embedding a batch, a training step of these narrow ResNets). Not
#: measured here (no GPU is lent to this project); a mid-range data-centre GPU runs small
#: convolutional networks at batch 64-256 one to two orders of magnitude faster than one CPU core.
GPU_SPEEDUP = 30.0


def _reset_schema(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def _start_workers(n: int, env: dict[str, str], logs: Path) -> list[subprocess.Popen]:
    nds = Path(sys.executable).with_name("nds")
    procs = []
    for i in range(n):
        log = (logs / f"worker-{n}-{i}.log").open("ab")
        procs.append(subprocess.Popen([str(nds), "worker", "--queues", "cpu,gpu", "--concurrency", "1", "--loglevel", "info"],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    time.sleep(3)
    return procs


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _wait(ctx, job_id: str, timeout: float) -> dict:  # noqa: ANN001 - a CatalogContext
    from sqlmodel import Session

    from nds.catalog.jobs import get_job
    from nds.catalog.task_graph import job_view

    deadline = time.monotonic() + timeout
    while True:
        with Session(ctx.engine) as session:
            view = job_view(session, get_job(session, job_id))
        if view.status.finished or time.monotonic() > deadline:
            return view.model_dump(mode="json")
        time.sleep(0.5)


def run_once(workers: int, *, services, data: Path, work: Path, clusters: int, epochs: int | None) -> dict:  # noqa: ANN001
    """Register and index the dataset on a fresh catalog with ``workers`` worker processes."""
    from nds.api.dispatch import CeleryDispatcher
    from nds.catalog.context import CatalogContext
    from nds.catalog.db import upgrade
    from nds.catalog.index_options import IndexRequest
    from nds.catalog.indexing import start_indexing
    from nds.catalog.jobs import submit_or_undo
    from nds.catalog.registration import RegistrationRequest, start_registration
    from nds.catalog.settings import load_settings

    _reset_schema(services.database_url)
    home = work / f"home-{workers}"
    settings = load_settings(home=home, database_url=services.database_url, broker_url=services.broker_url,
                             qdrant_url=None, data_roots=[data])
    upgrade(settings)
    env = {**os.environ, "NDS_HOME": str(home), "NDS_DATABASE_URL": services.database_url, "NDS_BROKER_URL": services.broker_url,
           "NDS_QDRANT_URL": "", "NDS_DATA_ROOTS": str(data), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NDS_SCAN_WORKERS": "1"}
    procs = _start_workers(workers, env, work)
    try:
        with CatalogContext.open(settings) as ctx:
            dispatcher = CeleryDispatcher(services.broker_url)
            t = time.perf_counter()
            dataset, job = start_registration(ctx, RegistrationRequest(name="bench", path=str(data / "ten-labels")))
            submit_or_undo(ctx, dispatcher, job)
            registered = _wait(ctx, job.id, 1800)
            register_s = time.perf_counter() - t
            if registered["status"] != "succeeded":
                raise SystemExit(f"registration failed: {registered['error']}")
            request = IndexRequest(clusters=clusters, **({"epochs": epochs} if epochs else {}))
            t = time.perf_counter()
            job = start_indexing(ctx, dataset.id, request)
            submit_or_undo(ctx, dispatcher, job)
            indexed = _wait(ctx, job.id, 7200)
            index_s = time.perf_counter() - t
            dispatcher.close()
            if indexed["status"] != "succeeded":
                raise SystemExit(f"indexing failed: {indexed['error']}")
            steps = _training_steps(ctx, job.id)
            for t in indexed["tasks"]:
                t["steps"] = steps.get(t["name"])
    finally:
        _stop_workers(procs)
    return {"workers": workers, "register_s": register_s, "index_s": index_s, "registration": registered, "index": indexed}


def _training_steps(ctx, job_id: str) -> dict[str, int]:  # noqa: ANN001 - a CatalogContext
    """Optimizer steps of each expert and classifier task: epochs x ceil(training images / batch)."""
    from sqlmodel import Session, select

    from nds.catalog.tables import JobTask

    out = {}
    with Session(ctx.engine) as session:
        for task in session.exec(select(JobTask).where(JobTask.job_id == job_id)).all():
            result = task.result or {}
            if "metrics" in result:
                cfg = result["meta"]["training_config"]
                out[task.name] = int(cfg["epochs"]) * -(-int(result["metrics"]["num_train"]) // int(cfg["batch_size"]))
    return out


def _stage(name: str) -> str:
    return name.partition(":")[0]


def report(runs: list[dict], *, images: int, clusters: int, console: Console) -> dict:
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    table = Table(title=f"indexing one dataset of {images:,} images, K = {clusters}, on Celery workers (--concurrency 1, one torch thread each; {machine})")
    for col in ("workers", "register s", "index s", "speed-up", "worker processes used", "tasks per worker"):
        table.add_column(col, justify="right" if col.endswith("s") or col == "speed-up" or col == "workers" else "left")
    base = runs[0]["index_s"]
    for run in runs:
        per_worker: dict[str, list[str]] = defaultdict(list)
        for t in run["index"]["tasks"]:
            per_worker[t["worker"]].append(t["name"])
        table.add_row(str(run["workers"]), f"{run['register_s']:.1f}", f"{run['index_s']:.1f}", f"{base / run['index_s']:.2f}x",
                      str(len(per_worker)), "; ".join(f"{w.split(':')[-1]}: {', '.join(n for n in names if _stage(n) in ('expert', 'classifier'))}"
                                                      for w, names in sorted(per_worker.items())))
    console.print(table)

    # per-task costs, measured on the one-worker run (nothing else running beside each task)
    costs: dict[str, list[float]] = defaultdict(list)
    steps: dict[str, int] = defaultdict(int)
    for t in runs[0]["index"]["tasks"]:
        costs[_stage(t["name"])].append(float(t["seconds"] or 0.0))
        steps[_stage(t["name"])] += t.get("steps") or 0
    tasks = Table(title="cost of each kind of task (the one-worker run: one core)")
    for col in ("task", "count", "mean s", "total s", "cost"):
        tasks.add_column(col, justify="left" if col == "task" else "right")
    per_image = {stage: sum(costs[stage]) / images for stage in ("embed", "partition", "commit")}
    per_step = {stage: sum(costs[stage]) / max(steps[stage], 1) for stage in ("expert", "classifier")}
    for stage in ("backbone", "embed", "partition", "expert", "classifier", "commit"):
        values = costs.get(stage, [])
        if not values:
            continue
        cost = (f"{per_image[stage] * 1000:.3f} ms/image" if stage in per_image else
                f"{per_step[stage] * 1000:.1f} ms/step ({steps[stage]:,} steps)" if stage in per_step else "once")
        tasks.add_row(stage, str(len(values)), f"{sum(values) / len(values):.2f}", f"{sum(values):.1f}", cost)
    console.print(tasks)

    # on paper: 1.28M images, K = 50, on N GPU workers, with the index request's defaults
    # (8 epochs, batch 64, 80% of each cluster trained on). Embedding and the commit scale with
    # the images; training with its steps; k-means (faiss, CPU) with images x K; the backbone
    # is trained once for the catalog. One task per worker at a time.
    from nds.catalog.index_options import IndexRequest
    from nds.catalog.model.training import TrainConfig

    big, k_big, chunk = 1_280_000, 50, 2048
    epochs, batch, train_share = IndexRequest().epochs, TrainConfig().batch_size, 1 - TrainConfig().holdout_fraction
    expert_steps = epochs * -(-round(big / k_big * train_share) // batch)
    classifier_steps = epochs * -(-round(big * train_share) // batch)
    embed_task_s = per_image["embed"] * chunk / GPU_SPEEDUP
    expert_task_s = per_step["expert"] * expert_steps / GPU_SPEEDUP
    classifier_s = per_step["classifier"] * classifier_steps / GPU_SPEEDUP
    partition_s = per_image["partition"] * big * (k_big / clusters)
    commit_s = per_image["commit"] * big
    backbone_s = sum(costs.get("backbone", [0.0]))
    paper = Table(title=f"on paper: {big:,} images, K = {k_big}, on N GPU workers (assumed: a GPU worker runs a task {GPU_SPEEDUP:g}x "
                        f"faster than one core here; not measured)")
    for col in ("N", "embed", "partition", "50 experts", "classifier", "commit", "total", "hours"):
        paper.add_column(col, justify="right")
    estimates = {}
    for n in (1, 2, 4, 8, 16, 51):
        embed = -(-(-(-big // chunk)) // n) * embed_task_s
        experts = -(-k_big // n) * expert_task_s
        learners = k_big * expert_task_s + classifier_s if n == 1 else max(classifier_s, -(-k_big // (n - 1)) * expert_task_s)
        total = backbone_s + embed + partition_s + learners + commit_s
        estimates[n] = round(total)
        paper.add_row(str(n), f"{embed:,.0f} s", f"{partition_s:,.0f} s", f"{experts:,.0f} s", f"{classifier_s:,.0f} s", f"{commit_s:,.0f} s",
                      f"{total:,.0f} s", f"{total / 3600:.1f}")
    paper.caption = (f"an expert is {expert_steps:,} steps, the classifier {classifier_steps:,} (every image): with N > 1 it runs on one "
                     "worker while the others share the experts, so it bounds the total; partition (k-means on the CPU, scaled "
                     "by images x K from the measured run: an upper bound) and commit run on one worker")
    console.print(paper)
    return {"machine": machine, "images": images, "clusters": clusters,
            "runs": [{k: v for k, v in r.items() if k in ("workers", "register_s", "index_s")} |
                     {"tasks": [{"name": t["name"], "worker": t["worker"], "seconds": t["seconds"]} for t in r["index"]["tasks"]]}
                     for r in runs],
            "per_image_s": per_image, "per_step_s": per_step, "gpu_speedup_assumed": GPU_SPEEDUP, "paper_seconds": estimates}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.indexing import write_dataset
    from tests.services import Services

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="images of the dataset (default 10,000; 1,000 with --quick)")
    parser.add_argument("--clusters", type=int, default=None, help="K (default 8; 4 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the index request's)")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    images = args.images or (1000 if args.quick else 10_000)
    clusters = args.clusters or (4 if args.quick else 8)
    console = Console(width=None if sys.stdout.isatty() else 170)

    subprocess.run(["bash", str(SERVICES), "install"], check=True)
    with tempfile.TemporaryDirectory(prefix="nds-scale-") as tmp:
        work = Path(tmp)
        (work / "services").mkdir()
        data = work / "data"
        made = write_dataset(data / "ten-labels", images)
        console.log(f"wrote {made['images']:,} images")
        subprocess.run(["bash", str(SERVICES), "start", str(work / "services")], check=True)
        try:
            services = Services.from_dir(work / "services")
            runs = []
            for n in [int(x) for x in args.workers.split(",")]:
                console.log(f"{n} worker(s): registering and indexing")
                runs.append(run_once(n, services=services, data=data, work=work, clusters=clusters, epochs=args.epochs))
                console.log(f"{n} worker(s): indexed in {runs[-1]['index_s']:.1f} s")
        finally:
            subprocess.run(["bash", str(SERVICES), "stop", str(work / "services")], check=False)
            logs = Path(os.environ.get("NDS_BENCH_LOGS", tempfile.gettempdir())) / "nds-scale-out-logs"
            logs.mkdir(parents=True, exist_ok=True)
            for log in work.glob("worker-*.log"):
                (logs / log.name).write_bytes(log.read_bytes())
    summary = report(runs, images=made["images"], clusters=clusters, console=console)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("scale_out-quick.json" if args.quick else "scale_out.json")).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
