"""Thin Celery tasks: they take ids and call the plain functions in ``catalog``.

Each worker process builds its own :class:`CatalogContext` after the fork (so no
database connection, vector store handle or CUDA context is shared with the parent).
"""

from __future__ import annotations

import logging

from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy.exc import OperationalError

from catalog.context import CatalogContext
from catalog.errors import ServiceUnavailableError
from catalog.jobs import run_job
from catalog.settings import load_settings
from workers.celery_app import app

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


@app.task(
    name="nds.run_job",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError, ServiceUnavailableError),
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
    max_retries=8,
)
def run_job_task(job_id: str) -> str:
    """Run one catalog job by id; its outcome is recorded on the job row."""
    job = run_job(_ProcessContext.get(), job_id)
    return job.status.value
