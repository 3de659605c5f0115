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

import io
import math
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import and_, tuple_
from sqlmodel import Session, select

from catalog.context import CatalogContext
from catalog.db import session_scope
from catalog.errors import InvalidInputError, NotFoundError
from catalog.models import Assignment, Dataset, DatasetStatus, Expert, ExpertKind, Group, Query, Sample, utcnow

DEFAULT_TEMPERATURE = 0.1
PRIOR_TOLERANCE = 1e-3
LARGE_TARGET = 1000          # images: above this, fine-tuning beats a linear probe (cs231n)
SIMILAR_ROTATION_SCORE = 0.5  # rotation accuracy (chance 0.25) above which the domain counts as similar
SIMILAR_PROBE_SCORE = 0.8     # linear-probe accuracy above which the features count as transferable
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
    label: list[str | None]   # (G,)
    size: np.ndarray          # int64 (G,)
    mass: np.ndarray          # float64 (G,), sums to 1

    @property
    def weight(self) -> np.ndarray:
        """Per-sample weight inside each group (mass / size)."""
        return np.where(self.size > 0, self.mass / np.maximum(self.size, 1), 0.0)


@dataclass
class Picks:
    """What a query selected: (group, rank) pairs with how many times each was drawn."""

    group: np.ndarray   # int64 (U,), index into the GroupTable
    rank: np.ndarray    # int64 (U,)
    count: np.ndarray   # int64 (U,)


# --------------------------------------------------------------------------- validation


def _field_error(message: str, field_name: str, hint: str | None = None) -> InvalidInputError:
    return InvalidInputError(message, field=field_name, hint=hint)


def validate_request(request: QueryRequest, *, max_budget: int) -> None:
    if not isinstance(request.budget, int) or request.budget < 1:
        raise _field_error(f"budget must be at least 1, got {request.budget!r}", "budget")
    if request.budget > max_budget:
        raise _field_error(f"budget {request.budget} is above the server's cap of {max_budget}", "budget", "ask for fewer samples or raise NDS_MAX_BUDGET")
    if request.temperature is not None and (not math.isfinite(request.temperature) or request.temperature <= 0):
        raise _field_error(f"temperature must be a positive number, got {request.temperature!r}", "temperature")
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


