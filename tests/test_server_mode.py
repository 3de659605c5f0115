"""Server mode end to end: PostgreSQL catalog, Redis broker, a real `nds worker` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from nds.api.local_server import LocalServer
from tests.conftest import LOOPBACK, wait_job, write_images
from tests.server_mode import server_env, server_home, server_settings, worker  # noqa: F401 - fixtures

pytestmark = pytest.mark.server


def test_api_registration_runs_on_the_celery_worker(server_settings, worker):
    from nds.api.app import create_app

    folder = write_images(server_settings.data_roots[0] / "src", n=6)
    with TestClient(create_app(server_settings), base_url=LOOPBACK) as api:
        assert api.get("/healthz").json()["mode"] == "server"
        resp = api.post("/v1/datasets", json={"name": "pg-src", "path": str(folder)})
        assert resp.status_code == 201, resp.text
        job = wait_job(api, resp.json()["job_id"])
        assert job["status"] == "succeeded", job
        ds = api.get(f"/v1/datasets/{resp.json()['id']}").json()
        assert (ds["status"], ds["num_samples"]) == ("ready", 12)
        assert api.post("/v1/datasets", json={"name": "pg-src", "path": str(folder)}).status_code == 409
        assert api.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert "nds.run_job" in worker.log.read_text()


def test_cli_in_server_mode_queues_on_the_worker(server_settings, worker):
    env = server_env(server_settings)
    nds_bin = os.path.join(os.path.dirname(sys.executable), "nds")
    folder = write_images(server_settings.data_roots[0] / "cli-src", n=3)
    done = subprocess.run([nds_bin, "datasets", "add", "cli-src", str(folder), "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_samples"] == 6
    listed = json.loads(subprocess.run([nds_bin, "datasets", "list", "--json"], env=env, capture_output=True, text=True).stdout)
    assert "cli-src" in [d["name"] for d in listed["data"]]
    subprocess.run([nds_bin, "datasets", "rm", "cli-src"], env=env, check=True, capture_output=True)


def test_bad_input_in_server_mode(server_settings, worker):
    from nds.api.app import create_app

    with TestClient(create_app(server_settings), base_url=LOOPBACK) as api:
        resp = api.post("/v1/datasets", json={"name": "x", "path": "/etc"})
        assert resp.status_code == 422 and resp.json()["field"] == "path"
        junk = server_settings.data_roots[0] / "junk" / "a"
        junk.mkdir(parents=True)
        (junk / "0.png").write_bytes(b"garbage")
        resp = api.post("/v1/datasets", json={"name": "junk", "path": str(junk.parent)})
        job = wait_job(api, resp.json()["job_id"])
        assert job["status"] == "failed" and "no readable images" in job["error"]
        assert "junk" not in [d["name"] for d in api.get("/v1/datasets").json()["data"]]


def test_a_transient_error_on_the_worker_is_retried_not_failed(server_settings, worker):
    """A job whose source is briefly unreachable (ServiceUnavailableError) goes back to the
    queue and succeeds on the Celery task's retry, instead of failing."""
    from sqlmodel import Session

    from nds.api.dispatch import CeleryDispatcher
    from nds.catalog.context import CatalogContext
    from nds.catalog.jobs import get_job, submit_or_undo
    from nds.catalog.registration import RegistrationRequest, start_registration
    from nds.catalog.tables import Dataset, JobTask
    from tests.flaky_source import MARKER

    folder = write_images(server_settings.data_roots[0] / "flaky", n=3)
    with CatalogContext.open(server_settings) as ctx:
        dataset, job = start_registration(ctx, RegistrationRequest(name="flaky", path=str(folder), source="tests.flaky_source:FlakySource"))
        (folder / MARKER).touch()  # the worker's first listing of the folder fails
        dispatcher = CeleryDispatcher(server_settings.broker_url)
        try:
            submit_or_undo(ctx, dispatcher, job)
        finally:
            dispatcher.close()
        deadline = time.monotonic() + 120
        while True:
            with Session(ctx.engine) as session:
                current = get_job(session, job.id)
                if current.status.value in ("succeeded", "failed") or time.monotonic() > deadline:
                    break
            time.sleep(0.1)
        assert current.status.value == "succeeded", (current.status, current.error)
        with Session(ctx.engine) as session:
            scan = session.get(JobTask, (job.id, "scan:0"))
        assert (scan.state, scan.attempts) == ("succeeded", 2)  # the scanning task was retried by Celery, not failed
        assert not (folder / MARKER).exists()
        with Session(ctx.engine) as session:
            stored = session.get(Dataset, dataset.id)
            assert (stored.status.value, stored.num_samples) == ("ready", 6)


def _tasks(api, job_id: str) -> dict[str, dict]:
    return {t["name"]: t for t in api.get(f"/v1/jobs/{job_id}").json()["tasks"]}


