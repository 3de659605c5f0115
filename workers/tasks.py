"""Thin Celery tasks: they take ids and call the plain functions in ``catalog``.

Each worker process builds its own :class:`CatalogContext` after the fork (so no
database connection, vector store handle or CUDA context is shared with the parent).
Every job records the ``host:pid`` running it; when a worker starts, it re-queues the
jobs that a dead process on the same host left running (a worker killed mid-training
and restarted picks its job up at once instead of after the broker's visibility
timeout). Jobs are idempotent, so a second delivery of the same job is harmless. A job
that meets a transient error (a service or the database unreachable) is retried with
backoff instead of failed.
"""

from __future__ import annotations

import logging
import socket

from celery.signals import worker_process_init, worker_process_shutdown, worker_ready
from sqlalchemy.exc import OperationalError

from nds.catalog.context import CatalogContext
from nds.catalog.db import session_scope
from nds.catalog.jobs import get_job, orphaned_jobs, process_alive, run_job, this_process
from nds.catalog.settings import load_settings
from nds.catalog.task_graph import orphaned_tasks, run_task
from nds.workers.celery_app import app
from nds.workers.queues import QUEUES, RUN_JOB_TASK, RUN_TASK_TASK, queue_for, task_message_id
from nds_client.errors import ServiceUnavailableError

log = logging.getLogger(__name__)


class _ProcessContext:
    """The one CatalogContext of this worker process, created after fork."""

    ctx: CatalogContext | None = None

    @classmethod
    def get(cls) -> CatalogContext:
        if cls.ctx is None:
            cls.ctx = CatalogContext.open(load_settings())
        return cls.ctx

    @classmethod
    def close(cls) -> None:
        if cls.ctx is not None:
            cls.ctx.close()
            cls.ctx = None


@worker_process_init.connect
def _reset_after_fork(**_: object) -> None:
    _ProcessContext.ctx = None


@worker_process_shutdown.connect
def _close(**_: object) -> None:
    _ProcessContext.close()


def send_graph_task(job_id: str, name: str, queue_class: str) -> None:
    """Send one task of a job's graph to its queue class's queue (any worker there takes it)."""
    run_task_task.apply_async(args=[job_id, name], queue=QUEUES.get(queue_class, queue_for("")), task_id=task_message_id(job_id, name))


@worker_ready.connect
def _requeue_orphans(**_: object) -> None:
    """Re-queue jobs, and tasks of jobs' graphs, left running by a dead worker process of this host."""
    ctx = CatalogContext.open(load_settings())
    try:
        host = socket.gethostname()
        for job_id in orphaned_jobs(ctx, host=host, alive=process_alive):
            with session_scope(ctx.engine) as session:
                kind = get_job(session, job_id).kind
            log.warning("re-queuing job %s (%s): the worker running it died", job_id, kind)
            run_job_task.apply_async(args=[job_id], queue=queue_for(kind))
        for job_id, name, queue_class in orphaned_tasks(ctx, host=host, alive=process_alive):
            log.warning("re-queuing task %s of job %s: the worker running it died", name, job_id)
            send_graph_task(job_id, name, queue_class)
    finally:
        ctx.close()


@app.task(
    name=RUN_JOB_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError, ServiceUnavailableError),
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
    max_retries=8,
)
def run_job_task(self, job_id: str) -> str:  # noqa: ANN001 - the bound task
    """Run one catalog job by id; its outcome is recorded on the job row.

    A transient error (a service or the database unreachable) puts the job back to
    'queued' and is raised, so ``autoretry_for`` tries again later; on the last try it
    fails the job like any other error."""
    retrying = self.request.retries < self.max_retries
    job = run_job(_ProcessContext.get(), job_id, worker=this_process(), retry_transient=retrying, send=send_graph_task)
    return job.status.value


@app.task(
    name=RUN_TASK_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError, ServiceUnavailableError),
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
    max_retries=8,
)
def run_task_task(self, job_id: str, name: str) -> str:  # noqa: ANN001 - the bound task
    """Run one task of a job's graph by (job id, task name); it queues the tasks it makes ready.

    As :func:`run_job_task`: a transient error puts the task back to 'queued' and is retried;
    on the last try it fails the task, and with it the job."""
    retrying = self.request.retries < self.max_retries
    return run_task(_ProcessContext.get(), job_id, name, send=send_graph_task, worker=this_process(), retry_transient=retrying).value