def build_groups(ctx: CatalogContext, session: Session, request: QueryRequest) -> tuple[GroupTable, dict[int, int], list[int]]:
    """Resolve experts and datasets, read the G groups of the active index versions, compute masses.

    Returns the group table, the index version used per dataset, and the expert ids ignored
    (classifiers: they have no cluster).
    """
    temperature = request.temperature or DEFAULT_TEMPERATURE
    experts: dict[int, Expert] = {}
    if request.expert_scores:
        ids = list(request.expert_scores)
        found = {e.id: e for e in session.exec(select(Expert).where(Expert.id.in_(ids))).all()}
        unknown = [i for i in ids if i not in found]
        if unknown:
            raise _field_error(f"unknown expert ids: {unknown[:10]}", "expert_scores", "GET /v1/experts lists the current experts; pull them again")
        experts = found
    dataset_ids = {e.dataset_id for e in experts.values()} | set((request.label_priors or {}).keys())
    if request.datasets is not None:
        allowed = set(request.datasets)
        dataset_ids &= allowed
        if not dataset_ids:
            raise _field_error("no scored expert or label prior belongs to the datasets asked for", "datasets")
    datasets = {d.id: d for d in session.exec(select(Dataset).where(Dataset.id.in_(dataset_ids))).all()}
    missing = sorted(dataset_ids - set(datasets))
    if missing:
        raise _field_error(f"unknown dataset ids: {missing}", "label_priors" if request.label_priors else "datasets")
    for did, dataset in datasets.items():
        if dataset.index_version < 1:
            raise _field_error(f"dataset {dataset.name!r} is not indexed yet", "datasets", f"run 'nds index {dataset.name}' first")
    versions = {did: d.index_version for did, d in datasets.items()}
    ignored: list[int] = []
    cluster_scores: dict[tuple[int, int], float] = {}
    for eid, expert in experts.items():
        if expert.dataset_id not in datasets:
            continue  # filtered out by request.datasets
        if expert.kind != ExpertKind.rotation:
            ignored.append(eid)
            continue
        if expert.index_version != versions[expert.dataset_id]:
            raise _field_error(
                f"expert {eid} belongs to index version {expert.index_version} of dataset {datasets[expert.dataset_id].name!r}, "
                f"which is now at version {versions[expert.dataset_id]}",
                f"expert_scores.{eid}",
                "pull the experts again and re-score",
            )
        cluster_scores[(expert.dataset_id, expert.cluster)] = float(request.expert_scores[eid])
    if request.expert_scores and not cluster_scores and not request.label_priors:
        raise _field_error("none of the scored experts is a rotation expert of the datasets asked for", "expert_scores")

    rows = session.exec(
        select(Group).where(tuple_(Group.dataset_id, Group.index_version).in_(list(versions.items()))).order_by(Group.id)
    ).all() if versions else []
    group_ds = np.array([g.dataset_id for g in rows], dtype=np.int64)
    group_cl = np.array([g.cluster for g in rows], dtype=np.int64)
    group_lab = [g.label for g in rows]
    group_size = np.array([g.size for g in rows], dtype=np.int64)

    # label priors: check labels exist, and compute P_t(y) / P_s(y) per group
    ratio = np.ones(len(rows), dtype=np.float64)
    for did, priors in (request.label_priors or {}).items():
        if did not in datasets:
            continue
        in_ds = group_ds == did
        totals: dict[str, int] = {}
        for lab, n in zip((group_lab[i] for i in np.flatnonzero(in_ds)), group_size[in_ds]):
            if lab is not None:
                totals[lab] = totals.get(lab, 0) + int(n)
        unknown_labels = sorted(set(priors) - set(totals))
        if unknown_labels:
            raise _field_error(f"dataset {datasets[did].name!r} has no labels {unknown_labels[:10]}", f"label_priors.{did}",
                               f"its labels are: {', '.join(sorted(totals)[:20])}")
        labelled = sum(totals.values())
        for i in np.flatnonzero(in_ds):
            lab = group_lab[i]
            if lab is not None:
                ratio[i] = float(priors.get(lab, 0.0)) / (totals[lab] / labelled)

    # cluster probabilities
    p_cluster = np.zeros(len(rows), dtype=np.float64)
    if cluster_scores:
        keys = sorted(cluster_scores)
        probs = softmax(normalized_scores(np.array([cluster_scores[k] for k in keys])), temperature)
        prob_of = dict(zip(keys, probs))
        cluster_size: dict[tuple[int, int], int] = {}
        for d, c, n in zip(group_ds.tolist(), group_cl.tolist(), group_size.tolist()):
            cluster_size[(d, c)] = cluster_size.get((d, c), 0) + n
        for i, (d, c) in enumerate(zip(group_ds.tolist(), group_cl.tolist())):
            if (d, c) in prob_of:
                p_cluster[i] = prob_of[(d, c)] / cluster_size[(d, c)]  # p_k / |k| per sample
    else:  # priors alone: every dataset with priors gets the same mass
        with_priors = [d for d in (request.label_priors or {}) if d in datasets]
        for d in with_priors:
            in_ds = group_ds == d
            p_cluster[in_ds] = 1.0 / len(with_priors) / group_size[in_ds].sum()
    mass = p_cluster * ratio * group_size
    total = mass.sum()
    if total <= 0:
        raise _field_error("the scores and priors give no sample any weight", "label_priors" if request.label_priors else "expert_scores",
                           "check that the priors name labels the scored clusters contain")
    table = GroupTable(dataset_id=group_ds, cluster=group_cl, label=group_lab, size=group_size, mass=mass / total)
    return table, versions, sorted(ignored)


# --------------------------------------------------------------------------- sampling


def sample_groups(table: GroupTable, budget: int, *, replacement: bool, seed: int) -> Picks:
    """Draw the picks in O(G + B): group counts first, then ranks inside each group."""
    rng = np.random.default_rng(seed)
    G = len(table.size)
    if replacement:
        counts = rng.multinomial(budget, table.mass)
    else:
        counts = np.zeros(G, dtype=np.int64)
        capacity = np.where(table.mass > 0, table.size, 0)
        remaining = int(min(budget, capacity.sum()))
        while remaining > 0:
            open_ = capacity - counts > 0
            share = np.where(open_, table.mass, 0.0)
            share = share / share.sum()
            draw = rng.multinomial(remaining, share)
            draw = np.minimum(draw, capacity - counts)  # a full group spills its surplus into the next round
            counts += draw
            remaining -= int(draw.sum())
    groups, ranks, mult = [], [], []
    for g in np.flatnonzero(counts):
        n, size = int(counts[g]), int(table.size[g])
        if replacement:
            drawn = rng.integers(0, size, n)
            uniq, cnt = np.unique(drawn, return_counts=True)
        else:
            uniq = np.sort(rng.choice(size, n, replace=False)) if n < size else np.arange(size)
            cnt = np.ones(len(uniq), dtype=np.int64)
        groups.append(np.full(len(uniq), g, dtype=np.int64))
        ranks.append(uniq.astype(np.int64))
        mult.append(cnt.astype(np.int64))
    if not groups:
        empty = np.zeros(0, dtype=np.int64)
        return Picks(empty, empty, empty)
    return Picks(np.concatenate(groups), np.concatenate(ranks), np.concatenate(mult))


