"""Similarity search by example: the k nearest source samples to given embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlmodel import Session, col, select

from nds.catalog.access import LOCAL, Principal, visible_clause
from nds.catalog.context import CatalogContext
from nds.catalog.tables import Assignment, Dataset, Sample
from nds.catalog.vectors import collection_name
from nds_client.errors import InvalidInputError


def search(
    ctx: CatalogContext, *, vectors: Sequence[Sequence[float]], k: int, datasets: Sequence[int] | None = None, backbone: str | None = None,
    principal: Principal = LOCAL,
) -> dict[str, Any]:
    """k nearest samples per vector among the indexed datasets ``principal`` may see."""
    with Session(ctx.engine) as session:
        query = select(Dataset).where(Dataset.index_version > 0)
        clause = visible_clause(principal)
        if clause is not None:
            query = query.where(clause)
            if datasets is None:  # never search what this key may not see
                visible_ids: list[int] = []
                for d in session.exec(query).all():
                    assert d.id is not None  # a primary key read back from the table (SQLModel types it Optional for unsaved rows)
                    visible_ids.append(d.id)
                datasets = visible_ids
        indexed = session.exec(query).all()
        spaces = sorted({d.backbone for d in indexed if d.backbone})
        if backbone is None:
            pool = [d for d in indexed if datasets is None or d.id in datasets]
            pool_spaces = sorted({d.backbone for d in pool if d.backbone})
            if not pool_spaces:
                raise InvalidInputError("no indexed dataset to search", field="datasets", hint="index a dataset first")
            if len(pool_spaces) > 1:
                raise InvalidInputError(f"the datasets live in several embedding spaces: {pool_spaces}", field="backbone", hint="name one backbone version")
            backbone = pool_spaces[0]
        elif backbone not in spaces:
            raise InvalidInputError(f"unknown backbone version {backbone!r}; known: {spaces}", field="backbone")
        names = {d.id: d.name for d in indexed}
        if datasets is not None:
            unknown = sorted(set(datasets) - set(names))
            if unknown:
                raise InvalidInputError(f"unknown or unindexed dataset ids: {unknown}", field="datasets")
    collection = collection_name(backbone)
    if len({len(v) for v in vectors}) > 1:
        raise InvalidInputError("vectors must all have the same length", field="vectors")
    matrix = np.asarray(vectors, dtype=np.float64)
    if matrix.ndim != 2:
        raise InvalidInputError("vectors must be a list of equal-length lists of numbers", field="vectors")
    if not np.isfinite(matrix).all() or np.abs(matrix).max(initial=0.0) > np.finfo(np.float32).max:
        raise InvalidInputError("vectors must hold finite numbers within float32's range", field="vectors")
    matrix = matrix.astype(np.float32)
    results = []
    with ctx.vectors.session(collection):
        for vector in matrix:
            results.append(ctx.vectors.search(collection, vector, k, dataset_ids=list(datasets) if datasets is not None else None))
    ids = sorted({h.id for hits in results for h in hits})
    # the cluster of a hit is its assignment in its dataset's active index version: the
    # catalog says which version is active, never the vector payload (an index run that
    # failed or was abandoned may have written points, never an active assignment)
    found: dict[int, tuple[str, int]] = {}
    if ids:
        with Session(ctx.engine) as session:
            rows = session.exec(
                select(Sample.id, Sample.uri, Assignment.cluster)
                .join(Dataset, col(Dataset.id) == col(Sample.dataset_id))
                .join(Assignment, (col(Assignment.sample_id) == col(Sample.id)) & (col(Assignment.index_version) == col(Dataset.index_version)))
                .where(col(Sample.id).in_(ids), Dataset.backbone == backbone)  # the dataset's active space, not a new one being indexed
            ).all()
            show = ctx.shown_uri(principal)  # client keys see uris relative to the data roots
            for sid, uri, cluster in rows:
                assert sid is not None  # a primary key read back from the table
                found[sid] = (show(uri), cluster)
    return {
        "backbone": backbone,
        "results": [
            [
                {"sample_id": h.id, "score": h.score, "dataset_id": h.payload["dataset_id"], "dataset": names.get(h.payload["dataset_id"], ""),
                 "label": h.payload.get("label"), "cluster": found[h.id][1], "uri": found[h.id][0]}
                for h in hits if h.id in found
            ]
            for hits in results
        ],
    }
