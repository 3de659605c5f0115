"""/v1/jobs: the state of long-running work (registration, indexing)."""

from __future__ import annotations

from fastapi import APIRouter

from nds.api.deps import AdminDep, SessionDep
from nds.catalog.jobs import get_job
from nds.catalog.tables import JobPublic

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobPublic)
def show_job(job_id: str, session: SessionDep, _: AdminDep) -> JobPublic:
    """Status (queued, running, succeeded, failed), current step, progress 0..1, error, result."""
    return JobPublic.model_validate(get_job(session, job_id))
