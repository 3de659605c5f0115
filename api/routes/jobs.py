"""/v1/jobs: the state of long-running work (registration, indexing, sync), and cancelling it."""

from __future__ import annotations

from fastapi import APIRouter

from nds.api.deps import AdminDep, CtxDep, SessionDep
from nds.catalog.jobs import cancel_job, get_job
from nds.catalog.tables import JobPublic
from nds.catalog.task_graph import job_view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobPublic)
def show_job(job_id: str, session: SessionDep, _: AdminDep) -> JobPublic:
    """Status (queued, running, succeeded, failed, cancelled), current step, progress 0..1, error,
    result; for a job that runs as a graph of tasks (indexing), each task's state, worker and
    seconds, and the progress over all of them."""
    return job_view(session, get_job(session, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel(job_id: str, ctx: CtxDep, session: SessionDep, principal: AdminDep) -> JobPublic:
    """Cancel a queued or running job: what has not run is revoked, a running task stops at its
    next progress report, and the dataset is left as it was before the job (409 once it ended)."""
    job = cancel_job(ctx, job_id, by=f"key {principal.name!r}")
    session.expire_all()
    return job_view(session, get_job(session, job.id))
