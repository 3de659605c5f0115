"""Running jobs: the registry of job kinds, transient errors under a retrying runner, and
what happens to a job that cannot be queued."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from nds.api.dispatch import CeleryDispatcher
from nds.catalog import jobs
from nds.catalog.db import session_scope
from nds.catalog.jobs import CPU, InlineDispatcher, JobKind, create_job, get_job, job_kind, register_job_kind, run_job, submit_or_undo
from nds.catalog.tables import Dataset, DatasetStatus, JobStatus
from nds_client.errors import ServiceUnavailableError
from tests.conftest import write_images

UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1: sending fails at once


class FlakyHandler:
    """Raises ``error`` on its first ``failures`` calls, then succeeds."""

    def __init__(self, error: BaseException, failures: int = 1) -> None:
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self, ctx, job, report):  # noqa: ANN001, ANN204 - a JobHandler
        self.calls += 1
        report.step("work", start=0.0, end=1.0)
        if self.calls <= self.failures:
            raise self.error
        return {"calls": self.calls}


@pytest.fixture
def kinds(monkeypatch: pytest.MonkeyPatch):
    """Register test kinds in a copy of the registry, dropped after the test."""
    monkeypatch.setattr(jobs, "_KINDS", dict(jobs._KINDS))

    def register(handler, *, name: str = "flaky"):  # noqa: ANN001, ANN202
        undone: list[int | None] = []
        register_job_kind(JobKind(name, handler=handler, queue_class=CPU, undo=lambda ctx, dataset_id: undone.append(dataset_id)))
        return undone

    return register


def new_job(ctx, kind: str = "flaky") -> str:  # noqa: ANN001
    with session_scope(ctx.engine) as session:
        return create_job(session, kind=kind, dataset_id=None).id


def stored(ctx, job_id: str):  # noqa: ANN001, ANN201
    with Session(ctx.engine) as session:
        return get_job(session, job_id)


def test_the_catalog_kinds_are_registered_by_their_modules() -> None:
    import nds.catalog.job_kinds  # noqa: F401
    from nds.catalog.indexing import INDEX_GRAPH, restore_status
    from nds.catalog.registration import REGISTER_GRAPH, remove_partial_dataset

    assert job_kind("register") == JobKind("register", None, "cpu", remove_partial_dataset, graph=REGISTER_GRAPH)
    assert job_kind("index") == JobKind("index", None, "gpu", restore_status, graph=INDEX_GRAPH)
    assert job_kind("no-such-kind") is None
    with pytest.raises(ValueError, match="queue class"):
        register_job_kind(JobKind("bad", None, "tpu"))


def test_a_transient_error_under_a_retrying_runner_requeues_the_job_and_raises(ctx, kinds) -> None:
    handler = FlakyHandler(ServiceUnavailableError("the vector store cannot be reached: connection refused"))
    undone = kinds(handler)
    job_id = new_job(ctx)
    with pytest.raises(ServiceUnavailableError, match="connection refused"):
        run_job(ctx, job_id, retry_transient=True)
    job = stored(ctx, job_id)
    assert job.status == JobStatus.queued  # not failed: the runner tries again
    assert "will retry" in job.error and "connection refused" in job.error
    assert undone == []  # nothing undone: the next try carries on from here

    job = run_job(ctx, job_id, retry_transient=True)
    assert (job.status, job.result, job.error, job.attempts) == (JobStatus.succeeded, {"calls": 2}, None, 2)
    assert stored(ctx, job_id).status == JobStatus.succeeded
    assert run_job(ctx, job_id, retry_transient=True).attempts == 2  # a redelivery of a finished job does nothing
    assert handler.calls == 2 and undone == []


def test_a_database_error_is_transient_and_raised_as_service_unavailable(ctx, kinds) -> None:
    dropped = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    kinds(FlakyHandler(dropped))
    job_id = new_job(ctx)
    with pytest.raises(ServiceUnavailableError, match="catalog database cannot be reached") as info:
        run_job(ctx, job_id, retry_transient=True)
    assert info.value.__cause__ is dropped
    assert stored(ctx, job_id).status == JobStatus.queued


def test_in_process_a_transient_error_fails_the_job_with_the_reason(ctx, kinds) -> None:
    undone = kinds(FlakyHandler(ServiceUnavailableError("the vector store cannot be reached: connection refused")))
    job_id = new_job(ctx)
    InlineDispatcher(ctx).submit(stored(ctx, job_id))  # what the CLI and the embedded server run
    job = stored(ctx, job_id)
    assert job.status == JobStatus.failed
    assert "the vector store cannot be reached: connection refused" in job.error
    assert undone == [None]


def test_a_lasting_error_under_a_retrying_runner_still_fails_the_job(ctx, kinds) -> None:
    undone = kinds(FlakyHandler(ValueError("a bug")))
    job_id = new_job(ctx)
    job = run_job(ctx, job_id, retry_transient=True)
    assert (job.status, job.error) == (JobStatus.failed, "ValueError: a bug")
    assert undone == [None]


def test_a_job_of_an_unregistered_kind_fails(ctx) -> None:
    job = run_job(ctx, new_job(ctx, kind="no-such-kind"), retry_transient=True)
    assert job.status == JobStatus.failed and "no handler for job kind 'no-such-kind'" in job.error


def test_a_registration_that_cannot_be_queued_fails_and_leaves_nothing(ctx, data_root) -> None:
    from nds.catalog.registration import RegistrationRequest, start_registration

    folder = write_images(data_root / "src", n=2)
    dataset, job = start_registration(ctx, RegistrationRequest(name="src", path=str(folder)))
    dispatcher = CeleryDispatcher(UNREACHABLE_BROKER)
    try:
        with pytest.raises(ServiceUnavailableError, match="broker"):
            submit_or_undo(ctx, dispatcher, job)
    finally:
        dispatcher.close()
    with Session(ctx.engine) as session:
        assert session.get(Dataset, dataset.id) is None  # the registration's undo removed it
    failed = stored(ctx, job.id)
    assert (failed.status, failed.error) == (JobStatus.failed, "the job could not be queued")


def test_an_index_job_that_cannot_be_queued_gives_the_dataset_back(ctx, data_root) -> None:
    from nds.catalog.indexing import IndexRequest, start_indexing
    from nds.catalog.registration import RegistrationRequest, start_registration

    folder = write_images(data_root / "src", n=4)
    dataset, job = start_registration(ctx, RegistrationRequest(name="src", path=str(folder)))
    InlineDispatcher(ctx).submit(job)
    index_job = start_indexing(ctx, dataset.id, IndexRequest(clusters=2))
    with Session(ctx.engine) as session:
        assert session.get(Dataset, dataset.id).status == DatasetStatus.indexing
    dispatcher = CeleryDispatcher(UNREACHABLE_BROKER)
    try:
        with pytest.raises(ServiceUnavailableError):
            submit_or_undo(ctx, dispatcher, index_job)
    finally:
        dispatcher.close()
    with Session(ctx.engine) as session:
        assert session.get(Dataset, dataset.id).status == DatasetStatus.ready  # the index kind's undo
    assert stored(ctx, index_job.id).status == JobStatus.failed


def test_the_cli_in_server_mode_undoes_a_registration_it_cannot_queue(nds, cli_env, settings, data_root) -> None:
    from nds.catalog.db import upgrade

    folder = write_images(data_root / "src", n=2)
    upgrade(settings)  # with a broker set, the CLI expects a migrated catalog
    cli_env["NDS_BROKER_URL"] = UNREACHABLE_BROKER
    result = nds("datasets", "add", "src", str(folder))
    assert result.exit_code != 0 and "broker" in result.output
    cli_env["NDS_BROKER_URL"] = ""
    listed = nds("datasets", "list", "--json")
    assert listed.exit_code == 0 and '"src"' not in listed.output
