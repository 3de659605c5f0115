"""Weighted retrieval against the catalog: resolve a request's experts and datasets, weigh, sample, store.

The steps live in their own modules: :mod:`~nds.catalog.retrieval.request` (what a query asks
for and its validation), :mod:`~nds.catalog.retrieval.weights` (scores x priors -> group
masses), :mod:`~nds.catalog.retrieval.sampling` (masses -> picks), :mod:`~nds.catalog.retrieval.recipe`
(the transfer recipe), :mod:`~nds.catalog.retrieval.picks` (the picks file) and
:mod:`~nds.catalog.retrieval.manifest` (picks -> manifest rows). This module is the SQL
around them: :func:`build_groups`, :func:`run_query`, :func:`get_query`.

Same request + seed + index versions = the same picks, so the same manifest byte for byte.
"""

from __future__ import annotations

import uuid
from contextlib import suppress
from dataclasses import fields
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Connection, bindparam, insert, select
from sqlmodel import Session, col

from nds.catalog.access import LOCAL, Principal, visible_dataset_ids
from nds.catalog.context import CatalogContext
from nds.catalog.retrieval.picks import save_picks
from nds.catalog.retrieval.recipe import recommend_recipe
from nds.catalog.retrieval.request import DEFAULT_TEMPERATURE, QueryRequest, field_error, validate_request
from nds.catalog.retrieval.sampling import Picks, sample_groups
from nds.catalog.retrieval.weights import GroupTable, group_masses
from nds.catalog.tables import Dataset, Expert, ExpertKind, Query
from nds_client.errors import NotFoundError


class Groups(NamedTuple):
    """What a query weighs: the group table and what it was built from."""

    table: GroupTable
    versions: dict[int, int]                   # index version used, per dataset
    names: dict[int, str]                      # dataset names
    ignored: list[int]                         # scored experts left out (classifiers have no cluster)
    cluster_scores: dict[tuple[int, int], float]  # (dataset, cluster) -> the score of its rotation expert


# the two lookups of a query, built once (SQLAlchemy caches their compiled form)
_EXPERTS_WITH_DATASETS = (
    select(col(Expert.id), col(Expert.dataset_id), col(Expert.kind), col(Expert.cluster), col(Expert.index_version), col(Dataset.name),
           col(Dataset.index_version))
    .join(Dataset, col(Dataset.id) == col(Expert.dataset_id))
    .where(col(Expert.id).in_(bindparam("ids", expanding=True)))
)
_INSERT_QUERY = insert(Query)
_DATASETS = select(col(Dataset.id), col(Dataset.name), col(Dataset.index_version)).where(col(Dataset.id).in_(bindparam("ids", expanding=True)))


