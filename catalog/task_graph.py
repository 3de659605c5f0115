"""Jobs that run as a graph of tasks over the workers, joined in the catalog.

A job kind with a :class:`Graph` (indexing: embed chunks -> partition -> one task per
expert and one for the label classifier -> commit) is planned into ``job_tasks`` rows, one
per :class:`TaskSpec`, each naming the tasks it waits for. A task runs when all of those
have succeeded; it takes ids and reads what the earlier tasks left (their small JSON
``result`` and content-keyed artifacts), never objects. The join is done in the database:
when a task succeeds, it marks itself done and moves the tasks whose inputs are now all
there from ``pending`` to ``queued``, under a lock on the job's row (``SELECT ... FOR
UPDATE`` on PostgreSQL), in one transaction; then it hands them to a *sender*. In server
mode the sender is Celery (``workers/tasks.py``: one message per task on its queue class's
queue, any worker takes it); in the embedded default :func:`run_graph_inline` runs the same
tasks one after another in-process. This is what a Celery chord does, without a result
backend to keep the chord's counter, and a redelivered task (late acknowledgement, after
its worker died) finds the graph's state where the last committed transaction left it.

Rules every task keeps:

* **Idempotent.** A task that already succeeded is not run again; a task run twice (a
  redelivered message) writes the same artifacts (keys are hashes of their inputs) and the
  same result.
* **Failure fails the job.** A task that fails (after the runner's retries, for a transient
  error) records its reason, fails the job with "task NAME: reason", revokes the tasks that
  have not run, and the kind's ``undo`` puts the dataset back (its previous index version
  still served: nothing is committed but by the final task).
* **The final task commits.** The one task no other waits for produces the job's result; it
  may mark the job succeeded in the very transaction that commits its work
  (:meth:`TaskRun.complete_in`), so a crash between the two cannot commit twice.
* **Cancel** (:func:`nds.catalog.jobs.cancel_job`) marks the job cancelled and its unrun
  tasks revoked; a running task stops at its next progress report.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

from sqlmodel import Session, col, select

from nds.catalog.db import session_scope
from nds.catalog.jobs import (
    JobCancelled,
    JobKind,
    JobReporter,
    Sender,
    job_kind,
    job_process_dead,
    this_process,
    transient_error,
    undo_job,
)
from nds.catalog.tables import Job, JobPublic, JobStatus, JobTask, JobTaskPublic, TaskState
from nds_client.errors import NDSError

if TYPE_CHECKING:
    from nds.catalog.context import CatalogContext

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TaskSpec:
    """One task of a graph: its name (unique in the job), the queue class it runs on, the
    tasks it waits for, its parameters (JSON) and its share of the job's progress."""

    name: str
    queue_class: str
    after: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0


class TaskHandler(Protocol):
    def __call__(self, ctx: CatalogContext, job: Job, task: TaskRun) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Graph:
    """How a kind of job runs as tasks: ``plan`` lists them (called once per job, when it
    starts), ``run`` runs one (by its name's stage, the part before ':'), ``abandon`` cleans up
    what a task of a job that has since failed or been cancelled wrote (after the kind's undo)."""

    plan: Callable[[CatalogContext, Job], list[TaskSpec]]
    handlers: dict[str, TaskHandler]
    abandon: Callable[[CatalogContext, Job], None] | None = None

    def handler(self, name: str) -> TaskHandler:
        return self.handlers[stage_of(name)]

    def start(self, ctx: CatalogContext, job: Job, send: Sender | None, worker: str | None) -> None:
        """Plan the job's tasks (once) and send those ready now; with no sender, run them all here."""
        ready = plan_graph(ctx, job, self)
        if send is None:
            run_graph_inline(ctx, job.id, ready, worker=worker)
            return
        for name in ready:
            send(job.id, name, _queue_class(ctx, job.id, name))

    def cleanup(self, ctx: CatalogContext, job: Job) -> None:
        if self.abandon is not None:
            self.abandon(ctx, job)


def _now() -> datetime:
    """A task's timestamps keep microseconds (a job's are whole seconds): tasks take fractions of one."""
    return datetime.now(timezone.utc)


def stage_of(name: str) -> str:
    """'expert:3' -> 'expert'."""
    return name.partition(":")[0]


