"""The dataset repository: look up, list, page and delete datasets and their samples."""

from __future__ import annotations

import re

from sqlalchemy import delete, func
from sqlmodel import Session, select

from catalog.access import LOCAL, Principal, can_see, visible_clause
from catalog.context import CatalogContext
from catalog.db import session_scope
from catalog.errors import ConflictError, InvalidInputError, NotFoundError
from catalog.models import Assignment, Cluster, Dataset, DatasetStatus, Expert, Group, Sample

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
BUSY = (DatasetStatus.registering, DatasetStatus.indexing)


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise InvalidInputError(
            f"invalid dataset name {name!r}",
            field="name",
            hint="use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )


def get_dataset(*, session: Session, dataset_id: int, principal: Principal = LOCAL) -> Dataset:
    """One dataset; a dataset ``principal`` may not see does not exist for it (404, not 403)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or (dataset.restricted and not can_see(session=session, principal=principal, dataset_id=dataset_id)):
        raise NotFoundError(f"no dataset with id {dataset_id}", hint="'nds datasets list' shows the registered ones")
    return dataset


def get_dataset_by_name(*, session: Session, name: str) -> Dataset:
    dataset = session.exec(select(Dataset).where(Dataset.name == name)).first()
    if dataset is None:
        raise NotFoundError(f"no dataset named {name!r}", hint="'nds datasets list' shows the registered ones")
    return dataset


def find_dataset(*, session: Session, ref: str) -> Dataset:
    """A dataset by name, or by id when ``ref`` is a number that is not also a name."""
    dataset = session.exec(select(Dataset).where(Dataset.name == ref)).first()
    if dataset is None and ref.isdigit():
        dataset = session.get(Dataset, int(ref))
    if dataset is None:
        raise NotFoundError(f"no dataset named {ref!r}", hint="'nds datasets list' shows the registered ones")
    return dataset


def list_datasets(*, session: Session, offset: int = 0, limit: int = 100, principal: Principal = LOCAL) -> tuple[list[Dataset], int]:
    count_query, rows_query = select(func.count()).select_from(Dataset), select(Dataset)
    clause = visible_clause(principal)
    if clause is not None:
        count_query, rows_query = count_query.where(clause), rows_query.where(clause)
    count = session.exec(count_query).one()
    rows = session.exec(rows_query.order_by(Dataset.id).offset(offset).limit(limit)).all()
    return list(rows), count


def list_samples(*, session: Session, dataset_id: int, offset: int = 0, limit: int = 100, principal: Principal = LOCAL) -> tuple[list[Sample], int]:
    dataset = get_dataset(session=session, dataset_id=dataset_id, principal=principal)
    rows = session.exec(
        select(Sample).where(Sample.dataset_id == dataset_id).order_by(Sample.position).offset(offset).limit(limit)
    ).all()
    return list(rows), dataset.num_samples


def list_clusters(*, session: Session, dataset_id: int, principal: Principal = LOCAL) -> list[Cluster]:
    dataset = get_dataset(session=session, dataset_id=dataset_id, principal=principal)
    return list(
        session.exec(
            select(Cluster).where(Cluster.dataset_id == dataset_id, Cluster.index_version == dataset.index_version).order_by(Cluster.cluster)
        ).all()
    )


def delete_dataset(*, ctx: CatalogContext, dataset_id: int) -> Dataset:
    """Remove a dataset's rows and vectors; its source files and artifacts stay."""
    with session_scope(ctx.engine) as session:
        dataset = get_dataset(session=session, dataset_id=dataset_id)
        if dataset.status in BUSY:
            raise ConflictError(
                f"dataset {dataset.name!r} is {dataset.status.value}", hint="wait for its job to finish, then delete it"
            )
        indexed = dataset.index_version > 0
    if indexed:
        ctx.vectors.delete_dataset(dataset_id)
    with session_scope(ctx.engine) as session:
        dataset = get_dataset(session=session, dataset_id=dataset_id)
        purge_rows(session, dataset_id)
        session.delete(dataset)
    return dataset


def purge_rows(session: Session, dataset_id: int) -> None:
    """Delete everything that hangs off a dataset row (explicitly, whatever the database's FK settings)."""
    for table in (Assignment, Group, Expert, Cluster, Sample):
        session.exec(delete(table).where(table.dataset_id == dataset_id))
