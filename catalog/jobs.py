"""Jobs: rows that track long work, the code that runs them, and in-process dispatchers.

A job is created with its parameters, handed to a dispatcher, and run by :func:`run_job`,
which looks up its :class:`JobKind`, marks it running, reports step and progress, and
records success with a result or failure with the error (undoing the kind's side effects).
The same ``run_job`` runs in a background thread (embedded default), inline (the CLI), or
in a Celery worker (server mode; the Celery side lives in ``workers/``, this module knows
nothing of it).

Kinds are registered by the modules that implement them (:mod:`nds.catalog.registration`,
:mod:`nds.catalog.indexing`) when they are imported; this module imports neither.
:mod:`nds.catalog.job_kinds` imports them all, and whatever runs jobs imports it.
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, select

from nds.catalog.db import session_scope, unavailable_database
from nds.catalog.tables import Job, JobStatus, JobTask, utcnow
from nds_client.errors import ConflictError, NDSError, NotFoundError, ServiceUnavailableError

if TYPE_CHECKING:
    from nds.catalog.context import CatalogContext

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str | None, float], None]

#: What a kind of job needs to run on: plain CPUs (reading files) or a GPU (training
#: networks). Server mode maps each class to a worker queue (``workers/queues.py``).
CPU, GPU = "cpu", "gpu"
QUEUE_CLASSES: tuple[str, ...] = (CPU, GPU)


class JobHandler(Protocol):
    def __call__(self, ctx: CatalogContext, job: Job, report: JobReporter) -> dict[str, Any]: ...


#: Undoes what starting a job of a kind did to its dataset, when the job fails or cannot be queued.
JobUndo = Callable[["CatalogContext", "int | None"], None]


#: Hands a task of a job's graph to whatever runs it: (job id, task name, queue class).
Sender = Callable[[str, str, str], None]


class GraphStart(Protocol):
    """A kind that runs as a graph of tasks (:class:`nds.catalog.task_graph.Graph`): ``start``
    plans the job's tasks and sends the first ones (or, with no sender, runs them all here)."""

    def start(self, ctx: CatalogContext, job: Job, send: Sender | None, worker: str | None) -> None: ...

    def cleanup(self, ctx: CatalogContext, job: Job) -> None:
        """Remove what the job's tasks left for each other, once it ended without committing."""


@dataclass(frozen=True)
class JobKind:
    """One kind of job: the function that runs it, what it needs to run on (one of
    :data:`QUEUE_CLASSES`), and what undoes its side effects on its dataset when it fails.
    A kind with a ``graph`` runs as tasks over the workers and has no ``handler``."""

    name: str
    handler: JobHandler | None
    queue_class: str
    undo: JobUndo | None = None
    graph: GraphStart | None = None


_KINDS: dict[str, JobKind] = {}


def register_job_kind(kind: JobKind) -> JobKind:
    """Add a kind to the registry (registering the same kind again replaces it)."""
    if kind.queue_class not in QUEUE_CLASSES:
        raise ValueError(f"job kind {kind.name!r}: queue class must be one of {', '.join(QUEUE_CLASSES)}, got {kind.queue_class!r}")
    _KINDS[kind.name] = kind
    return kind


def job_kind(name: str) -> JobKind | None:
    """The registered kind ``name``; None when no imported module registered it."""
    return _KINDS.get(name)


def transient_error(exc: BaseException) -> ServiceUnavailableError | None:
    """``exc`` as a :class:`ServiceUnavailableError` when it is one that a later try may not
    meet (a service down or restarting, the database unreachable or busy), else None."""
    if isinstance(exc, ServiceUnavailableError):
        return exc
    return unavailable_database(exc)


class JobFailed(NDSError):
    """Raised by a handler to fail its job with a message for the user (no traceback kept)."""


class JobCancelled(NDSError):
    """Raised by a job's progress report once the job was cancelled (or failed by another of
    its tasks): the work stops where it is, and what it wrote is cleaned up."""


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

    def __init__(self, engine: Engine, job_id: str, *, interval: float = 0.5, listener: ProgressCallback | None = None,
                 task: str | None = None) -> None:
        self.engine = engine
        self.job_id = job_id
        self.task = task  # a task of the job's graph: its own row gets the progress
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
                if self.task is None:
                    conn.execute(update(Job).where(Job.id == self.job_id).values(step=self.step_name, progress=round(fraction, 4)))
                else:
                    conn.execute(update(JobTask).where(JobTask.job_id == self.job_id, JobTask.name == self.task)
                                 .values(progress=round(fraction, 4)))
                status = conn.execute(sa_select(Job.status).where(Job.id == self.job_id)).scalar()
            if status is None or JobStatus(status).finished:
                raise JobCancelled(f"job {self.job_id} was {'deleted' if status is None else JobStatus(status).value}; its work stops")


