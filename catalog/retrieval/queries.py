"""Weighted retrieval: expert scores x label priors -> importance weights -> a sampled subset.

The weights (also in the README):

1. **Scores -> cluster probabilities.** The scores of the rotation experts that were
   scored are min-max normalised to [0, 1] (all equal scores -> all 1, never a division
   by zero) and turned into probabilities over their clusters by a softmax with
   temperature T (default :data:`DEFAULT_TEMPERATURE` = 0.1): ``p_k = softmax(s'_k / T)``.
   Experts that were not scored get no mass. With T = 0.1 an expert's mass halves for
   every 0.069 it lies below the best on the normalised scale, so the mass spreads over
   all the experts that score close to the best and collapses onto one only when the
   scores say one expert is far ahead (the original service's T = 0.01 put ~99% on one
   cluster whatever the gaps).
2. **Samples of cluster k** get ``p_k / |k|``; with label priors for their dataset, times
   ``P_t(y) / P_s(y)``, where ``P_s(y)`` is label y's share of the dataset. Samples without
   a label keep factor 1. Priors alone (no scores) give every dataset with priors the
   same mass, spread inside it by ``P_t(y) / P_s(y)``.
3. **Groups.** Weights are constant inside a group ``g = (dataset, cluster, label)``, so
   the sampler works on the G group masses ``m_g = sum of w over g``: it draws group counts
   (multinomial with replacement; without replacement it fills groups in proportion
   and spills over when a group runs out, with the budget capped at the number of
   samples that have weight), then picks samples inside each group by rank. Cost
   O(G + B), independent of N; nothing per-sample is read until a manifest is exported.

Same request + seed + index versions = the same picks, so the same manifest byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Connection, bindparam, insert, tuple_
from sqlmodel import Session, select

from nds.catalog.access import LOCAL, Principal, visible_dataset_ids
from nds.catalog.context import CatalogContext
from nds.catalog.retrieval.groups import group_cells
from nds.catalog.tables import Assignment, Dataset, Expert, ExpertKind, Group, Query, Sample
from nds_client.errors import ArtifactError, ConflictError, GoneError, InvalidInputError, NotFoundError

DEFAULT_TEMPERATURE = 0.1
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3  # normalised scores lie in [0, 1]: exp(1 / T) stays finite
PRIOR_TOLERANCE = 1e-3
LARGE_TARGET = 1000          # images: above this, fine-tuning beats a linear probe (cs231n)
SIMILAR_ROTATION_SCORE = 0.5  # rotation accuracy (chance 0.25) above which the domain counts as similar
SIMILAR_PROBE_SCORE = 0.8     # linear-probe accuracy above which the features count as transferable
SIMILAR_EMBEDDING_SHARE = 0.5  # share of the target nearest one cluster above which the domain counts as close
PICKS_PREFIX = "queries"


@dataclass(frozen=True)
class QueryRequest:
    expert_scores: dict[int, float] = field(default_factory=dict)
    label_priors: dict[int, dict[str, float]] | None = None
    budget: int = 1000
    replacement: bool = True
    temperature: float | None = None
    datasets: list[int] | None = None
    seed: int = 0
    target_size: int | None = None       # number of target images, for the recipe
    score_method: str | None = None      # "rotation" or "linear-probe", for the recipe


@dataclass
class GroupTable:
    """The G groups a query samples from, with their masses."""

    dataset_id: np.ndarray    # int64 (G,)
    cluster: np.ndarray       # int64 (G,)
    label: Sequence[str | None]  # (G,)
    size: np.ndarray          # int64 (G,)
    mass: np.ndarray          # float64 (G,), sums to 1
    cell_index: tuple[np.ndarray, np.ndarray] | None = None  # cells(), when the layout already knows them

    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, 2) array of the distinct (dataset_id, cluster) pairs, sorted, and each group's row in it."""
        return self.cell_index if self.cell_index is not None else group_cells(self.dataset_id, self.cluster)

    @property
    def weight(self) -> np.ndarray:
        """Per-sample weight inside each group (mass / size)."""
        return np.where(self.size > 0, self.mass / np.maximum(self.size, 1), 0.0)


