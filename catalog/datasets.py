"""The dataset repository: look up, list, page and delete datasets and their samples."""

from __future__ import annotations

import re

from sqlalchemy import delete, func
from sqlmodel import Session, select

from nds.catalog.access import LOCAL, MAX_ID, Principal, is_id_ref, visible_clause
from nds.catalog.context import CatalogContext
from nds.catalog.db import session_scope
from nds.catalog.tables import Assignment, Cluster, Dataset, DatasetStatus, Expert, Group, Sample
from nds_client.errors import ConflictError, InvalidInputError, NotFoundError

#: a dataset name, matched whole (``fullmatch``: ``$`` would also accept a final newline)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
BUSY = (DatasetStatus.registering, DatasetStatus.indexing)


def check_name(name: str) -> None:
    """A new dataset's name: 1-128 of ``[A-Za-z0-9._-]``, starting with a letter or digit, and
    not all digits (an all-digit reference is a dataset id, see :func:`find_dataset`)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidInputError(
            f"invalid dataset name {name!r}",
            field="name",
            hint="use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    if name.isdigit():
        raise InvalidInputError(
            f"invalid dataset name {name!r}: a name may not be all digits",
            field="name",
            hint=f"an all-digit reference means a dataset id; add a letter, e.g. 'ds-{name}'",
        )


def get_dataset(*, session: Session, dataset_id: int, principal: Principal = LOCAL) -> Dataset:
    """One dataset; a dataset ``principal`` may not see does not exist for it (404, not 403).

    One query with the visibility condition in it, whether the dataset is missing, hidden
    or visible: a hidden one costs the same work as a missing one, so its answer time
    does not tell it apart."""
    query = select(Dataset).where(Dataset.id == dataset_id)
    clause = visible_clause(principal)
    if clause is not None:
        query = query.where(clause)
    dataset = session.exec(query).first()
    if dataset is None:
        raise NotFoundError(f"no dataset with id {dataset_id}", hint="'nds datasets list' shows the registered ones")
    return dataset


def find_dataset(*, session: Session, ref: str) -> Dataset:
    """A dataset by id or by name: an all-digit ``ref`` is an id, anything else a name.

    New names may not be all digits (:func:`check_name`); a catalog that holds one from
    before that rule still finds it by name, but only when no dataset has that id."""
    if is_id_ref(ref):
        dataset = session.get(Dataset, int(ref)) if int(ref) <= MAX_ID else None
        if dataset is None:  # an all-digit name registered before names had to hold a letter
            dataset = session.exec(select(Dataset).where(Dataset.name == str(ref))).first()
        if dataset is None:
            raise NotFoundError(
                f"no dataset with id {ref}",
                hint="an all-digit reference is a dataset id; 'nds datasets list' shows the ids and names",
            )
        return dataset
    dataset = session.exec(select(Dataset).where(Dataset.name == ref)).first()
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
    """Remove a dataset's rows and vectors, then collect the artifact store's garbage: its
    experts' files at once, other unreferenced files (its published backbone, if no other
    dataset uses it) after the grace period (:mod:`nds.catalog.artifact_gc`). Its source files stay."""
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
        released = set(session.exec(select(Expert.artifact).where(Expert.dataset_id == dataset_id)).all())
        if dataset.backbone:
            from nds.catalog.spaces import PUBLISHED

            released.update((f"{PUBLISHED}/{dataset.backbone}.onnx", f"{PUBLISHED}/{dataset.backbone}.json"))
        purge_rows(session, dataset_id)
        session.delete(dataset)
    from nds.catalog.artifact_gc import collect_after_delete

    collect_after_delete(ctx, released)  # what no other row refers to; never fails the delete
    return dataset


def purge_rows(session: Session, dataset_id: int) -> None:
    """Delete everything that hangs off a dataset row (explicitly, whatever the database's FK settings)."""
    for table in (Assignment, Group, Expert, Cluster, Sample):
        session.exec(delete(table).where(table.dataset_id == dataset_id))
