"""The expert repository: the networks of each dataset's active index version."""

from __future__ import annotations

from sqlalchemy import and_, func
from sqlmodel import Session, select

from nds.catalog.access import LOCAL, Principal, can_see, visible_clause
from nds.catalog.tables import Dataset, Expert, ExpertKind
from nds_client.errors import NotFoundError


def _active():  # noqa: ANN202 - a SQL condition
    return and_(Expert.dataset_id == Dataset.id, Expert.index_version == Dataset.index_version)


def list_experts(
    *, session: Session, dataset_id: int | None = None, kind: ExpertKind | None = None, offset: int = 0, limit: int = 1000,
    principal: Principal = LOCAL,
) -> tuple[list[Expert], int]:
    """Experts of the active index version of every (or one) dataset ``principal`` may see, by id."""
    query = select(Expert).join(Dataset, _active())
    count = select(func.count()).select_from(Expert).join(Dataset, _active())
    clause = visible_clause(principal)
    if clause is not None:
        query, count = query.where(clause), count.where(clause)
    if dataset_id is not None:
        query = query.where(Expert.dataset_id == dataset_id)
        count = count.where(Expert.dataset_id == dataset_id)
    if kind is not None:
        query = query.where(Expert.kind == kind)
        count = count.where(Expert.kind == kind)
    rows = session.exec(query.order_by(Expert.id).offset(offset).limit(limit)).all()
    return list(rows), session.exec(count).one()


def get_expert(*, session: Session, expert_id: int, principal: Principal = LOCAL) -> Expert:
    expert = session.get(Expert, expert_id)
    if expert is None or not can_see(session=session, principal=principal, dataset_id=expert.dataset_id):
        raise NotFoundError(f"no expert with id {expert_id}", hint="GET /v1/experts lists the current ones")
    return expert
