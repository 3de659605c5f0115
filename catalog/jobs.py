"""Jobs: rows that track long work, the code that runs them, and in-process dispatchers.

A job is created with its parameters, handed to a dispatcher, and run by :func:`run_job`,
which looks up the handler for its kind, marks it running, reports step and progress,
and records success with a result or failure with the error. The same ``run_job`` runs
in a background thread (embedded default), inline (the CLI), or in a Celery worker
(server mode; the Celery side lives in ``workers/``, this module knows nothing of it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine, update
from sqlmodel import Session, select

from catalog.db import session_scope
from catalog.errors import NDSError, NotFoundError
from catalog.models import Job, JobStatus, utcnow

if TYPE_CHECKING:
    from catalog.context import CatalogContext

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str | None, float], None]

#: Where server mode runs each kind of job: registration reads files (the cpu queue),
#: indexing trains networks (the gpu queue). The API enqueues by task name and queue;
#: the workers consume them; neither imports the other.
JOB_QUEUES: dict[str, str] = {"register": "cpu", "index": "gpu"}
RUN_JOB_TASK = "nds.run_job"


class JobHandler(Protocol):
    def __call__(self, ctx: CatalogContext, job: Job, report: JobReporter) -> dict[str, Any]: ...


def job_handlers() -> dict[str, JobHandler]:
    """Kind -> plain function. Imported lazily so that importing jobs stays cheap."""
    from catalog.registration import run_registration

    handlers: dict[str, JobHandler] = {"register": run_registration}
    try:
        from catalog.indexing import run_indexing
    except ImportError:
        return handlers
    handlers["index"] = run_indexing
    return handlers


class JobFailed(NDSError):
    """Raised by a handler to fail its job with a message for the user (no traceback kept)."""


def this_process() -> str:
    """``host:pid`` of this process, as jobs record their owner and worker."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process runs; a zombie (killed, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def create_job(session: Session, *, kind: str, dataset_id: int | None, params: dict[str, Any] | None = None) -> Job:
    job = Job(id=str(uuid.uuid4()), kind=kind, dataset_id=dataset_id, params=params or {}, owner=this_process())
    session.add(job)
    return job


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return job


class JobReporter:
    """Writes a job's step and progress, at most every ``interval`` seconds unless forced."""

    def __init__(self, engine: Engine, job_id: str, *, interval: float = 0.5, listener: ProgressCallback | None = None) -> None:
        self.engine = engine
        self.job_id = job_id
        self.interval = interval
        self.listener = listener
        self.step_name: str | None = None
        self.fraction = 0.0
        self._last_write = 0.0
        self._lo, self._hi = 0.0, 1.0

    def step(self, name: str, *, start: float, end: float) -> None:
        """Enter a step that covers [start, end] of the job's overall progress."""
        self.step_name, self._lo, self._hi = name, start, end
        self._set(start, force=True)

    def progress(self, fraction_of_step: float) -> None:
        fraction = self._lo + (self._hi - self._lo) * min(max(fraction_of_step, 0.0), 1.0)
        self._set(fraction)

    def _set(self, fraction: float, *, force: bool = False) -> None:
        self.fraction = fraction
        if self.listener:
            self.listener(self.step_name, fraction)
        now = time.monotonic()
        if force or now - self._last_write >= self.interval:
            self._last_write = now
            with self.engine.begin() as conn:
                conn.execute(
                    update(Job).where(Job.id == self.job_id).values(step=self.step_name, progress=round(fraction, 4))
                )