def build_groups(
    ctx: CatalogContext, conn: Connection, request: QueryRequest, *, principal: Principal = LOCAL
) -> Groups:
    """Resolve experts and datasets, take the G groups of the active index versions, compute masses.

    Returns :class:`Groups`: the group table, the index version used per dataset, dataset
    names, the expert ids ignored (classifiers: they have no cluster) and the rotation
    experts' scores per (dataset, cluster). Experts and datasets that
    ``principal`` may not see are unknown to it.
    """
    temperature = request.temperature or DEFAULT_TEMPERATURE
    experts: dict[int, tuple[int, str, int | None, int]] = {}
    names: dict[int, str] = {}
    versions: dict[int, int] = {}
    if request.expert_scores:
        ids = list(request.expert_scores)
        rows = conn.execute(_EXPERTS_WITH_DATASETS, {"ids": ids}).all()  # experts and their datasets, one round trip
        visible = visible_dataset_ids(session=conn, principal=principal, among=sorted({r[1] for r in rows}))
        for eid, did, expert_kind, cluster, version, name, current in rows:
            assert eid is not None  # a primary key read back from the table (SQLModel types it Optional for unsaved rows)
            if visible is None or did in visible:
                experts[eid] = (did, expert_kind.value if isinstance(expert_kind, ExpertKind) else str(expert_kind), cluster, version)
                names[did] = name
                versions[did] = current
        unknown = [i for i in ids if i not in experts]
        if unknown:
            raise field_error(f"unknown expert ids: {unknown[:10]}", "expert_scores", "GET /v1/experts lists the current experts; pull them again")
    dataset_ids = {e[0] for e in experts.values()} | set((request.label_priors or {}).keys())
    if request.datasets is not None:
        dataset_ids &= set(request.datasets)
        if not dataset_ids:
            raise field_error("no scored expert or label prior belongs to the datasets asked for", "datasets")
    names = {d: n for d, n in names.items() if d in dataset_ids}
    versions = {d: v for d, v in versions.items() if d in dataset_ids}
    if dataset_ids - set(names):  # datasets named only by label priors
        found: list[tuple[int, str, int]] = []
        for found_id, name, current in conn.execute(_DATASETS, {"ids": sorted(dataset_ids - set(names))}).all():
            assert found_id is not None  # a primary key read back from the table
            found.append((found_id, name, current))
        visible = visible_dataset_ids(session=conn, principal=principal, among=[r[0] for r in found])
        if visible is not None:
            found = [r for r in found if r[0] in visible]
        names.update((r[0], r[1]) for r in found)
        versions.update((r[0], r[2]) for r in found)
    missing = sorted(dataset_ids - set(names))
    if missing:
        raise field_error(f"unknown dataset ids: {missing}", "label_priors" if request.label_priors else "datasets")
    for did, version in versions.items():
        if version < 1:
            raise field_error(f"dataset {names[did]!r} is not indexed yet", "datasets", f"run 'nds index {names[did]}' first")
    ignored: list[int] = []
    cluster_scores: dict[tuple[int, int], float] = {}
    rotation = ExpertKind.rotation.value
    for eid, (did, kind, cluster, version) in experts.items():
        if did not in versions:
            continue  # filtered out by request.datasets
        if kind != rotation:
            ignored.append(eid)
            continue
        assert cluster is not None  # rotation experts are always written with their cluster (nds.catalog.indexing)
        if version != versions[did]:
            raise field_error(
                f"expert {eid} belongs to index version {version} of dataset {names[did]!r}, which is now at version {versions[did]}",
                f"expert_scores.{eid}",
                "pull the experts again and re-score",
            )
        cluster_scores[(did, cluster)] = float(request.expert_scores[eid])
    if request.expert_scores and not cluster_scores and not request.label_priors:
        raise field_error("none of the scored experts is a rotation expert of the datasets asked for", "expert_scores")

    layout = ctx.groups.layout(conn, versions)  # cached per set of (dataset, index version)
    per_dataset = layout.datasets
    for did, priors in (request.label_priors or {}).items():
        if did in per_dataset:
            unknown_labels = sorted(set(priors) - per_dataset[did].labels)
            if unknown_labels:
                raise field_error(f"dataset {names[did]!r} has no labels {unknown_labels[:10]}", f"label_priors.{did}",
                                  f"its labels are: {', '.join(sorted(per_dataset[did].labels)[:20])}")
    mass = group_masses(layout, cluster_scores, request.label_priors, temperature)
    total = float(mass.sum())
    if total <= 0:
        raise field_error("the scores and priors give no sample any weight", "label_priors" if request.label_priors else "expert_scores",
                          "check that the priors name labels the scored clusters contain")
    table = GroupTable(layout.dataset_id, layout.cluster, layout.label, layout.size, mass / total,
                       cell_index=(layout.cells, layout.cell_of))
    return Groups(table, versions, names, sorted(ignored), cluster_scores)