def run_job(
    ctx: CatalogContext,
    job_id: str,
    *,
    listener: ProgressCallback | None = None,
    worker: str | None = None,
    retry_transient: bool = False,
    send: Sender | None = None,
) -> Job:
    """Run one job to completion; never raises for a failure of the job itself.

    A failed job is recorded with its error and its kind's ``undo`` is run. With
    ``retry_transient`` (a runner that retries, the Celery task), a transient error
    (:func:`transient_error`) does not fail the job: it is put back to ``queued`` with the
    reason in ``error``, nothing is undone, and the error is raised (as a
    :class:`ServiceUnavailableError`) for the runner to try again.

    A kind with a graph is planned here and its tasks are handed to ``send`` (server mode),
    or, with no sender, run here one after the other; the graph's last task finishes the job.

    Idempotent: a job that already succeeded is not run again (a redelivered Celery task).
    """
    with session_scope(ctx.engine) as session:
        job = get_job(session, job_id)
        if job.status.finished:
            return job  # it ended (a redelivered task, one failed and undone while it waited, or cancelled)
        kind = job_kind(job.kind)
        job.status = JobStatus.running
        job.started_at = utcnow()
        job.attempts += 1
        job.error = None
        job.worker = worker or this_process()
    reporter = JobReporter(ctx.engine, job_id, listener=listener)
    if kind is None:
        return _finish(ctx, job_id, error=f"no handler for job kind '{job.kind}'")
    try:
        if kind.graph is not None:
            kind.graph.start(ctx, job, send, worker)
            with session_scope(ctx.engine) as session:
                return get_job(session, job_id)
        if kind.handler is None:
            raise JobFailed(f"job kind '{job.kind}' has neither a handler nor a graph")
        result = kind.handler(ctx, job, reporter)
    except BaseException as exc:
        transient = transient_error(exc) if retry_transient else None
        if transient is not None:
            log.warning("job %s (%s) will be retried: %s", job_id, job.kind, transient)
            _requeue(ctx, job_id, reason=f"will retry: {transient}")
            if transient is exc:
                raise
            raise transient from exc
        if isinstance(exc, JobCancelled):
            undo_job(ctx, kind, job)  # cancel_job recorded why
            with session_scope(ctx.engine) as session:
                return get_job(session, job_id)
        undo_job(ctx, kind, job)
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: the process is going away
            raise
        if isinstance(exc, NDSError):
            log.info("job %s (%s) failed: %s", job_id, job.kind, exc)
            return _finish(ctx, job_id, error=str(exc))
        # a bug or an unexpected failure: keep the traceback in the log
        log.error("job %s (%s) crashed:\n%s", job_id, job.kind, traceback.format_exc())
        return _finish(ctx, job_id, error=f"{type(exc).__name__}: {exc}")
    return _finish(ctx, job_id, result=result)


def undo_job(ctx: CatalogContext, kind: JobKind, job: Job) -> None:
    """Run the kind's undo for a job that failed or was cancelled; its own errors go to the log."""
    if kind.undo is None:
        return
    try:
        kind.undo(ctx, job.dataset_id)
    except Exception:  # the job's own error is the one to record; this one goes to the log
        log.error("undoing job %s (%s) failed:\n%s", job.id, job.kind, traceback.format_exc())


def _requeue(ctx: CatalogContext, job_id: str, *, reason: str) -> None:
    """Put a job back to ``queued`` for another try; best effort (the database may be the
    thing that is down: the runner retries anyway, and the next try marks it running)."""
    try:
        with session_scope(ctx.engine) as session:
            job = get_job(session, job_id)
            job.status = JobStatus.queued
            job.error = reason
    except Exception as exc:
        log.warning("could not put job %s back to queued: %s", job_id, exc)