class TaskRun:
    """What a task's handler gets: its parameters, the results of the tasks it waited for,
    a progress reporter (which stops the task when its job is cancelled), and, for the final
    task, :meth:`complete_in` to finish the job inside its own commit transaction."""

    def __init__(self, ctx: CatalogContext, job_id: str, row: JobTask, inputs: dict[str, dict[str, Any]], final: bool) -> None:
        self.job_id, self.name, self.params, self.inputs, self.final = job_id, row.name, dict(row.params), inputs, final
        self.report = JobReporter(ctx.engine, job_id, task=row.name)
        self.completed = False

    def input(self, name: str) -> dict[str, Any]:
        return self.inputs[name]

    def inputs_of(self, stage: str) -> list[dict[str, Any]]:
        """The results of the awaited tasks of one stage, in their names' order ('embed:0', 'embed:1', ...)."""
        found = [(name, result) for name, result in self.inputs.items() if stage_of(name) == stage]
        return [result for _, result in sorted(found, key=lambda kv: _order_key(kv[0]))]

    def complete_in(self, session: Session, result: dict[str, Any]) -> None:
        """Mark this (final) task and its job succeeded, in ``session``'s transaction: the
        handler calls it in the transaction that commits the job's work."""
        if not self.final:
            raise RuntimeError(f"task {self.name} is not the final task of its job")
        job = session.get(Job, self.job_id, with_for_update=True)
        if job is None or job.status != JobStatus.running:
            raise JobCancelled(f"job {self.job_id} was {'deleted' if job is None else job.status.value} before it could commit")
        task = session.get(JobTask, (self.job_id, self.name))
        now = _now()
        if task is not None:
            task.state, task.result, task.progress, task.finished_at = TaskState.succeeded, result, 1.0, now
        job.status, job.result, job.progress, job.finished_at, job.error, job.step = JobStatus.succeeded, result, 1.0, now, None, None
        self.completed = True


def _order_key(name: str) -> tuple[str, int, str]:
    stage, _, rest = name.partition(":")
    return (stage, int(rest), "") if rest.isdigit() else (stage, -1, rest)


# --------------------------------------------------------------------------- planning


def plan_graph(ctx: CatalogContext, job: Job, graph: Graph) -> list[str]:
    """Write the job's tasks (once: a redelivered start finds them there) and return the names
    of those queued now (the ones that wait for nothing, or whose inputs are all done)."""
    with session_scope(ctx.engine) as session:
        locked = session.get(Job, job.id, with_for_update=True)
        if locked is None or locked.status.finished:
            return []
        existing = session.exec(select(JobTask).where(JobTask.job_id == job.id)).all()
        again = [t.name for t in existing if t.state == TaskState.queued and not t.after]  # a redelivered start: send them again
        if not existing:
            specs = graph.plan(ctx, job)
            names = {s.name for s in specs}
            finals = [s.name for s in specs if not any(s.name in other.after for other in specs)]
            if len(names) != len(specs) or len(finals) != 1 or any(a not in names for s in specs for a in s.after):
                raise RuntimeError(f"job kind {job.kind!r} planned a malformed graph: {[(s.name, s.after) for s in specs]}")
            for spec in specs:
                session.add(JobTask(job_id=job.id, name=spec.name, queue_class=spec.queue_class, after=list(spec.after),
                                    params=spec.params, weight=spec.weight))
            session.flush()
            existing = session.exec(select(JobTask).where(JobTask.job_id == job.id)).all()
        locked.step = "tasks"
        return sorted(set(again) | set(_queue_ready(existing)), key=_order_key)


def _queue_ready(tasks: Sequence[JobTask], *, after: str | None = None) -> list[str]:
    """Move every pending task whose awaited tasks all succeeded to queued, and return the names
    of those it moved. With ``after`` (a redelivered message of a task that had succeeded),
    return instead every queued task that waits for that one: its worker may have died before
    sending them, and a duplicate message is harmless (a task runs only once it is queued)."""
    done = {t.name for t in tasks if t.state == TaskState.succeeded}
    moved = []
    for task in tasks:
        if task.state == TaskState.pending and all(a in done for a in task.after):
            task.state = TaskState.queued
            moved.append(task.name)
    if after is not None:
        moved = [t.name for t in tasks if t.state == TaskState.queued and after in t.after]
    return sorted(moved, key=_order_key)


def final_task(tasks: Sequence[JobTask]) -> str:
    awaited = {a for t in tasks for a in t.after}
    return next(t.name for t in tasks if t.name not in awaited)


# --------------------------------------------------------------------------- running one task