@dataclass
class Picks:
    """What a query selected: each picked (group, rank) once, with how many times it was drawn.

    Sorted by group, then rank: the picks of group g are the ``unique[g]`` rows after those
    of groups 0..g-1, so a pick's group follows from the per-group numbers.
    """

    rank: np.ndarray      # int (U,): rank inside its group
    count: np.ndarray     # int (U,): draws of this sample (1 without replacement)
    selected: np.ndarray  # int64 (G,): draws per group
    unique: np.ndarray    # int64 (G,): picks (distinct samples) per group

    @property
    def group(self) -> np.ndarray:
        """int64 (U,): each pick's group."""
        return np.repeat(np.arange(len(self.unique), dtype=np.int64), self.unique)


class Groups(NamedTuple):
    """What a query weighs: the group table and what it was built from."""

    table: GroupTable
    versions: dict[int, int]                   # index version used, per dataset
    names: dict[int, str]                      # dataset names
    ignored: list[int]                         # scored experts left out (classifiers have no cluster)
    cluster_scores: dict[tuple[int, int], float]  # (dataset, cluster) -> the score of its rotation expert


class PickSlice(NamedTuple):
    """Rows [start, stop) of a stored query's picks, with their groups."""

    group: np.ndarray  # int64
    rank: np.ndarray   # int64
    count: np.ndarray  # int64


# --------------------------------------------------------------------------- validation


def _field_error(message: str, field_name: str, hint: str | None = None) -> InvalidInputError:
    return InvalidInputError(message, field=field_name, hint=hint)


def validate_request(request: QueryRequest, *, max_budget: int) -> None:
    if not isinstance(request.budget, int) or request.budget < 1:
        raise _field_error(f"budget must be at least 1, got {request.budget!r}", "budget")
    if request.budget > max_budget:
        raise _field_error(f"budget {request.budget} is above the server's cap of {max_budget}", "budget", "ask for fewer samples or raise NDS_MAX_BUDGET")
    if request.temperature is not None and (not math.isfinite(request.temperature) or not MIN_TEMPERATURE <= request.temperature <= MAX_TEMPERATURE):
        raise _field_error(f"temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, got {request.temperature!r}", "temperature",
                           f"the default is {DEFAULT_TEMPERATURE}; lower values put more mass on the best cluster")
    if not request.expert_scores and not request.label_priors:
        raise _field_error("give expert_scores, label_priors or both", "expert_scores", "score the experts with 'nds score' first")
    for expert_id, score in request.expert_scores.items():
        if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score) or score < 0:
            raise _field_error(f"score of expert {expert_id} must be a finite number >= 0, got {score!r}", f"expert_scores.{expert_id}")
    for dataset_id, priors in (request.label_priors or {}).items():
        where = f"label_priors.{dataset_id}"
        if not priors:
            raise _field_error(f"no priors given for dataset {dataset_id}", where)
        values = list(priors.values())
        if any(not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0 for v in values):
            raise _field_error(f"priors of dataset {dataset_id} must be finite numbers >= 0", where)
        if abs(sum(values) - 1.0) > PRIOR_TOLERANCE:
            raise _field_error(f"priors of dataset {dataset_id} sum to {sum(values):.6f}, not 1 (within {PRIOR_TOLERANCE})", where, "normalise them before sending")
    if request.seed < 0:
        raise _field_error("seed must be >= 0", "seed")


# --------------------------------------------------------------------------- weights