def _finish(ctx: CatalogContext, job_id: str, *, result: dict[str, Any] | None = None, error: str | None = None) -> Job:
    with session_scope(ctx.engine) as session:
        job = get_job(session, job_id)
        if job.status == JobStatus.cancelled:
            return job  # cancelled while its last step ran: that stands
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
    mode); jobs of live processes (a CLI registering beside the server) are not touched.
    Called at start-up, before this process runs any job: a job that names this very pid
    was left by an earlier process that had it (a restarted container's server is pid 1
    again), so it counts as dead. Each one's kind then undoes what it left (as after a job
    that failed: a partial registration removed, a dataset held by an index or sync job put
    back, what a sync stored but did not commit dropped)."""
    host, me = socket.gethostname(), os.getpid()
    judged = alive

    def alive(pid: int) -> bool:
        return pid != me and judged(pid)

    with session_scope(ctx.engine) as session:
        pending = session.exec(select(Job).where(Job.status.in_([JobStatus.queued, JobStatus.running]))).all()
        stale = [job for job in pending if job_process_dead(job, host=host, alive=alive)]
        for job in stale:
            job.status = JobStatus.failed
            job.error = reason
            job.finished_at = utcnow()
        if stale:  # a graph's tasks that had not finished went with the process
            session.exec(update(JobTask).where(JobTask.job_id.in_([j.id for j in stale]),
                                               JobTask.state.in_(["pending", "queued", "running"]))
                         .values(state="revoked", error=reason, finished_at=utcnow()))
        stale = list(stale)
    for job in stale:
        kind = job_kind(job.kind)
        if kind is not None:
            undo_job(ctx, kind, job)
            if kind.graph is not None:
                kind.graph.cleanup(ctx, job)
    return stale


def datasets_with_live_jobs(session: Session, kind: str) -> set[int]:
    """Datasets that a queued or running job of ``kind`` is working on (after
    :func:`mark_interrupted`, only jobs of live processes are left in those states)."""
    rows = session.exec(select(Job.dataset_id).where(Job.kind == kind, Job.status.in_([JobStatus.queued, JobStatus.running]))).all()
    return {d for d in rows if d is not None}


def orphaned_jobs(ctx: CatalogContext, *, host: str, alive: Callable[[int], bool]) -> list[str]:
    """Ids of jobs marked running by a process of ``host`` that no longer exists."""
    with session_scope(ctx.engine) as session:
        running = session.exec(select(Job).where(Job.status == JobStatus.running, Job.worker.like(f"{host}:%"))).all()
        graphs = set(session.exec(select(JobTask.job_id).where(JobTask.job_id.in_([j.id for j in running])).distinct()).all()) if running else set()
        # a job of tasks is recovered task by task (nds.catalog.task_graph.orphaned_tasks)
        return [job.id for job in running if job.id not in graphs and job_process_dead(job, host=host, alive=alive)]


def cancel_job(ctx: CatalogContext, job_id: str, *, by: str = "a user") -> Job:
    """Cancel a queued or running job: its tasks that have not run are revoked (their messages,
    when they arrive, find the job cancelled and do nothing), a running task stops at its next
    progress report, and the kind's undo leaves the dataset as it was before the job.
    A job that has ended cannot be cancelled (ConflictError)."""
    with session_scope(ctx.engine) as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise NotFoundError(f"no job {job_id}")
        if job.status.finished:
            raise ConflictError(f"job {job_id} has already {job.status.value}", hint="only a queued or running job can be cancelled")
        now = utcnow()
        job.status, job.error, job.finished_at = JobStatus.cancelled, f"cancelled by {by}", now
        for task in session.exec(select(JobTask).where(JobTask.job_id == job_id)).all():
            if task.state in ("pending", "queued"):
                task.state, task.finished_at = "revoked", now
        kind = job_kind(job.kind)
        session.flush()
        session.expunge(job)
    if kind is not None:
        undo_job(ctx, kind, job)
        if kind.graph is not None:
            kind.graph.cleanup(ctx, job)
    with session_scope(ctx.engine) as session:
        return get_job(session, job_id)


class Dispatcher(Protocol):
    """Something that runs jobs: inline, on a thread, or on a Celery worker."""

    def submit(self, job: Job) -> None: ...

    def close(self) -> None: ...


def submit_or_undo(ctx: CatalogContext, dispatcher: Dispatcher, job: Job) -> None:
    """Hand the job to the dispatcher; if that fails (broker down), fail the job, undo its
    kind's side effects (the dataset it created or claimed), and raise."""
    try:
        dispatcher.submit(job)
    except Exception:
        with session_scope(ctx.engine) as session:
            stored = get_job(session, job.id)
            stored.status, stored.error = JobStatus.failed, "the job could not be queued"
        kind = job_kind(job.kind)
        if kind is not None:
            undo_job(ctx, kind, job)
        raise


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