# --------------------------------------------------------------------------- summary


def recommend_recipe(request: QueryRequest, best_score: float | None) -> dict[str, str]:
    """A transfer recipe from the target's size and how similar the best experts say it is."""
    n = request.target_size
    method = request.score_method or "rotation"
    threshold = SIMILAR_PROBE_SCORE if method == "linear-probe" else SIMILAR_ROTATION_SCORE
    similar = best_score is not None and best_score >= threshold
    size_text = f"{n} target images" if n else "a target of unknown size (assumed small)"
    if n and n >= LARGE_TARGET:
        return {"recipe": "fine-tune", "reason": f"With {size_text}, pre-train on the selection and fine-tune every layer: there is enough target data to adapt the whole network."}
    if similar:
        return {"recipe": "linear-probe", "reason": f"With {size_text} and a close source domain (best {method} score {best_score:.2f} >= {threshold}), pre-train on the selection and train a linear classifier on its frozen features."}
    score_text = f"best {method} score {best_score:.2f} < {threshold}" if best_score is not None else "no expert scores"
    return {"recipe": "linear-probe-early-layers", "reason": f"With {size_text} and a distant source domain ({score_text}), train a linear classifier on earlier-layer features of the network pre-trained on the selection, or fine-tune only the last block."}


def summarize(table: GroupTable, picks: Picks, request: QueryRequest, datasets: Mapping[int, str], ignored: list[int]) -> dict[str, Any]:
    selected = np.zeros(len(table.size), dtype=np.int64)
    np.add.at(selected, picks.group, picks.count)
    unique = np.zeros(len(table.size), dtype=np.int64)
    np.add.at(unique, picks.group, 1)
    per_dataset: dict[int, dict[str, Any]] = {}
    for g in range(len(table.size)):
        d, c = int(table.dataset_id[g]), int(table.cluster[g])
        entry = per_dataset.setdefault(d, {"dataset_id": d, "dataset": datasets.get(d, str(d)), "selected": 0, "unique": 0, "mass": 0.0, "clusters": {}})
        entry["selected"] += int(selected[g])
        entry["unique"] += int(unique[g])
        entry["mass"] += float(table.mass[g])
        cl = entry["clusters"].setdefault(c, {"cluster": c, "selected": 0, "unique": 0, "mass": 0.0, "size": 0})
        cl["selected"] += int(selected[g])
        cl["unique"] += int(unique[g])
        cl["mass"] += float(table.mass[g])
        cl["size"] += int(table.size[g])
    weighted = table.mass > 0
    ess = 1.0 / float(np.sum(table.mass[weighted] ** 2 / table.size[weighted])) if weighted.any() else 0.0
    with_weight = int(table.size[weighted].sum())
    used = int(picks.count.sum())
    notes = []
    if not request.replacement and request.budget > with_weight:
        notes.append(f"budget capped at {with_weight}: only that many samples have weight and no sample repeats")
    best = max(request.expert_scores.values()) if request.expert_scores else None
    return {
        "budget": request.budget,
        "selected": used,
        "unique_samples": int(len(picks.rank)),
        "samples_with_weight": with_weight,
        "effective_sample_size": round(ess, 2),
        "replacement": request.replacement,
        "temperature": request.temperature or DEFAULT_TEMPERATURE,
        "seed": request.seed,
        "ignored_experts": ignored,
        "notes": notes,
        "datasets": [
            {**{k: v for k, v in e.items() if k != "clusters"}, "mass": round(e["mass"], 6),
             "clusters": [{**cl, "mass": round(cl["mass"], 6)} for cl in sorted(e["clusters"].values(), key=lambda x: x["cluster"])]}
            for e in sorted(per_dataset.values(), key=lambda x: -x["mass"])
        ],
        "recommendation": recommend_recipe(request, best),
    }


# --------------------------------------------------------------------------- queries


def run_query(ctx: CatalogContext, request: QueryRequest) -> Query:
    """Validate, weigh, sample, store the picks and the query; nothing is stored on bad input."""
    validate_request(request, max_budget=ctx.settings.max_budget)
    with Session(ctx.engine) as session:
        table, versions, ignored = build_groups(ctx, session, request)
        names = {d.id: d.name for d in session.exec(select(Dataset).where(Dataset.id.in_(list(versions)))).all()}
    picks = sample_groups(table, request.budget, replacement=request.replacement, seed=request.seed)
    summary = summarize(table, picks, request, names, ignored)
    query_id = str(uuid.uuid4())
    save_picks(ctx, query_id, table, picks)
    query = Query(
        id=query_id,
        request=_request_json(request),
        index_versions={str(k): v for k, v in sorted(versions.items())},
        summary=summary,
    )
    with session_scope(ctx.engine) as session:
        session.add(query)
    return query