def normalized_scores(scores: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; equal scores all become 1."""
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo <= 1e-12:
        return np.ones_like(scores, dtype=np.float64)
    return (scores - lo) / (hi - lo)


def softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = x / temperature
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


# the two lookups of a query, built once (SQLAlchemy caches their compiled form)
_EXPERTS_WITH_DATASETS = (
    select(Expert.id, Expert.dataset_id, Expert.kind, Expert.cluster, Expert.index_version, Dataset.name, Dataset.index_version)
    .join(Dataset, Dataset.id == Expert.dataset_id)
    .where(Expert.id.in_(bindparam("ids", expanding=True)))
)
_INSERT_QUERY = insert(Query)
_DATASETS = select(Dataset.id, Dataset.name, Dataset.index_version).where(Dataset.id.in_(bindparam("ids", expanding=True)))


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
        for eid, did, kind, cluster, version, name, current in rows:
            if visible is None or did in visible:
                experts[eid] = (did, kind.value if isinstance(kind, ExpertKind) else str(kind), cluster, version)
                names[did] = name
                versions[did] = current
        unknown = [i for i in ids if i not in experts]
        if unknown:
            raise _field_error(f"unknown expert ids: {unknown[:10]}", "expert_scores", "GET /v1/experts lists the current experts; pull them again")
    dataset_ids = {e[0] for e in experts.values()} | set((request.label_priors or {}).keys())
    if request.datasets is not None:
        dataset_ids &= set(request.datasets)
        if not dataset_ids:
            raise _field_error("no scored expert or label prior belongs to the datasets asked for", "datasets")
    names = {d: n for d, n in names.items() if d in dataset_ids}
    versions = {d: v for d, v in versions.items() if d in dataset_ids}
    if dataset_ids - set(names):  # datasets named only by label priors
        found = conn.execute(_DATASETS, {"ids": sorted(dataset_ids - set(names))}).all()
        visible = visible_dataset_ids(session=conn, principal=principal, among=[r[0] for r in found])
        if visible is not None:
            found = [r for r in found if r[0] in visible]
        names.update((r[0], r[1]) for r in found)
        versions.update((r[0], r[2]) for r in found)
    missing = sorted(dataset_ids - set(names))
    if missing:
        raise _field_error(f"unknown dataset ids: {missing}", "label_priors" if request.label_priors else "datasets")
    for did, version in versions.items():
        if version < 1:
            raise _field_error(f"dataset {names[did]!r} is not indexed yet", "datasets", f"run 'nds index {names[did]}' first")
    ignored: list[int] = []
    cluster_scores: dict[tuple[int, int], float] = {}
    rotation = ExpertKind.rotation.value
    for eid, (did, kind, cluster, version) in experts.items():
        if did not in versions:
            continue  # filtered out by request.datasets
        if kind != rotation:
            ignored.append(eid)
            continue
        if version != versions[did]:
            raise _field_error(
                f"expert {eid} belongs to index version {version} of dataset {names[did]!r}, which is now at version {versions[did]}",
                f"expert_scores.{eid}",
                "pull the experts again and re-score",
            )
        cluster_scores[(did, cluster)] = float(request.expert_scores[eid])
    if request.expert_scores and not cluster_scores and not request.label_priors:
        raise _field_error("none of the scored experts is a rotation expert of the datasets asked for", "expert_scores")

    layout = ctx.groups.layout(conn, versions)  # cached per set of (dataset, index version)
    per_dataset = layout.datasets
    for did, priors in (request.label_priors or {}).items():
        if did in per_dataset:
            unknown_labels = sorted(set(priors) - per_dataset[did].labels)
            if unknown_labels:
                raise _field_error(f"dataset {names[did]!r} has no labels {unknown_labels[:10]}", f"label_priors.{did}",
                                   f"its labels are: {', '.join(sorted(per_dataset[did].labels)[:20])}")
    if cluster_scores:
        keys = sorted(cluster_scores)
        p_all = softmax(normalized_scores(np.array([cluster_scores[k] for k in keys])), temperature)
        p_cell = np.zeros(len(layout.cells))  # p_k of each (dataset, cluster); clusters without groups are left out
        for key, prob in zip(keys, p_all.tolist()):
            cell = layout.cell_index.get(key)
            if cell is not None:
                p_cell[cell] = prob
        w = p_cell[layout.cell_of] / np.maximum(layout.cluster_size, 1)  # p_k / |k| per sample
    else:  # priors alone: every dataset with priors gets the same mass
        w = np.zeros(len(layout.size))
        with_priors = [d for d in (request.label_priors or {}) if d in per_dataset]
        for did in with_priors:
            w[layout.slices[did]] = 1.0 / len(with_priors) / max(int(per_dataset[did].size.sum()), 1)
    for did, priors in (request.label_priors or {}).items():
        if did in per_dataset:  # times P_t(y) / P_s(y); unlabelled samples keep factor 1
            g = per_dataset[did]
            pt = np.array([priors.get(lab, 0.0) if lab is not None else np.nan for lab in g.label], dtype=np.float64)
            w[layout.slices[did]] *= np.where(np.isnan(g.label_share), 1.0, pt / np.where(np.isnan(g.label_share), 1.0, g.label_share))
    mass = w * layout.size
    total = float(mass.sum())
    if total <= 0:
        raise _field_error("the scores and priors give no sample any weight", "label_priors" if request.label_priors else "expert_scores",
                           "check that the priors name labels the scored clusters contain")
    table = GroupTable(layout.dataset_id, layout.cluster, layout.label, layout.size, mass / total,
                       cell_index=(layout.cells, layout.cell_of))
    return Groups(table, versions, names, sorted(ignored), cluster_scores)


# --------------------------------------------------------------------------- sampling


def sample_groups(table: GroupTable, budget: int, *, replacement: bool, seed: int) -> Picks:
    """Draw the picks in O(G + B): group counts first, then ranks inside each group.

    Picks come out sorted by (group, rank), each (group, rank) once with its count.
    """
    rng = np.random.default_rng(seed)
    G = len(table.size)
    if replacement:
        counts = rng.multinomial(budget, table.mass)
        if budget == 0:
            return Picks(np.zeros(0, np.int64), np.zeros(0, np.int64), counts, np.zeros(G, np.int64))
        index = np.int32 if int(table.size.sum()) < 2**31 else np.int64  # half the bytes to move and sort
        offsets = np.zeros(G, dtype=index)  # where each group starts in the concatenation of all groups
        np.cumsum(table.size[:-1], out=offsets[1:])
        keys = rng.random(budget)
        keys *= np.repeat(table.size.astype(np.float64), counts)   # draws are in group order: repeat, no gather
        keys = keys.astype(index)                                   # floor: a uniform rank inside the group
        keys += np.repeat(offsets, counts)                          # group-major position: sorting keeps groups in order
        keys.sort()
        first = np.empty(budget, dtype=bool)
        first[0] = True
        np.not_equal(keys[1:], keys[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        picked = keys[starts]
        drawn = np.empty(len(starts), dtype=np.int64)  # draws of each pick: the gaps between first occurrences
        np.subtract(starts[1:], starts[:-1], out=drawn[:-1])
        drawn[-1] = budget - starts[-1]
        unique = np.diff(np.searchsorted(picked, offsets), append=len(picked)).astype(np.int64)
        picked -= np.repeat(offsets, unique)
        return Picks(picked, drawn, counts, unique)
    counts = np.zeros(G, dtype=np.int64)
    capacity = np.where(table.mass > 0, table.size, 0)
    remaining = int(min(budget, capacity.sum()))
    while remaining > 0:
        share = np.where(capacity - counts > 0, table.mass, 0.0)
        draw = np.minimum(rng.multinomial(remaining, share / share.sum()), capacity - counts)  # a full group spills over
        counts += draw
        remaining -= int(draw.sum())
    ranks = [np.sort(rng.choice(int(table.size[g]), int(counts[g]), replace=False)) if counts[g] < table.size[g] else np.arange(int(table.size[g]))
             for g in np.flatnonzero(counts)]
    rank = np.concatenate(ranks).astype(np.int64) if ranks else np.zeros(0, np.int64)
    return Picks(rank, np.ones(len(rank), dtype=np.int64), counts, counts)  # every pick drawn once


# --------------------------------------------------------------------------- summary


def closeness(method: str, cluster_scores: Mapping[tuple[int, int], float], names: Mapping[int, str]) -> tuple[float, str] | None:
    """How close the nearest source domain is, from the rotation experts' scores, and how it was read.

    Rotation and linear-probe scores measure each expert on its own: the best one counts.
    Embedding scores are shares of the target nearest each cluster, so a domain split into K
    clusters splits its votes K ways: the shares are summed per dataset and the best dataset counts."""
    if not cluster_scores:
        return None
    if method == "embedding":
        per_dataset: dict[int, float] = {}
        for (did, _), share in cluster_scores.items():
            per_dataset[did] = per_dataset.get(did, 0.0) + share
        did, value = max(per_dataset.items(), key=lambda kv: kv[1])
        return value, f"{value:.2f} of the target nearest the clusters of {names.get(did, str(did))!r}"
    value = max(cluster_scores.values())
    return value, f"best {method} score {value:.2f}"


def recommend_recipe(request: QueryRequest, cluster_scores: Mapping[tuple[int, int], float], names: Mapping[int, str]) -> dict[str, str]:
    """A transfer recipe from the target's size and how close the experts say its domain is (:func:`closeness`)."""
    n = request.target_size
    method = request.score_method or "rotation"
    close = closeness(method, cluster_scores, names)
    threshold = {"linear-probe": SIMILAR_PROBE_SCORE, "embedding": SIMILAR_EMBEDDING_SHARE}.get(method, SIMILAR_ROTATION_SCORE)
    similar = close is not None and close[0] >= threshold
    size_text = f"{n} target images" if n else "a target of unknown size (assumed small)"
    if n and n >= LARGE_TARGET:
        return {"recipe": "fine-tune", "reason": f"With {size_text}, pre-train on the selection and fine-tune every layer: there is enough target data to adapt the whole network."}
    if similar:
        return {"recipe": "linear-probe", "reason": f"With {size_text} and a close source domain ({close[1]} >= {threshold}), pre-train on the selection and train a linear classifier on its frozen features."}
    score_text = f"{close[1]} < {threshold}" if close is not None else "no expert scores"
    return {"recipe": "linear-probe-early-layers", "reason": f"With {size_text} and a distant source domain ({score_text}), train a linear classifier on earlier-layer features of the network pre-trained on the selection, or fine-tune only the last block."}


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


# --------------------------------------------------------------------------- queries


def run_query(ctx: CatalogContext, request: QueryRequest, *, principal: Principal = LOCAL) -> Query:
    """Validate, weigh, sample, store the picks and the query; nothing is stored on bad input.
    The query belongs to ``principal``'s key and sees only the datasets it may see."""
    validate_request(request, max_budget=ctx.settings.max_budget)
    with ctx.engine.connect() as conn:
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
        with ctx.engine.begin() as conn:
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


# Picks file (format 2): 8-byte little-endian header length, a small JSON header (counts,
# dtypes, the groups' labels), then raw little-endian arrays: the group table (dataset_id,
# cluster, size as int64, mass as float64, G each), the number of picks of each group
# (int64, G), then the picks' ranks (int32 when every group is smaller than 2**31, else
# int64) and counts (the smallest of uint8, uint16, int32, int64 that holds them). The picks are sorted by group, so a
# pick's group follows from the per-group numbers: readable in slices, no pickle.
# The reader checks the header against the file's size before it allocates anything: a
# missing or damaged file (truncated, overwritten, absurd counts) is a GoneError (410: the
# query's stored selection is gone for good, as when its dataset is deleted) that says to
# run the query again (same request and seed: the same picks), never a MemoryError or a 500.
PICKS_FORMAT = 2
RANK_DTYPES = ("<i4", "<i8")
COUNT_DTYPES = ("<u1", "<u2", "<i4", "<i8")


def picks_key(query_id: str) -> str:
    """The artifact key of a query's picks file."""
    return f"{PICKS_PREFIX}/{query_id}.picks"


def save_picks(ctx: CatalogContext, query_id: str, table: GroupTable, picks: Picks) -> str:
    """Write the picks file (temp file + rename); its artifact key."""
    G = len(table.size)
    rank_dtype = "<i4" if int(table.size.max(initial=0)) < 2**31 else "<i8"
    most = int(picks.count.max(initial=0))  # counts are mostly 1: store them in the smallest type that holds them
    count_dtype = "<u1" if most < 2**8 else "<u2" if most < 2**16 else "<i4" if most < 2**31 else "<i8"
    header = json.dumps({
        "format": PICKS_FORMAT, "groups": G, "rows": int(len(picks.rank)), "rank_dtype": rank_dtype,
        "count_dtype": count_dtype, "labels": list(table.label),
    }).encode()
    per_group = picks.unique

    parts = [struct.pack("<Q", len(header)), header] + [
        np.asarray(array).astype(dtype, copy=False).tobytes()
        for array, dtype in ((table.dataset_id, "<i8"), (table.cluster, "<i8"), (table.size, "<i8"), (table.mass, "<f8"),
                             (per_group, "<i8"), (picks.rank, rank_dtype), (picks.count, count_dtype))
    ]

    def write(path) -> None:  # noqa: ANN001 - Path
        with open(path, "wb", buffering=0) as fh:
            fh.write(b"".join(parts))

    key = picks_key(query_id)
    ctx.artifacts.write_with(key, write, durable=False)
    return key


def _damaged(query_id: str, what: str) -> GoneError:
    return GoneError(f"the stored selection of query {query_id} is damaged ({what}); run the query again",
                         hint="the same request and seed select the same samples")


def _is_count(value: Any) -> bool:  # noqa: ANN401 - a JSON value
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


@contextmanager
def open_picks(
    ctx: CatalogContext, query_id: str, *, datasets: set[int] | None = None,
) -> Iterator[tuple[GroupTable, int, Callable[[int, int], PickSlice]]]:
    """The group table, the number of picks, and a reader of picks[start:stop].

    A missing or damaged file (``datasets``: the ids its groups may name) is a GoneError
    that says to run the query again; nothing is allocated before the header's sizes match
    the file's."""
    try:
        fh = ctx.artifacts.path(picks_key(query_id)).open("rb")
    except FileNotFoundError:
        raise GoneError(f"the stored selection of query {query_id} is missing; run the query again",
                            hint="the same request and seed select the same samples") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read the stored selection of query {query_id}: {exc.strerror or type(exc).__name__}",
                            hint="the server log has the details") from exc
    with fh:
        file_size = os.fstat(fh.fileno()).st_size
        if file_size < 8:
            raise _damaged(query_id, "shorter than its header")
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > file_size - 8:
            raise _damaged(query_id, "its header runs past the end of the file")
        try:
            header = json.loads(fh.read(length))
        except ValueError:  # bad JSON or bad UTF-8
            header = None
        if not isinstance(header, dict):
            raise _damaged(query_id, "unreadable header")
        version = header.get("format")
        if version != PICKS_FORMAT:
            if _is_count(version) and 1 <= version < PICKS_FORMAT:
                raise ConflictError(f"query {query_id} was stored by an older version of the server", hint="run the query again")
            raise _damaged(query_id, f"unknown format {version!r}")
        G, total, labels = header.get("groups"), header.get("rows"), header.get("labels")
        if not (_is_count(G) and _is_count(total)):
            raise _damaged(query_id, "bad counts in its header")
        if header.get("rank_dtype") not in RANK_DTYPES or header.get("count_dtype") not in COUNT_DTYPES:
            raise _damaged(query_id, "unknown array types in its header")
        if not isinstance(labels, list) or len(labels) != G or not all(lab is None or isinstance(lab, str) for lab in labels):
            raise _damaged(query_id, "bad labels in its header")
        rank_dtype, count_dtype = np.dtype(header["rank_dtype"]), np.dtype(header["count_dtype"])
        ranks_at = 8 + length + 5 * 8 * G
        counts_at = ranks_at + total * rank_dtype.itemsize
        expected = counts_at + total * count_dtype.itemsize
        if expected != file_size:  # bounds G and total by the file's real size before anything is allocated
            raise _damaged(query_id, f"{file_size} bytes where its header implies {expected}")
        arrays = [np.fromfile(fh, dtype=dtype, count=G) for dtype in ("<i8", "<i8", "<i8", "<f8", "<i8")]
        if any(len(a) != G for a in arrays):
            raise _damaged(query_id, "truncated group table")
        dataset_id, cluster, size, mass, per_group = arrays
        if (size < 0).any() or (per_group < 0).any() or (per_group > size).any() or int(per_group.sum()) != total:
            raise _damaged(query_id, "inconsistent group sizes")
        if not np.isfinite(mass).all() or (mass < 0).any():
            raise _damaged(query_id, "bad group masses")
        if datasets is not None and not set(np.unique(dataset_id).tolist()) <= datasets:
            raise _damaged(query_id, "groups of datasets the query did not use")
        table = GroupTable(dataset_id, cluster, labels, size, mass)
        ends = np.cumsum(per_group)  # picks of group g are rows [ends[g] - per_group[g], ends[g])

        def read(start: int, stop: int) -> PickSlice:
            start = max(0, start)
            stop = max(start, min(stop, total))
            fh.seek(ranks_at + start * rank_dtype.itemsize)
            rank = np.fromfile(fh, dtype=rank_dtype, count=stop - start).astype(np.int64)
            fh.seek(counts_at + start * count_dtype.itemsize)
            count = np.fromfile(fh, dtype=count_dtype, count=stop - start).astype(np.int64)
            if len(rank) != stop - start or len(count) != stop - start:
                raise _damaged(query_id, "truncated picks")
            group = np.searchsorted(ends, np.arange(start, stop), side="right").astype(np.int64)
            if (rank < 0).any() or (rank >= size[group]).any() or (count < 0).any():
                raise _damaged(query_id, "picks outside their groups")
            return PickSlice(group, rank, count)

        yield table, total, read


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


