"""The Celery application of server mode: its queues (``workers/queues.py``), one task at a time.

Started by ``nds worker --queues cpu,gpu`` (``celery -A nds.workers.celery_app worker``).
Settings come from the same ``NDS_*`` variables as everything else. Tasks are
idempotent, so they are acknowledged late and redelivered if a worker dies; the Redis
visibility timeout is longer than the longest training job, so a slow task is not
handed to a second worker while the first still runs it.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from nds.catalog.settings import Settings, load_settings
from nds.workers.queues import DEFAULT_QUEUE, QUEUES


def create_celery(settings: Settings) -> Celery:
    app = Celery("nds", broker=settings.broker_url, include=["nds.workers.tasks"])
    app.conf.update(
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES.values()],
        task_default_queue=DEFAULT_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=50,
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout},
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        task_time_limit=max(settings.broker_visibility_timeout - 60, 60),
    )
    return app


app = create_celery(load_settings())
