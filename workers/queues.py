"""The Celery names of server mode, written once: the tasks that run a job and a task of a job's graph, and one queue
per queue class of the catalog's job kinds (a worker started with ``--queues gpu`` runs
the jobs that need a GPU).

Plain constants, no Celery app: the API and the CLI import this module to send tasks
without building the worker's Celery application.
"""

from __future__ import annotations

import nds.catalog.job_kinds  # noqa: F401 - every job kind registered, for queue_for
from nds.catalog.jobs import CPU, QUEUE_CLASSES, job_kind

RUN_JOB_TASK = "nds.run_job"
#: one task of a job that runs as a graph (nds.catalog.task_graph): args (job id, task name)
RUN_TASK_TASK = "nds.run_task"
#: queue class of a job kind -> the Celery queue of the workers that run it (same name)
QUEUES: dict[str, str] = {queue_class: queue_class for queue_class in QUEUE_CLASSES}
DEFAULT_QUEUE = QUEUES[CPU]


def queue_for(kind: str) -> str:
    """The Celery queue of a job of ``kind``; a kind nothing registered goes to the default
    queue, where the worker fails it for want of a handler."""
    found = job_kind(kind)
    return QUEUES[found.queue_class] if found is not None else DEFAULT_QUEUE


def task_message_id(job_id: str, name: str) -> str:
    """The Celery task id of a graph task's message: known from the job, so cancel can revoke it."""
    return f"{job_id}:{name}"