# --------------------------------------------------------------------------- resolving picks to samples


MANIFEST_COLUMNS = ("key", "uri", "label", "dataset", "cluster", "weight", "count")


class ManifestRow(NamedTuple):
    key: str
    uri: str
    label: str | None
    dataset: str
    cluster: int
    weight: float
    count: int

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(MANIFEST_COLUMNS, self))


def iter_manifest(
    ctx: CatalogContext, query: Query, *, offset: int = 0, limit: int | None = None, chunk: int = 2000, principal: Principal = LOCAL,
) -> Iterator[list[ManifestRow]]:
    """The query's picks as manifest rows, in a fixed order (group, then rank), chunk by chunk.

    Reads ``chunk`` picks at a time from the picks file and resolves them with a few indexed
    lookups: a rank range for each group with many nearly consecutive picks, and one
    row-value ``IN`` per dataset for the picks scattered over the other groups (a budget
    spread over a thousand groups costs a handful of round trips, not a thousand). Memory
    stays bounded whatever the number of rows.
    """
    versions = {int(k): int(v) for k, v in query.index_versions.items()}
    show = ctx.shown_uri(principal)  # client keys see uris relative to the data roots (nds.catalog.uris)
    with open_picks(ctx, query.id, datasets=set(versions)) as (table, total, read), Session(ctx.engine) as session:
        names = {d.id: d.name for d in session.exec(select(Dataset).where(Dataset.id.in_(list(versions)))).all()}
        _check_versions_exist(session, versions, names)
        weights = table.weight
        group_of = {(int(d), int(c), lab): g for g, (d, c, lab) in enumerate(zip(table.dataset_id.tolist(), table.cluster.tolist(), table.label))}
        stop = total if limit is None else min(total, offset + limit)
        for start in range(offset, stop, chunk):
            picks = read(start, min(start + chunk, stop))
            found: dict[tuple[int, int], tuple[int, str, str | None]] = {}  # (group, rank) -> (sample id, uri, label)
            scattered: dict[int, list[tuple[int, list[int]]]] = {}          # dataset -> [(group, ranks)]
            lookups = []                                                     # the SQL selects resolving this chunk
            bounds = np.flatnonzero(np.diff(picks.group)) + 1  # picks are sorted by group
            for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(picks.group)]])):
                g = int(picks.group[lo])
                ranks = picks.rank[lo:hi].tolist()
                d = int(table.dataset_id[g])
                if len(ranks) > 64 and ranks[-1] - ranks[0] < 4 * len(ranks):  # dense: one range scan
                    lab = table.label[g]
                    lookups.append(_ASSIGNED.where(Assignment.dataset_id == d, Assignment.index_version == versions[d],
                                                   Assignment.cluster == int(table.cluster[g]),
                                                   Assignment.label.is_(None) if lab is None else Assignment.label == lab,
                                                   Assignment.rank.between(ranks[0], ranks[-1])))
                else:
                    scattered.setdefault(d, []).append((g, ranks))
            for d, groups in scattered.items():
                labelled = [(int(table.cluster[g]), table.label[g], r) for g, ranks in groups if table.label[g] is not None for r in ranks]
                unlabelled = [(int(table.cluster[g]), r) for g, ranks in groups if table.label[g] is None for r in ranks]
                in_version = (Assignment.dataset_id == d, Assignment.index_version == versions[d])
                if labelled:
                    lookups.append(_ASSIGNED.where(*in_version, tuple_(Assignment.cluster, Assignment.label, Assignment.rank).in_(labelled)))
                if unlabelled:
                    lookups.append(_ASSIGNED.where(*in_version, Assignment.label.is_(None), tuple_(Assignment.cluster, Assignment.rank).in_(unlabelled)))
            for lookup in lookups:
                for d, cluster, label, rank, sid, uri, slabel in session.exec(lookup).all():
                    found[(group_of[(d, cluster, label)], rank)] = (sid, uri, slabel)
            rows: list[ManifestRow] = []
            for g, rank, count in zip(picks.group.tolist(), picks.rank.tolist(), picks.count.tolist()):
                hit = found.get((g, rank))
                if hit is not None:
                    name = names[int(table.dataset_id[g])]
                    rows.append(ManifestRow(f"{name}/{hit[0]}", show(hit[1]), hit[2], name, int(table.cluster[g]), float(weights[g]), count))
            yield rows


_ASSIGNED = select(Assignment.dataset_id, Assignment.cluster, Assignment.label, Assignment.rank, Sample.id, Sample.uri, Sample.label).join(
    Sample, Sample.id == Assignment.sample_id
)


def _check_versions_exist(session: Session, versions: dict[int, int], names: dict[int, str]) -> None:
    for did in versions:
        if did not in names:
            raise GoneError(f"dataset {did} of this query was deleted", hint="run the query again on the datasets there are now")
    pairs = list(versions.items())
    present = set(session.exec(
        select(Group.dataset_id, Group.index_version).where(tuple_(Group.dataset_id, Group.index_version).in_(pairs)).distinct()
    ).all())
    for did, version in pairs:
        if (did, version) not in present:
            raise GoneError(f"index version {version} of dataset {names[did]!r} is gone (re-indexed twice since)", hint="run the query again")