def run_task(
    ctx: CatalogContext, job_id: str, name: str, *, send: Sender | None, worker: str | None = None, retry_transient: bool = False,
) -> TaskState:
    """Run one task of a job's graph; never raises for a failure of the task itself.

    Returns the task's state afterwards. With ``send``, the tasks it makes ready are handed
    to it (server mode); without, the caller runs them (:func:`run_graph_inline`). With
    ``retry_transient``, a transient error puts the task back to ``queued`` and is raised
    (as :class:`ServiceUnavailableError`) for the runner to retry, as :func:`run_job` does.
    """
    with session_scope(ctx.engine) as session:
        job = session.get(Job, job_id)
        task = session.get(JobTask, (job_id, name))
        if job is None or task is None:
            return TaskState.revoked  # the job (or its dataset) was deleted meanwhile
        if job.status.finished or task.state in (TaskState.failed, TaskState.revoked):
            return task.state if task.state != TaskState.queued else TaskState.revoked
        tasks = session.exec(select(JobTask).where(JobTask.job_id == job_id)).all()
        if task.state == TaskState.succeeded:  # a redelivered message: hand on what it made ready, again
            ready = _queue_ready(tasks, after=name)
            finished = TaskState.succeeded
        else:
            inputs = {t.name: t.result or {} for t in tasks if t.name in task.after}
            if any(t.state != TaskState.succeeded for t in tasks if t.name in task.after):
                return task.state  # not ready (a stray message): its last input's task will queue it
            final = final_task(tasks) == name
            task.state, task.worker, task.started_at, task.finished_at = TaskState.running, worker or this_process(), _now(), None
            task.attempts += 1
            task.error = None
            if job.status == JobStatus.queued:
                job.status, job.started_at = JobStatus.running, job.started_at or _now()
            job.step = name
            finished = None
    kind = job_kind(job.kind)
    if finished is None:
        assert kind is not None and kind.graph is not None
        run = TaskRun(ctx, job_id, task, inputs, final)
        try:
            result = kind.graph.handler(name)(ctx, job, run)
        except BaseException as exc:
            return _task_failed(ctx, kind, job, name, exc, retry_transient=retry_transient)
        ready = _task_succeeded(ctx, kind, job, run, result)
        if ready is None:
            return TaskState.revoked
    if send is not None:
        for next_name in ready:
            send(job_id, next_name, _queue_class(ctx, job_id, next_name))
    return TaskState.succeeded


def _queue_class(ctx: CatalogContext, job_id: str, name: str) -> str:
    with Session(ctx.engine) as session:
        task = session.get(JobTask, (job_id, name))
        return task.queue_class if task is not None else "cpu"


def _task_succeeded(ctx: CatalogContext, kind: JobKind, job: Job, run: TaskRun, result: dict[str, Any]) -> list[str] | None:
    """Record the result and queue what it made ready, under the job's row lock; None when the
    job ended meanwhile (failed by another task, cancelled): then its work is abandoned."""
    with session_scope(ctx.engine) as session:
        current = session.get(Job, job.id, with_for_update=True)
        if current is None or (current.status.finished and not run.completed):
            ended = True
            mine = session.get(JobTask, (job.id, run.name))
            if mine is not None and mine.state == TaskState.running:  # its work is not used: say why
                mine.state, mine.finished_at = TaskState.revoked, _now()
                mine.error = f"its job was {'deleted' if current is None else current.status.value} before it finished"
        else:
            ended = False
            tasks = session.exec(select(JobTask).where(JobTask.job_id == job.id)).all()
            mine = next(t for t in tasks if t.name == run.name)
            if not run.completed:
                mine.state, mine.result, mine.progress, mine.finished_at = TaskState.succeeded, result, 1.0, _now()
                if run.final:  # the handler did not finish the job itself
                    current.status, current.result, current.progress, current.finished_at = JobStatus.succeeded, result, 1.0, _now()
                    current.step = None
            ready = _queue_ready(tasks) if not run.final else []
            if current.status == JobStatus.running:
                current.progress = round(_aggregate(tasks), 4)
    if ended:
        _abandon(ctx, kind, job)
        return None
    return ready


def _task_failed(ctx: CatalogContext, kind: JobKind, job: Job, name: str, exc: BaseException, *, retry_transient: bool) -> TaskState:
    transient = transient_error(exc) if retry_transient else None
    if transient is not None:
        log.warning("task %s of job %s will be retried: %s", name, job.id, transient)
        try:
            with session_scope(ctx.engine) as session:
                task = session.get(JobTask, (job.id, name))
                if task is not None and task.state == TaskState.running:
                    task.state, task.error = TaskState.queued, f"will retry: {transient}"
        except Exception as db_exc:  # the database may be what is down; the next try marks it running again
            log.warning("could not put task %s of job %s back to queued: %s", name, job.id, db_exc)
        if transient is exc:
            raise exc
        raise transient from exc
    if isinstance(exc, JobCancelled):
        with session_scope(ctx.engine) as session:
            task = session.get(JobTask, (job.id, name))
            if task is not None and task.state == TaskState.running:
                task.state, task.error, task.finished_at = TaskState.revoked, str(exc), _now()
        _abandon(ctx, kind, job)
        return TaskState.revoked
    if isinstance(exc, NDSError):
        reason = str(exc)
        log.info("task %s of job %s failed: %s", name, job.id, reason)
    elif isinstance(exc, Exception):
        reason = f"{type(exc).__name__}: {exc}"
        log.error("task %s of job %s crashed:\n%s", name, job.id, traceback.format_exc())
    else:  # KeyboardInterrupt, SystemExit: the process is going away; the task is redelivered
        raise exc
    fail_graph(ctx, job.id, reason=f"task {name}: {reason}", task=name, task_error=reason)
    undo_job(ctx, kind, job)
    _abandon(ctx, kind, job)
    return TaskState.failed


