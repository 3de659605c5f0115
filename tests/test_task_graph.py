"""Index jobs as graphs of tasks, in-process (the embedded default runs the workers' graph):
the tasks and their joins, a failing expert task, cancel, a transient database error retried."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from nds.catalog import indexing
from nds.catalog.indexing import INDEX_GRAPH, IndexRequest, start_indexing
from nds.catalog.jobs import InlineDispatcher, cancel_job, get_job, run_job
from nds.catalog.registration import RegistrationRequest, start_registration
from nds.catalog.tables import Dataset, DatasetStatus, Expert, Job, JobStatus, JobTask, TaskState
from nds.catalog.task_graph import job_view, plan_graph, run_task
from nds.catalog.vectors import collection_name
from nds_client.errors import ConflictError, ServiceUnavailableError
from tests.conftest import LOOPBACK, write_images

pytestmark = pytest.mark.slow  # trains networks

SMALL = dict(image_size=32, epochs=1, width=8, min_steps=5)


def register(ctx, name, folder) -> int:
    dataset, job = start_registration(ctx, RegistrationRequest(name=name, path=str(folder)))
    InlineDispatcher(ctx).submit(job)
    return dataset.id


def tasks_of(ctx, job_id) -> dict[str, JobTask]:
    with Session(ctx.engine) as session:
        return {t.name: t for t in session.exec(select(JobTask).where(JobTask.job_id == job_id)).all()}


def dataset_row(ctx, did) -> Dataset:
    with Session(ctx.engine) as session:
        return session.get(Dataset, did)


def work_files(ctx, job_id) -> list[str]:
    return [o.key for o in ctx.artifacts.list_objects(f"jobs/{job_id}")]


def test_an_index_job_runs_as_its_graph_of_tasks(ctx, data_root, monkeypatch) -> None:
    monkeypatch.setattr(ctx.settings, "index_chunk_size", 16)  # 40 samples: 3 embedding chunks
    did = register(ctx, "graph", write_images(data_root / "graph", n=20))
    job = start_indexing(ctx, did, IndexRequest(**SMALL, clusters=3))
    InlineDispatcher(ctx).submit(job)
    tasks = tasks_of(ctx, job.id)
    assert sorted(tasks) == sorted(["backbone", "embed:0", "embed:1", "embed:2", "partition", "expert:0", "expert:1", "expert:2",
                                    "classifier", "commit"])
    assert {t.state for t in tasks.values()} == {TaskState.succeeded}
    assert all(t.attempts == 1 and t.worker and t.started_at and t.finished_at for t in tasks.values())
    assert tasks["partition"].after == ["embed:0", "embed:1", "embed:2"]
    assert sorted(tasks["commit"].after) == ["classifier", "expert:0", "expert:1", "expert:2"]
    assert sum(tasks[f"embed:{i}"].result["count"] for i in range(3)) == 40
    with Session(ctx.engine) as session:
        stored = get_job(session, job.id)
        view = job_view(session, stored)
        experts = session.exec(select(Expert).where(Expert.dataset_id == did)).all()
    assert (stored.status, stored.progress, stored.result["index_version"]) == (JobStatus.succeeded, 1.0, 1)
    assert [t.name for t in view.tasks][:2] == ["backbone", "classifier"] and all(t.seconds is not None for t in view.tasks)
    assert set(stored.result["seconds"]) == {"backbone", "embed", "partition", "expert", "classifier", "commit"}
    assert sorted((e.kind.value, e.cluster) for e in experts) == [("classifier", None), ("rotation", 0), ("rotation", 1), ("rotation", 2)]
    assert work_files(ctx, job.id) == []  # what the tasks handed each other is gone once committed
    assert [o.key.split("/")[1] for o in ctx.artifacts.list_objects("snapshots")] == [str(did)]  # written at the commit
    # a redelivered message of a task that ran does nothing more
    assert run_task(ctx, job.id, "expert:1", send=None) == TaskState.succeeded
    assert tasks_of(ctx, job.id)["expert:1"].attempts == 1


def test_the_rest_api_lists_the_tasks_and_cancels(ctx, data_root, api_settings_app) -> None:
    api, admin, client = api_settings_app
    did = register(ctx, "rest-graph", write_images(data_root / "rest-graph", n=8))
    job = start_indexing(ctx, did, IndexRequest(**SMALL, clusters=2))
    plan_graph(ctx, job, INDEX_GRAPH)  # planned, nothing run yet
    shown = api.get(f"/v1/jobs/{job.id}", headers=admin).json()
    assert {t["name"]: t["state"] for t in shown["tasks"]}["backbone"] == "queued"
    assert {t["state"] for t in shown["tasks"] if t["name"] != "backbone"} == {"pending"}
    assert api.post(f"/v1/jobs/{job.id}/cancel", headers=client).status_code == 403
    cancelled = api.post(f"/v1/jobs/{job.id}/cancel", headers=admin)
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["status"] == "cancelled" and {t["state"] for t in body["tasks"]} == {"revoked"}
    assert dataset_row(ctx, did).status == DatasetStatus.ready  # as before the job
    again = api.post(f"/v1/jobs/{job.id}/cancel", headers=admin)
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert api.post("/v1/jobs/nope/cancel", headers=admin).status_code == 404


@pytest.fixture
def api_settings_app(ctx, settings):
    from nds.api.app import create_app

    with TestClient(create_app(settings), base_url=LOOPBACK) as api:
        admin_key = api.post("/v1/keys", json={"name": "admin", "role": "admin"}).json()["key"]
        admin = {"Authorization": f"Bearer {admin_key}"}
        client_key = api.post("/v1/keys", json={"name": "client", "role": "client"}, headers=admin).json()["key"]
        yield api, admin, {"Authorization": f"Bearer {client_key}"}


def test_a_failing_expert_task_fails_the_job_and_the_previous_version_stays(ctx, data_root, monkeypatch) -> None:
    did = register(ctx, "fails", write_images(data_root / "fails", n=10))
    first = start_indexing(ctx, did, IndexRequest(**SMALL, clusters=2))
    InlineDispatcher(ctx).submit(first)
    before = dataset_row(ctx, did)
    assert (before.status, before.index_version) == (DatasetStatus.indexed, 1)
    real = indexing.train_and_export

    def broken(ctx_, **kwargs):
        if kwargs["cluster"] == 1:
            raise RuntimeError("the GPU fell off the bus")
        return real(ctx_, **kwargs)

    monkeypatch.setattr(indexing, "train_and_export", broken)
    job = start_indexing(ctx, did, IndexRequest(**SMALL, clusters=2, seed=7))
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        failed = get_job(session, job.id)
    assert failed.status == JobStatus.failed
    assert failed.error == "task expert:1: RuntimeError: the GPU fell off the bus"
    tasks = tasks_of(ctx, job.id)
    assert (tasks["expert:1"].state, tasks["expert:1"].error) == (TaskState.failed, "RuntimeError: the GPU fell off the bus")
    assert tasks["commit"].state == TaskState.revoked
    after = dataset_row(ctx, did)
    assert (after.status, after.index_version, after.backbone) == (DatasetStatus.indexed, 1, before.backbone)  # still served
    with Session(ctx.engine) as session:
        assert {e.index_version for e in session.exec(select(Expert).where(Expert.dataset_id == did)).all()} == {1}
    assert work_files(ctx, job.id) == []
    assert ctx.vectors.count(collection_name(before.backbone), dataset_id=did) == 20  # the served space's points, untouched


def test_cancel_stops_a_running_task_and_revokes_the_rest(ctx, data_root, monkeypatch) -> None:
    did = register(ctx, "cancel-me", write_images(data_root / "cancel-me", n=10))
    job = start_indexing(ctx, did, IndexRequest(**SMALL, clusters=2))
    real = indexing.train_and_export

    def cancelled_meanwhile(ctx_, **kwargs):
        cancel_job(ctx, job.id, by="a test")  # from another process, as `nds jobs cancel` would
        time.sleep(0.6)  # progress is written (and the job's status read) at most every 0.5 s
        kwargs["progress"](0.5)  # the running task's next report stops it
        return real(ctx_, **kwargs)

    monkeypatch.setattr(indexing, "train_and_export", cancelled_meanwhile)
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        stored = get_job(session, job.id)
    assert (stored.status, stored.error) == (JobStatus.cancelled, "cancelled by a test")
    tasks = tasks_of(ctx, job.id)
    stopped = [t for t in tasks.values() if t.error]  # the learner that was running (the classifier, the first in order)
    assert [(t.name, t.state) for t in stopped] == [("classifier", TaskState.revoked)] and "cancelled" in stopped[0].error
    assert tasks["commit"].state == tasks["expert:0"].state == tasks["expert:1"].state == TaskState.revoked
    ds = dataset_row(ctx, did)
    assert (ds.status, ds.index_version) == (DatasetStatus.ready, 0)
    assert work_files(ctx, job.id) == []
    with pytest.raises(ConflictError, match="already cancelled"):
        cancel_job(ctx, job.id)
    assert run_task(ctx, job.id, "expert:1", send=None) == TaskState.revoked  # its message, arriving late, does nothing


def test_a_transient_database_error_in_a_task_is_retried_not_failed(ctx, data_root, monkeypatch) -> None:
    did = register(ctx, "transient", write_images(data_root / "transient", n=8))
    job = start_indexing(ctx, did, IndexRequest(**SMALL, clusters=2))
    sent: list[tuple[str, str, str]] = []
    run_job(ctx, job.id, send=lambda *a: sent.append(a), retry_transient=True)  # what the worker's nds.run_job does
    assert sent == [(job.id, "backbone", "gpu")]
    calls = {"n": 0}
    real = INDEX_GRAPH.handlers["backbone"]

    def flaky(ctx_, job_, task):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("SELECT 1", {}, Exception("connection to server at 127.0.0.1 failed: Connection refused"))
        return real(ctx_, job_, task)

    monkeypatch.setitem(INDEX_GRAPH.handlers, "backbone", flaky)
    with pytest.raises(ServiceUnavailableError):
        run_task(ctx, job.id, "backbone", send=lambda *a: sent.append(a), retry_transient=True)
    task = tasks_of(ctx, job.id)["backbone"]
    assert task.state == TaskState.queued and task.error.startswith("will retry")
    with Session(ctx.engine) as session:
        assert session.get(Job, job.id).status == JobStatus.running  # not failed
    # the runner's retry: it succeeds and hands on every embedding chunk
    assert run_task(ctx, job.id, "backbone", send=lambda *a: sent.append(a), retry_transient=True) == TaskState.succeeded
    assert sent[1:] == [(job.id, "embed:0", "gpu")] and tasks_of(ctx, job.id)["backbone"].attempts == 2
    # and the rest of the graph, sent task by task, completes the job
    queue = list(sent[1:])
    while queue:
        _, name, _ = queue.pop(0)
        run_task(ctx, job.id, name, send=lambda *a: queue.append(a), retry_transient=True)
    with Session(ctx.engine) as session:
        assert get_job(session, job.id).status == JobStatus.succeeded
    assert np.isfinite(tasks_of(ctx, job.id)["commit"].result["classifier"]["heldout_accuracy"])


def test_a_registration_fans_out_per_chunk_of_parts_and_commits_once(ctx, data_root, monkeypatch) -> None:
    from nds.catalog.tables import Sample

    monkeypatch.setattr(ctx.settings, "register_chunk_parts", 3)
    folder = write_images(data_root / "chunks", n=5)  # 10 files: 4 chunks of 3, 3, 3, 1
    dataset, job = start_registration(ctx, RegistrationRequest(name="chunks", path=str(folder)))
    InlineDispatcher(ctx).submit(job)
    tasks = tasks_of(ctx, job.id)
    assert sorted(tasks) == ["commit", "scan:0", "scan:1", "scan:2", "scan:3"]
    assert [tasks[f"scan:{c}"].result["stored"] for c in range(4)] == [3, 3, 3, 1]
    with Session(ctx.engine) as session:
        stored = get_job(session, job.id)
        rows = session.exec(select(Sample.uri, Sample.position).where(Sample.dataset_id == dataset.id).order_by(Sample.position)).all()
    assert stored.status == JobStatus.succeeded and stored.result["num_samples"] == 10
    assert [u for u, _ in rows] == sorted(u for u, _ in rows)  # the source's order, across the chunks
    assert [p >> 32 for _, p in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    ds = dataset_row(ctx, dataset.id)
    assert (ds.status, ds.num_samples, ds.labels) == (DatasetStatus.ready, 10, ["a", "b"])
    # a redelivered scan task of a finished job changes nothing
    assert run_task(ctx, job.id, "scan:1", send=None) == TaskState.succeeded
    with Session(ctx.engine) as session:
        assert len(session.exec(select(Sample.id).where(Sample.dataset_id == dataset.id)).all()) == 10


def test_a_scan_task_run_again_starts_its_chunk_clean(ctx, data_root, monkeypatch) -> None:
    """A scanning task killed half-way is redelivered: it stores its chunk again, once."""
    from nds.catalog.tables import Sample

    monkeypatch.setattr(ctx.settings, "register_chunk_parts", 4)
    folder = write_images(data_root / "again", n=4)
    dataset, job = start_registration(ctx, RegistrationRequest(name="again", path=str(folder)))
    sent: list[tuple[str, str, str]] = []
    run_job(ctx, job.id, send=lambda *a: sent.append(a))
    assert [name for _, name, _ in sent] == ["scan:0", "scan:1"]
    assert run_task(ctx, job.id, "scan:0", send=lambda *a: sent.append(a)) == TaskState.succeeded
    with Session(ctx.engine) as session:  # as if its worker died after storing, before recording it done
        task = session.get(JobTask, (job.id, "scan:0"))
        task.state, task.result = TaskState.running, None
        session.commit()
    assert run_task(ctx, job.id, "scan:0", send=lambda *a: sent.append(a)) == TaskState.succeeded
    assert run_task(ctx, job.id, "scan:1", send=lambda *a: sent.append(a)) == TaskState.succeeded
    assert sent[-1][1] == "commit"
    assert run_task(ctx, job.id, "commit", send=None) == TaskState.succeeded
    with Session(ctx.engine) as session:
        assert len(session.exec(select(Sample.id).where(Sample.dataset_id == dataset.id)).all()) == 8
        assert get_job(session, job.id).result["num_samples"] == 8


def test_gc_collects_work_files_of_ended_jobs_and_keeps_a_live_jobs(ctx, data_root) -> None:
    from nds.catalog.artifact_gc import gc

    did = register(ctx, "gc-work", write_images(data_root / "gc-work", n=4))
    live = start_indexing(ctx, did, IndexRequest(**SMALL, clusters=1))  # queued: its files are in use
    ctx.artifacts.write_bytes(f"jobs/{live.id}/embed-0-ids.npy", b"live")
    ctx.artifacts.write_bytes("jobs/00000000-dead-job/embed-0-ids.npy", b"left by a killed process")
    report = gc(ctx, grace_seconds=0)
    assert "jobs/00000000-dead-job/embed-0-ids.npy" in report.removed_keys
    assert ctx.artifacts.exists(f"jobs/{live.id}/embed-0-ids.npy")