def summarize(groups: Groups, picks: Picks, request: QueryRequest) -> dict[str, Any]:
    table, datasets, ignored = groups.table, groups.names, groups.ignored
    selected, unique = picks.selected, picks.unique
    cells, inverse = table.cells()  # groups aggregate to (dataset, cluster) cells
    C = len(cells)
    cell_selected = np.bincount(inverse, weights=selected, minlength=C).astype(np.int64).tolist()
    cell_unique = np.bincount(inverse, weights=unique, minlength=C).astype(np.int64).tolist()
    cell_mass = np.bincount(inverse, weights=table.mass, minlength=C)
    cell_size = np.bincount(inverse, weights=table.size, minlength=C).astype(np.int64).tolist()
    per_dataset: dict[int, dict[str, Any]] = {}
    for i, (d, c), m in zip(range(C), cells.tolist(), np.round(cell_mass, 6).tolist()):
        entry = per_dataset.get(d)
        if entry is None:
            entry = per_dataset[d] = {"dataset_id": d, "dataset": datasets.get(d, str(d)), "selected": 0, "unique": 0, "mass": 0.0, "clusters": []}
        entry["clusters"].append({"cluster": c, "selected": cell_selected[i], "unique": cell_unique[i], "mass": m, "size": cell_size[i]})
        entry["selected"] += cell_selected[i]
        entry["unique"] += cell_unique[i]
    for (d, _), m in zip(cells.tolist(), cell_mass.tolist()):
        per_dataset[d]["mass"] += m
    for entry in per_dataset.values():
        entry["mass"] = round(entry["mass"], 6)
    weighted = table.mass > 0
    ess = 1.0 / float(np.sum(table.mass[weighted] ** 2 / table.size[weighted])) if weighted.any() else 0.0
    with_weight = int(table.size[weighted].sum())
    notes = []
    if not request.replacement and request.budget > with_weight:
        notes.append(f"budget capped at {with_weight}: only that many samples have weight and no sample repeats")
    return {
        "budget": request.budget,
        "selected": int(selected.sum()),
        "unique_samples": int(len(picks.rank)),
        "samples_with_weight": with_weight,
        "effective_sample_size": round(ess, 2),
        "replacement": request.replacement,
        "temperature": request.temperature or DEFAULT_TEMPERATURE,
        "seed": request.seed,
        "ignored_experts": ignored,
        "notes": notes,
        "datasets": sorted(per_dataset.values(), key=lambda x: -x["mass"]),
        "recommendation": recommend_recipe(request, groups.cluster_scores, datasets),
    }


def run_query(ctx: CatalogContext, request: QueryRequest, *, principal: Principal = LOCAL) -> Query:
    """Validate, weigh, sample, store the picks and the query; nothing is stored on bad input.
    The query belongs to ``principal``'s key and sees only the datasets it may see."""
    validate_request(request, max_budget=ctx.settings.max_budget)
    with ctx.autocommit_engine.connect() as conn:  # reads only
        groups = build_groups(ctx, conn, request, principal=principal)
    table, versions = groups.table, groups.versions
    picks = sample_groups(table, request.budget, replacement=request.replacement, seed=request.seed)
    summary = summarize(groups, picks, request)
    query = Query(
        id=str(uuid.uuid4()),
        request=_request_json(request),
        index_versions={str(k): v for k, v in sorted(versions.items())},
        summary=summary,
        key_id=principal.key_id,
    )
    key = save_picks(ctx, query.id, table, picks)
    try:
        with ctx.autocommit_engine.connect() as conn:  # one statement: atomic on its own
            conn.execute(_INSERT_QUERY, {"id": query.id, "request": query.request, "index_versions": query.index_versions,
                                         "summary": query.summary, "key_id": query.key_id, "created_at": query.created_at})
    except BaseException:
        with suppress(OSError):  # no row refers to the file: remove it now, not at the next gc
            ctx.artifacts.delete(key)
        raise
    return query


def _request_json(request: QueryRequest) -> dict[str, Any]:
    data = {f.name: getattr(request, f.name) for f in fields(request)}  # shallow: asdict deep-copies every score
    data["expert_scores"] = {str(k): v for k, v in request.expert_scores.items()}
    if request.label_priors is not None:
        data["label_priors"] = {str(k): dict(v) for k, v in request.label_priors.items()}
    if request.datasets is not None:
        data["datasets"] = list(request.datasets)
    return data


def get_query(*, session: Session, query_id: str, principal: Principal = LOCAL) -> Query:
    """A query, for admins and the key that made it, while that key may still see all its datasets."""
    query = session.get(Query, query_id)
    if query is not None and not principal.is_admin:
        datasets = [int(d) for d in query.index_versions]
        visible = visible_dataset_ids(session=session, principal=principal, among=datasets)
        if query.key_id != principal.key_id or (visible is not None and len(visible) < len(datasets)):
            query = None
    if query is None:
        raise NotFoundError(f"no query {query_id}", hint="queries are visible to the key that made them")
    return query