def _request_json(request: QueryRequest) -> dict[str, Any]:
    data = asdict(request)
    data["expert_scores"] = {str(k): v for k, v in request.expert_scores.items()}
    if request.label_priors is not None:
        data["label_priors"] = {str(k): v for k, v in request.label_priors.items()}
    return data


def save_picks(ctx: CatalogContext, query_id: str, table: GroupTable, picks: Picks) -> None:
    labels = np.array(["" if lab is None else lab for lab in table.label], dtype=object)
    has_label = np.array([lab is not None for lab in table.label], dtype=bool)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        dataset_id=table.dataset_id, cluster=table.cluster, size=table.size, mass=table.mass,
        label=np.array(labels.tolist(), dtype=np.str_) if len(labels) else np.zeros(0, dtype=np.str_), has_label=has_label,
        group=picks.group, rank=picks.rank, count=picks.count,
    )
    ctx.artifacts.write_bytes(f"{PICKS_PREFIX}/{query_id}.npz", buf.getvalue())


def load_picks(ctx: CatalogContext, query_id: str) -> tuple[GroupTable, Picks]:
    with np.load(ctx.artifacts.open_path(f"{PICKS_PREFIX}/{query_id}.npz"), allow_pickle=False) as z:
        labels = [str(lab) if has else None for lab, has in zip(z["label"].tolist(), z["has_label"].tolist())]
        table = GroupTable(z["dataset_id"], z["cluster"], labels, z["size"], z["mass"])
        return table, Picks(z["group"], z["rank"], z["count"])


def get_query(*, session: Session, query_id: str) -> Query:
    query = session.get(Query, query_id)
    if query is None:
        raise NotFoundError(f"no query {query_id}")
    return query


# --------------------------------------------------------------------------- resolving picks to samples


@dataclass(frozen=True)
class ManifestRow:
    key: str
    uri: str
    label: str | None
    dataset: str
    cluster: int
    weight: float
    count: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MANIFEST_COLUMNS = ("key", "uri", "label", "dataset", "cluster", "weight", "count")


def iter_manifest(ctx: CatalogContext, query: Query, *, offset: int = 0, limit: int | None = None, chunk: int = 2000) -> Iterator[list[ManifestRow]]:
    """The query's picks as manifest rows, in a fixed order (group, then rank), chunk by chunk.

    Memory stays bounded by ``chunk`` whatever the number of rows.
    """
    table, picks = load_picks(ctx, query.id)
    versions = {int(k): int(v) for k, v in query.index_versions.items()}
    weights = table.weight
    stop = len(picks.rank) if limit is None else min(len(picks.rank), offset + limit)
    with Session(ctx.engine) as session:
        names = {d.id: d.name for d in session.exec(select(Dataset).where(Dataset.id.in_(list(versions)))).all()}
        _check_versions_exist(session, versions, names)
        start = offset
        while start < stop:
            end = min(start + chunk, stop)
            rows: list[ManifestRow] = []
            sel = slice(start, end)
            g_sel, r_sel, c_sel = picks.group[sel], picks.rank[sel], picks.count[sel]
            for g in np.unique(g_sel):  # picks are sorted by group, so this is a few groups per chunk
                mask = g_sel == g
                ranks = r_sel[mask].tolist()
                counts = dict(zip(ranks, c_sel[mask].tolist()))
                d, c, lab = int(table.dataset_id[g]), int(table.cluster[g]), table.label[g]
                label_cond = Assignment.label.is_(None) if lab is None else Assignment.label == lab
                found = session.exec(
                    select(Assignment.rank, Sample.id, Sample.uri, Sample.label)
                    .join(Sample, Sample.id == Assignment.sample_id)
                    .where(and_(Assignment.dataset_id == d, Assignment.index_version == versions[d], Assignment.cluster == c, label_cond,
                                Assignment.rank.in_(ranks)))
                    .order_by(Assignment.rank)
                ).all()
                for rank, sid, uri, slabel in found:
                    rows.append(ManifestRow(f"{names[d]}/{sid}", uri, slabel, names[d], c, float(weights[g]), int(counts[rank])))
            yield rows
            start = end


def _check_versions_exist(session: Session, versions: dict[int, int], names: dict[int, str]) -> None:
    from catalog.errors import ConflictError

    for did, version in versions.items():
        if did not in names:
            raise ConflictError(f"dataset {did} of this query was deleted", hint="run the query again")
        present = session.exec(select(Group.id).where(Group.dataset_id == did, Group.index_version == version).limit(1)).first()
        if present is None:
            raise ConflictError(f"index version {version} of dataset {names[did]!r} is gone (re-indexed twice since)", hint="run the query again")


def active_datasets(session: Session) -> list[Dataset]:
    return list(session.exec(select(Dataset).where(Dataset.status == DatasetStatus.indexed)).all())