def run_job(ctx: CatalogContext, job_id: str, *, listener: ProgressCallback | None = None, worker: str | None = None) -> Job:
    """Run one job to completion; never raises for a failure of the job itself.

    Idempotent: a job that already succeeded is not run again (a redelivered Celery task).
    """
    with session_scope(ctx.engine) as session:
        job = get_job(session, job_id)
        if job.status == JobStatus.succeeded:
            return job
        handler = job_handlers().get(job.kind)
        job.status = JobStatus.running
        job.started_at = utcnow()
        job.attempts += 1
        job.error = None
        job.worker = worker or this_process()
    reporter = JobReporter(ctx.engine, job_id, listener=listener)
    if handler is None:
        return _finish(ctx, job_id, error=f"no handler for job kind '{job.kind}'")
    try:
        result = handler(ctx, job, reporter)
    except NDSError as exc:
        log.info("job %s (%s) failed: %s", job_id, job.kind, exc)
        return _finish(ctx, job_id, error=str(exc))
    except Exception as exc:  # a bug or an unexpected failure: keep the traceback in the log
        log.error("job %s (%s) crashed:\n%s", job_id, job.kind, traceback.format_exc())
        return _finish(ctx, job_id, error=f"{type(exc).__name__}: {exc}")
    return _finish(ctx, job_id, result=result)


def _finish(ctx: CatalogContext, job_id: str, *, result: dict[str, Any] | None = None, error: str | None = None) -> Job:
    with session_scope(ctx.engine) as session:
        job = get_job(session, job_id)
        job.status = JobStatus.failed if error else JobStatus.succeeded
        job.error = error
        if result is not None:
            job.result = result
        if not error:
            job.progress = 1.0
        job.finished_at = utcnow()
        return job


def job_process_dead(job: Job, *, host: str, alive: Callable[[int], bool] = process_alive) -> bool:
    """Whether the process a job depends on is gone: its worker once one runs it, else the
    process that created it. A process of another host is never judged (False); a job of a
    catalog older than owner records (neither recorded) counts as dead."""
    process = job.worker or job.owner
    if not process:
        return True
    where, _, pid = process.rpartition(":")
    if where != host or not pid.isdigit():
        return False
    return not alive(int(pid))


def mark_interrupted(ctx: CatalogContext, *, reason: str, alive: Callable[[int], bool] = process_alive) -> list[Job]:
    """Fail the jobs left queued or running by a process of this host that died (embedded
    mode); jobs of live processes (a CLI registering beside the server) are not touched."""
    host = socket.gethostname()
    with session_scope(ctx.engine) as session:
        pending = session.exec(select(Job).where(Job.status.in_([JobStatus.queued, JobStatus.running]))).all()
        stale = [job for job in pending if job_process_dead(job, host=host, alive=alive)]
        for job in stale:
            job.status = JobStatus.failed
            job.error = reason
            job.finished_at = utcnow()
        return list(stale)


def datasets_with_live_jobs(session: Session, kind: str) -> set[int]:
    """Datasets that a queued or running job of ``kind`` is working on (after
    :func:`mark_interrupted`, only jobs of live processes are left in those states)."""
    rows = session.exec(select(Job.dataset_id).where(Job.kind == kind, Job.status.in_([JobStatus.queued, JobStatus.running]))).all()
    return {d for d in rows if d is not None}


def orphaned_jobs(ctx: CatalogContext, *, host: str, alive: Callable[[int], bool]) -> list[str]:
    """Ids of jobs marked running by a process of ``host`` that no longer exists."""
    with session_scope(ctx.engine) as session:
        running = session.exec(select(Job).where(Job.status == JobStatus.running, Job.worker.like(f"{host}:%"))).all()
        return [job.id for job in running if job_process_dead(job, host=host, alive=alive)]


class Dispatcher(Protocol):
    """Something that runs jobs: inline, on a thread, or on a Celery worker."""

    def submit(self, job: Job) -> None: ...

    def close(self) -> None: ...


class InlineDispatcher:
    """Runs the job in the caller, now (the CLI in the embedded default)."""

    def __init__(self, ctx: CatalogContext, *, listener: ProgressCallback | None = None) -> None:
        self.ctx = ctx
        self.listener = listener

    def submit(self, job: Job) -> None:
        run_job(self.ctx, job.id, listener=self.listener)

    def close(self) -> None:
        return None


class ThreadDispatcher:
    """Runs jobs one at a time on a background thread (the API server in the embedded default)."""

    def __init__(self, ctx: CatalogContext) -> None:
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nds-job")
        self._futures: set[Future] = set()
        self._lock = threading.Lock()

    def submit(self, job: Job) -> None:
        future = self._pool.submit(run_job, self.ctx, job.id)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
