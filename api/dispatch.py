"""Pick how jobs run: a background thread (embedded default) or Celery (server mode).

The API enqueues Celery tasks by name and queue, both taken from ``nds.workers.queues`` (plain
constants): it never imports the worker's Celery application or its tasks.
"""

from __future__ import annotations

import nds.catalog.job_kinds  # noqa: F401 - every job kind registered, for the in-process runner
from nds.catalog.context import CatalogContext
from nds.catalog.jobs import Dispatcher, ThreadDispatcher
from nds.catalog.tables import Job
from nds.workers.queues import RUN_JOB_TASK, queue_for
from nds_client.errors import ServiceUnavailableError


class CeleryDispatcher:
    """Sends jobs to Celery workers through the broker; fails with 503 when it is down."""

    def __init__(self, broker_url: str) -> None:
        from celery import Celery

        self.app = Celery("nds-api", broker=broker_url)
        self.app.conf.broker_connection_retry_on_startup = False
        self.app.conf.broker_transport_options = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2}

    def submit(self, job: Job) -> None:
        try:
            self.app.send_task(RUN_JOB_TASK, args=[job.id], queue=queue_for(job.kind), retry=False)
        except Exception as exc:  # kombu raises a zoo of connection errors; translate them all here
            raise ServiceUnavailableError(
                f"the job broker at {self.app.conf.broker_url} cannot be reached: {exc}",
                hint="start Redis (NDS_BROKER_URL) and retry; reads keep working meanwhile",
            ) from exc

    def close(self) -> None:
        self.app.close()


def make_dispatcher(ctx: CatalogContext) -> Dispatcher:
    if ctx.settings.broker_url:
        return CeleryDispatcher(ctx.settings.broker_url)
    return ThreadDispatcher(ctx)