def fail_graph(ctx: CatalogContext, job_id: str, *, reason: str, status: JobStatus = JobStatus.failed,
               task: str | None = None, task_error: str | None = None) -> bool:
    """End a job (failed or cancelled) and revoke its tasks that have not run; False when it had
    already ended. A running task is left to notice (its next progress report raises)."""
    with session_scope(ctx.engine) as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.status.finished:
            return False
        now = _now()
        job.status, job.error, job.finished_at = status, reason, now
        for t in session.exec(select(JobTask).where(JobTask.job_id == job_id)).all():
            if t.name == task:
                t.state, t.error, t.finished_at = TaskState.failed, task_error, now
            elif t.state in (TaskState.pending, TaskState.queued):
                t.state, t.finished_at = TaskState.revoked, now
    return True


def _abandon(ctx: CatalogContext, kind: JobKind, job: Job) -> None:
    if kind.graph is not None and kind.graph.abandon is not None:
        try:
            kind.graph.abandon(ctx, job)
        except Exception:
            log.error("cleaning up after job %s (%s) failed:\n%s", job.id, job.kind, traceback.format_exc())


# --------------------------------------------------------------------------- in-process runner


def run_graph_inline(ctx: CatalogContext, job_id: str, ready: list[str], *, worker: str | None = None) -> None:
    """Run a planned job's tasks in this process, in order, until it ends (the embedded
    default and the CLI): the same tasks and the same joins as on the workers."""
    queue = list(ready)
    while queue:
        name = queue.pop(0)
        state = run_task(ctx, job_id, name, send=None, worker=worker)
        if state != TaskState.succeeded:
            return
        with Session(ctx.engine) as session:
            job = session.get(Job, job_id)
            if job is None or job.status.finished:
                return
            tasks = session.exec(select(JobTask).where(JobTask.job_id == job_id)).all()
            queue = [t.name for t in sorted(tasks, key=lambda t: _order_key(t.name)) if t.state == TaskState.queued]


# --------------------------------------------------------------------------- reading and recovery


def _aggregate(tasks: Sequence[JobTask]) -> float:
    total = sum(t.weight for t in tasks) or 1.0
    return sum(t.weight * (1.0 if t.state == TaskState.succeeded else t.progress if t.state == TaskState.running else 0.0)
               for t in tasks) / total


def job_tasks(session: Session, job_id: str) -> list[JobTask]:
    return sorted(session.exec(select(JobTask).where(JobTask.job_id == job_id)).all(), key=lambda t: _order_key(t.name))


def task_views(tasks: Sequence[JobTask], *, now: datetime | None = None) -> list[JobTaskPublic]:
    now = now or _now()
    views = []
    for t in tasks:
        seconds = None
        if t.started_at is not None:
            end = t.finished_at or (now if t.state == TaskState.running else None)
            if end is not None:
                seconds = round(max((_aware(end) - _aware(t.started_at)).total_seconds(), 0.0), 2)
        fields = {name: getattr(t, name) for name in JobTaskPublic.model_fields if name != "seconds"}
        views.append(JobTaskPublic.model_validate({**fields, "state": TaskState(t.state), "seconds": seconds}))
    return views


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def orphaned_tasks(ctx: CatalogContext, *, host: str, alive: Callable[[int], bool]) -> list[tuple[str, str, str]]:
    """(job id, task name, queue class) of tasks marked running by a dead process of ``host``,
    of jobs still running: a worker restarting on that host sends them again at once (instead
    of waiting for the broker's visibility timeout)."""
    with session_scope(ctx.engine) as session:
        rows = session.exec(
            select(JobTask).join(Job, col(Job.id) == col(JobTask.job_id))
            .where(JobTask.state == TaskState.running, col(JobTask.worker).like(f"{host}:%"), Job.status == JobStatus.running)
        ).all()
        found = []
        for task in rows:
            if job_process_dead(Job(id=task.job_id, kind="", worker=task.worker), host=host, alive=alive):
                task.state = TaskState.queued
                found.append((task.job_id, task.name, task.queue_class))
        return found


def job_view(session: Session, job: Job) -> JobPublic:
    """A job as the API and ``nds jobs show`` return it: with its tasks (state, worker,
    seconds) and, while a graph runs, the progress aggregated over them."""
    view = JobPublic.model_validate(job)
    tasks = job_tasks(session, job.id)
    if tasks:
        view.tasks = task_views(tasks)
        if not job.status.finished:
            view.progress = round(_aggregate(tasks), 4)
    return view