def _wait_tasks(api, job_id: str, ready, what: str, timeout: float = 240) -> dict[str, dict]:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        tasks = {t["name"]: t for t in job["tasks"]}
        if ready(tasks):
            return tasks
        time.sleep(0.05)
    raise AssertionError(f"never {what}: {job}")


def test_index_on_the_worker_survives_a_killed_worker(server_settings, worker):
    """SIGKILL the worker in the middle of an expert task; after a restart the job completes
    with exactly one artifact and one catalog row per expert, and only the killed task ran twice."""
    from sqlmodel import Session, select

    from nds.api.app import create_app
    from nds.catalog.context import CatalogContext
    from nds.catalog.tables import Expert

    folder = write_images(server_settings.data_roots[0] / "killme", n=40, size=32)
    with TestClient(create_app(server_settings), base_url=LOOPBACK) as api:
        created = api.post("/v1/datasets", json={"name": "killme", "path": str(folder)})
        assert wait_job(api, created.json()["job_id"])["status"] == "succeeded"
        did = created.json()["id"]
        resp = api.post(f"/v1/datasets/{did}/index", json={"clusters": 3, "epochs": 6, "image_size": 32, "width": 8, "min_steps": 60})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        tasks = _wait_tasks(api, job_id, lambda ts: any(t["state"] == "succeeded" for n, t in ts.items() if n.startswith("expert"))
                            and any(t["state"] == "running" and (n.startswith("expert") or n == "classifier") for n, t in ts.items()),
                            "reached the second expert")
        killed = next(n for n, t in tasks.items() if t["state"] == "running")
        worker.kill()
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # the crash left it running
        worker.start()
        job = wait_job(api, job_id, timeout=300)
        assert job["status"] == "succeeded", job
        tries = {t["name"]: t["attempts"] for t in job["tasks"]}
        assert tries[killed] == 2 and all(n == killed or a == 1 for n, a in tries.items()), tries
        num_clusters = len(job["result"]["clusters"])
        experts_dir = server_settings.artifacts_path / "experts" / str(did)
        files = sorted(p.name for p in experts_dir.iterdir())
        assert len(files) == num_clusters + 1 and all(f.endswith(".onnx") for f in files), files  # no temp files left
        ds = api.get(f"/v1/datasets/{did}").json()
        assert (ds["status"], ds["index_version"]) == ("indexed", 1)
    ctx = CatalogContext.open(server_settings)
    try:
        with Session(ctx.engine) as session:
            rows = session.exec(select(Expert).where(Expert.dataset_id == did)).all()
        assert sorted((e.kind.value, e.cluster) for e in rows) == [("classifier", None)] + [("rotation", k) for k in range(num_clusters)]
        assert sorted(ctx.artifacts.path(e.artifact).name for e in rows) == files
        assert not list((server_settings.artifacts_path / "jobs").glob(f"{job_id}/*"))
    finally:
        ctx.close()


def test_one_dataset_is_indexed_by_two_worker_processes(server_settings, server_home, worker):
    """The experts of one dataset's index job are trained side by side by two workers."""
    from nds.api.app import create_app
    from tests.server_mode import Worker, server_env

    second = Worker(env=server_env(server_settings), log=server_home / "worker-2.log")
    second.start()
    try:
        folder = write_images(server_settings.data_roots[0] / "two-workers", n=30, size=32)
        with TestClient(create_app(server_settings), base_url=LOOPBACK) as api:
            created = api.post("/v1/datasets", json={"name": "two-workers", "path": str(folder)})
            assert wait_job(api, created.json()["job_id"])["status"] == "succeeded"
            resp = api.post(f"/v1/datasets/{created.json()['id']}/index",
                            json={"clusters": 4, "epochs": 4, "image_size": 32, "width": 8, "min_steps": 40})
            job = wait_job(api, resp.json()["id"], timeout=300)
            assert job["status"] == "succeeded", job
            learners = [t for t in job["tasks"] if t["name"].startswith("expert") or t["name"] == "classifier"]
            assert len(learners) == 5 and all(t["state"] == "succeeded" for t in learners)
            workers = {t["worker"] for t in learners}
            assert len(workers) == 2, {t["name"]: t["worker"] for t in learners}  # both worker processes trained experts
        assert "nds.run_task" in (server_home / "worker-2.log").read_text()
    finally:
        second.stop()


def test_cancel_an_index_job_on_the_worker(server_settings, worker):
    """Cancel while an expert trains on the worker: the running task stops, the rest is revoked,
    and the dataset is left as it was (registered, not indexed)."""
    from nds.api.app import create_app

    folder = write_images(server_settings.data_roots[0] / "cancel-srv", n=30, size=32)
    with TestClient(create_app(server_settings), base_url=LOOPBACK) as api:
        created = api.post("/v1/datasets", json={"name": "cancel-srv", "path": str(folder)})
        assert wait_job(api, created.json()["job_id"])["status"] == "succeeded"
        did = created.json()["id"]
        resp = api.post(f"/v1/datasets/{did}/index", json={"clusters": 3, "epochs": 20, "image_size": 32, "width": 8, "min_steps": 400})
        job_id = resp.json()["id"]
        _wait_tasks(api, job_id, lambda ts: ts.get("expert:0", {}).get("state") == "running", "started an expert")
        cancelled = api.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        deadline = time.monotonic() + 60
        while any(t["state"] == "running" for t in _tasks(api, job_id).values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        tasks = _tasks(api, job_id)
        assert tasks["expert:0"]["state"] == "revoked" and tasks["commit"]["state"] == "revoked", tasks
        ds = api.get(f"/v1/datasets/{did}").json()
        assert (ds["status"], ds["index_version"]) == ("ready", 0)
        assert api.get("/v1/experts", params={"dataset": did}).json()["count"] == 0
        assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
        # and the dataset indexes again afterwards
        again = api.post(f"/v1/datasets/{did}/index", json={"clusters": 2, "epochs": 1, "image_size": 32, "width": 8, "min_steps": 5})
        assert wait_job(api, again.json()["id"], timeout=300)["status"] == "succeeded"


def test_redis_down_new_jobs_503_reads_served_then_recovers(services, server_settings, worker):
    """With the broker down the API refuses new jobs with a clear 503 (and stores nothing),
    keeps serving reads, and takes jobs again once Redis is back."""
    from nds.api.app import create_app

    folder = write_images(server_settings.data_roots[0] / "redis-src", n=3)
    with TestClient(create_app(server_settings), base_url=LOOPBACK) as api:
        before = api.get("/v1/datasets").json()["count"]
        services.stop_redis()
        try:
            refused = api.post("/v1/datasets", json={"name": "redis-src", "path": str(folder)})
            assert refused.status_code == 503, refused.text
            body = refused.json()
            assert "broker" in body["detail"] and "Redis" in body["hint"]
            listed = api.get("/v1/datasets")  # reads keep working
            assert listed.status_code == 200 and listed.json()["count"] == before  # nothing half-registered
            assert api.get("/healthz").status_code == 200
        finally:
            services.start_redis()
        deadline = time.monotonic() + 60
        while True:  # the API's broker connection comes back on the next try
            created = api.post("/v1/datasets", json={"name": "redis-src", "path": str(folder)})
            if created.status_code == 201 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert created.status_code == 201, created.text
        job = wait_job(api, created.json()["job_id"], timeout=120)  # and the worker reconnected to the new Redis
        assert job["status"] == "succeeded", job
        assert api.get(f"/v1/datasets/{created.json()['id']}").json()["num_samples"] == 6


def test_postgres_restart_under_load_fails_cleanly_then_recovers(services, server_settings, tmp_path):
    """A real `nds serve` in server mode under concurrent queries and reads while PostgreSQL
    restarts: every answer is a success or a JSON 503, never a 500, and it recovers."""
    import threading
    from collections import Counter

    import httpx

    from nds.catalog.context import CatalogContext
    from nds.samples.synthetic import add_indexed_dataset

    with CatalogContext.open(server_settings) as ctx:
        ds = add_indexed_dataset(ctx, "pg-load", clusters=3, labels=["x", "y"], samples_per_group=20)
    scores = {str(e): 0.4 + 0.1 * c for c, e in ds.expert_ids.items()}
    server = LocalServer(server_env(server_settings), tmp_path / "serve.log")
    url = server.url
    statuses: Counter = Counter()
    bad: list[str] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if i % 2:
                        r = http.post("/v1/queries", json={"expert_scores": scores, "budget": 50, "seed": seed * 10_000 + i})
                    else:
                        r = http.get("/v1/datasets")
                except httpx.TransportError as exc:
                    bad.append(f"transport error: {exc!r}")
                    continue
                statuses[r.status_code] += 1
                if r.status_code not in (200, 201, 503):
                    bad.append(f"{r.status_code}: {r.text[:200]}")
                elif r.status_code == 503 and "database" not in r.json()["detail"]:
                    bad.append(f"503 without saying why: {r.text[:200]}")

    try:
        server.start()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        served_before = sum(statuses.values())
        services.restart_postgres()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert served_before > 0 and sum(statuses.values()) > served_before
        assert not bad, (bad[:5], server.output()[-3000:])
        # after the restart every request succeeds again
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(10):
                assert http.get("/v1/datasets").status_code == 200
                assert http.post("/v1/queries", json={"expert_scores": scores, "budget": 50, "seed": i}).status_code == 201
        print(f"\nPostgreSQL restart under load: {dict(statuses)}")
    finally:
        stop.set()
        server.stop()
