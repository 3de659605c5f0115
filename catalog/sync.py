"""Datasets that grow: ``nds datasets sync NAME`` (and ``POST /v1/datasets/{id}/sync``).

A sync compares the parts (files or shards, ``Source.parts()``) the source lists now with
the parts the dataset's samples came from (their ``shard``, or their ``uri`` for plain
files), registers the samples of the new parts and removes the samples of the parts that
vanished. When the dataset is indexed, each new sample is embedded with the backbone of the
active index and put in the nearest cluster of it (cosine to the centroid; for a label
partition, the cluster of its label when there is one), no expert is retrained.

**Stored queries.** A query's picks name samples by (group, rank) in one index version, so a
sync never changes a committed version: it writes a *new* index version, a copy of the
active one with the new samples appended to their groups and the removed ones taken out
(the last samples of a group fill the ranks the removed ones leave, so ranks stay
0..n-1). The experts are the same networks: their rows move to the new version (same ids,
so scores a client made before the sync stay valid); clusters, groups and assignments are
copied. As after an index job, the previous version is kept for the queries made on it
(they still read their samples, less the removed ones: a manifest never names a removed
sample) and older ones are dropped, so a query made two changes ago answers 410 Gone. New
queries see the new samples at once. Group tables are cached per (dataset, version): a new
version is a new key, so no cache holds stale groups, in this process or another.

**All or nothing.** The new samples are stored batch by batch (:func:`store_items`); the
vectors of the new samples are upserted next; then one transaction writes the new index
version, deletes the removed samples, updates the counts and flips the active version.
Until that commit the dataset's ``num_samples`` counts only the committed samples, and
samples are stored at positions after every committed one, so what a failed or dead sync
stored is exactly the samples past the first ``num_samples`` positions (never one with an
assignment): the job's undo removes them and their points, and so does the next sync
before it starts. The points of removed samples are deleted after the commit.

While it runs the dataset is ``indexing`` (busy: index, sync and delete get 409). A sync
with nothing to change writes nothing (no new version). A source that vanished (folder
gone, pattern matching nothing) is an error before anything is stored.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from sqlalchemy import bindparam, delete, func, insert, literal, update
from sqlmodel import Session, col, select

from nds.catalog.bulk import bulk_insert
from nds.catalog.context import CatalogContext
from nds.catalog.db import session_scope
from nds.catalog.index_options import IndexRequest
from nds.catalog.indexing import resolve_backbone, restore_status
from nds.catalog.jobs import GPU, JobFailed, JobKind, JobReporter, create_job, register_job_kind
from nds.catalog.registration import MAX_LISTED_SKIPS, StoredScan, open_source, store_items
from nds.catalog.retrieval.snapshot import write_snapshot
from nds.catalog.tables import Assignment, Cluster, Dataset, DatasetStatus, Expert, Group, Job, JobStatus, Sample, utcnow
from nds.catalog.vectors import collection_name
from nds.plugins.contract import Backbone, Source
from nds_client import storage
from nds_client.errors import ConflictError, InvalidInputError, NDSError, NotFoundError, ServiceUnavailableError, SourceError
from nds_client.images import load_images
from nds_client.preprocessing import normalize_rows

log = logging.getLogger(__name__)

SYNC = "sync"
#: a re-index is advised when the new samples lie this much farther from their centroids than the indexed ones
REINDEX_RATIO = 1.5
#: ... or when one sync adds and removes more than this share of the indexed samples
REINDEX_CHANGED_SHARE = 0.5
DISTANCE_SAMPLE = 10_000  # indexed samples whose distance to their centroid is measured
EMBED_CHUNK = 1024        # new samples read, embedded, assigned and upserted at a time
ID_CHUNK = 500            # ids per IN (...) list


# --------------------------------------------------------------------------- start


def start_sync(ctx: CatalogContext, dataset_id: int) -> Job:
    """Check the dataset is idle and its source still there, mark it busy and create the job.

    Nothing is stored when the source is gone: the error says so and the dataset stays as it was."""
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise NotFoundError(f"no dataset with id {dataset_id}", hint="'nds datasets list' shows the registered ones")
        _check_idle(dataset)
        name, uri, source_name, options = dataset.name, dataset.uri, dataset.source, dict(dataset.options or {})
    _, parts = open_current_source(ctx, name, uri, source_name, options)
    with session_scope(ctx.engine) as session:
        claimed = session.exec(
            update(Dataset)
            .where(col(Dataset.id) == dataset_id, col(Dataset.status).in_([DatasetStatus.ready, DatasetStatus.indexed, DatasetStatus.failed]))
            .values(status=DatasetStatus.indexing)
        )
        if claimed.rowcount != 1:
            dataset = session.get(Dataset, dataset_id)
            if dataset is None:
                raise NotFoundError(f"no dataset with id {dataset_id}")
            _check_idle(dataset)
            raise ConflictError(f"dataset {name!r} is busy", hint="wait for its current job to finish")
        return create_job(session, kind=SYNC, dataset_id=dataset_id, params={"parts": len(parts)})


def _check_idle(dataset: Dataset) -> None:
    if dataset.status == DatasetStatus.registering:
        raise ConflictError(f"dataset {dataset.name!r} is still being registered", hint="wait for its registration job to finish")
    if dataset.status == DatasetStatus.indexing:
        raise ConflictError(f"dataset {dataset.name!r} is being indexed or synced", hint="wait for that job to finish")


def open_current_source(ctx: CatalogContext, name: str, uri: str, source_name: str, options: dict[str, str]) -> tuple[Source, list[str]]:
    """The dataset's source as it is now and its parts; a SourceError saying the source is gone
    when its location no longer exists, lists nothing, or lies outside the data roots now."""
    try:
        location = ctx.roots.check_pattern(uri, field="path")
        source = open_source(ctx, source_name, location, options)
        parts = list(dict.fromkeys(source.parts()))
    except ServiceUnavailableError:
        raise  # the store is down, not the source gone: 503, retry later
    except InvalidInputError as exc:
        if exc.field not in ("path", "uri"):
            raise  # the plugin or its options, not the data
        raise _gone(name, uri, exc.message) from exc
    if not parts:
        raise _gone(name, uri, "it lists no files")
    return source, parts


def _gone(name: str, uri: str, reason: str) -> SourceError:
    return SourceError(f"the source of dataset {name!r} is gone: {reason}; nothing changed, the dataset is kept as it was",
                       field="path", hint=f"put the data back at {uri} and sync again, or delete the dataset")


# --------------------------------------------------------------------------- run


@dataclass(frozen=True)
class PartsDiff:
    """The source's parts now against the parts the dataset's samples came from."""

    current: int
    registered: int
    new: list[str]              # as the source names them, in its order
    vanished_shards: set[str]
    vanished_files: set[str]

    @property
    def vanished(self) -> int:
        return len(self.vanished_shards) + len(self.vanished_files)

    def summary(self) -> dict[str, int]:
        return {"now": self.current, "registered": self.registered, "new": len(self.new), "vanished": self.vanished,
                "unchanged": self.current - len(self.new)}


def diff_parts(current: Sequence[str], shards: set[str], files: set[str]) -> PartsDiff:
    """Which of ``current`` are new, and which registered shards and files vanished.

    A plain local file is registered under its resolved path; a part that is not found as the
    source names it is looked up resolved too (a symlink, a ``file://`` uri). A part whose
    every item was skipped has no samples: it counts as new at every sync and is tried again."""
    seen_shards: set[str] = set()
    seen_files: set[str] = set()
    new: list[str] = []
    for part in current:
        for key in (part, _resolved(part)):
            if key in shards:
                seen_shards.add(key)
                break
            if key in files:
                seen_files.add(key)
                break
        else:
            new.append(part)
    return PartsDiff(len(current), len(shards) + len(files), new, shards - seen_shards, files - seen_files)


def _resolved(part: str) -> str:
    if storage.is_remote(part):
        return part
    try:
        return str(storage.local_path(part).resolve())
    except (OSError, RuntimeError, ValueError):
        return part


def run_sync(ctx: CatalogContext, job: Job, report: JobReporter) -> dict[str, Any]:
    """The job; when it fails, :func:`undo_sync` (the undo of its kind) puts everything back."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    dataset_id = job.dataset_id
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise JobFailed(f"dataset {dataset_id} no longer exists")
        name, uri, source_name, options = dataset.name, dataset.uri, dataset.source, dict(dataset.options or {})
        version, space, committed = dataset.index_version, dataset.backbone, dataset.num_samples
    drop_uncommitted_samples(ctx, dataset_id)  # what a sync that died left behind

    report.step("compare", start=0.0, end=0.05)
    try:
        source, parts = open_current_source(ctx, name, uri, source_name, options)
    except SourceError as exc:
        raise JobFailed(exc.message, hint=exc.hint) from exc
    with Session(ctx.engine) as session:
        shards = set(session.exec(select(Sample.shard).where(Sample.dataset_id == dataset_id, col(Sample.shard).is_not(None)).distinct()).all())
        files = set(session.exec(select(Sample.uri).where(Sample.dataset_id == dataset_id, col(Sample.shard).is_(None))).all())
        last = session.exec(select(func.max(Sample.position)).where(Sample.dataset_id == dataset_id)).one()
    diff = diff_parts(parts, {s for s in shards if s is not None}, files)
    del shards, files
    base: dict[str, Any] = {"dataset_id": dataset_id, "name": name, "parts": diff.summary(),
                            "vanished_parts": sorted(diff.vanished_shards | diff.vanished_files)[:MAX_LISTED_SKIPS]}
    timings["compare"] = time.perf_counter() - t

    t = time.perf_counter()
    report.step("register", start=0.05, end=0.45)
    first = 0 if last is None else int(last) + 1
    scan = StoredScan()
    if diff.new:
        scan = store_items(ctx, dataset_id, source.items(diff.new), first_position=first, total_parts=len(diff.new), progress=report.progress)
    removed = _vanished_sample_ids(ctx, dataset_id, diff)
    timings["register"] = time.perf_counter() - t
    if scan.stored == 0 and not removed:  # nothing to change: no write, no new version
        release(ctx, dataset_id)
        return _result(base, scan, added=0, removed=0, num_samples=committed, version=version, previous=None, changed=False,
                       placed=None, timings=timings)
    if committed - len(removed) + scan.stored <= 0:
        raise JobFailed(f"after this sync {name!r} would hold no samples ({len(removed)} removed, none readable added)",
                        hint="nothing changed; fix the source, or delete the dataset")

    placed: Placement | None = None
    new_version = version
    if version > 0 and space:
        t = time.perf_counter()
        placed = Placement([], np.zeros(0), [])
        if scan.stored:  # (removals alone need no backbone)
            index = load_active_index(ctx, dataset_id, version)
            backbone = backbone_of(ctx, dataset_id, space)
            indexed_distances = sample_indexed_distances(ctx, dataset_id, index, collection_name(space))
            report.step("embed", start=0.45, end=0.9)
            placed = place_new_samples(ctx, dataset_id, first, index, backbone, collection_name(space), report)
            placed.indexed_distances = indexed_distances
        timings["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        report.step("commit", start=0.9, end=1.0)
        new_version = commit_sync(ctx, dataset_id, version, removed, placed.assigned)
        timings["commit"] = time.perf_counter() - t
        _delete_points(ctx, space, removed)
        write_snapshot(ctx, dataset_id, new_version)  # what manifests read (rebuilt from SQL if it is ever missing)
    else:
        report.step("commit", start=0.9, end=1.0)
        commit_sync(ctx, dataset_id, 0, removed, [])
    with Session(ctx.engine) as session:
        num_samples = session.get(Dataset, dataset_id).num_samples
    return _result(base, scan, added=scan.stored, removed=len(removed), num_samples=num_samples, version=new_version,
                   previous=version if new_version != version else None, changed=True, placed=placed, timings=timings)


def _vanished_sample_ids(ctx: CatalogContext, dataset_id: int, diff: PartsDiff) -> list[int]:
    ids: list[int] = []
    with Session(ctx.engine) as session:
        for chunk in _chunks(sorted(diff.vanished_shards)):
            ids += session.exec(select(Sample.id).where(Sample.dataset_id == dataset_id, col(Sample.shard).in_(chunk))).all()
        for chunk in _chunks(sorted(diff.vanished_files)):
            ids += session.exec(select(Sample.id).where(Sample.dataset_id == dataset_id, col(Sample.shard).is_(None), col(Sample.uri).in_(chunk))).all()
    return sorted(int(i) for i in ids if i is not None)


def _chunks(items: Sequence[Any], size: int = ID_CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class ActiveIndex:
    """The clusters of a dataset's active index version, as the sync needs them."""

    version: int
    clusters: np.ndarray            # int64 (K,): cluster numbers
    labels: list[str | None]        # (K,): the label of each cluster (label partitions), else None
    centroids: np.ndarray           # float32 (K, dim), unit length
    by_label: dict[str | None, int] | None  # label partition: label -> row in the arrays above

    def assign(self, vectors: np.ndarray, labels: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """Row (in :attr:`clusters`) and cosine distance of each unit vector: the nearest
        centroid, or for a label partition the cluster of the sample's label when there is one."""
        sims = vectors @ self.centroids.T
        rows = sims.argmax(axis=1)
        if self.by_label is not None:
            for i, label in enumerate(labels):
                row = self.by_label.get(label)
                if row is not None:
                    rows[i] = row
        return rows, 1.0 - sims[np.arange(len(rows)), rows]


def load_active_index(ctx: CatalogContext, dataset_id: int, version: int) -> ActiveIndex:
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(Cluster.cluster, Cluster.label, Cluster.centroid)
            .where(Cluster.dataset_id == dataset_id, Cluster.index_version == version).order_by(Cluster.cluster)
        ).all()
        partition = _index_params(session, dataset_id).get("partition")
    if not rows or any(c is None for _, _, c in rows):
        raise JobFailed(f"index version {version} has no cluster centroids to place new samples with", hint="re-index the dataset")
    centroids = normalize_rows(np.stack([np.frombuffer(bytes(c), dtype=np.float32) for _, _, c in rows]))
    labels = [lab for _, lab, _ in rows]
    by_label = None
    if partition == "labels" or (partition is None and any(lab is not None for lab in labels)):
        by_label = {lab: i for i, lab in enumerate(labels)}
    return ActiveIndex(version, np.array([c for c, _, _ in rows], dtype=np.int64), labels, centroids, by_label)


def _index_params(session: Session, dataset_id: int, backbone_version: str | None = None) -> dict[str, Any]:
    """The options of the last successful index job of the dataset (with that backbone version, when given)."""
    jobs = session.exec(
        select(Job).where(Job.dataset_id == dataset_id, Job.kind == "index", Job.status == JobStatus.succeeded)
        .order_by(col(Job.finished_at).desc(), col(Job.created_at).desc())
    ).all()
    for job in jobs:
        made = ((job.result or {}).get("backbone") or {}).get("version")
        if backbone_version is None or made == backbone_version:
            return dict(job.params or {})
    return {}


def backbone_of(ctx: CatalogContext, dataset_id: int, space: str) -> Backbone:
    """The backbone of the dataset's embedding space ``space`` (its version), loaded again.

    Its spec (and weights) come from the last successful index job that made that space; a
    catalog without that job (rows copied by hand) falls back on the space's name for the
    default and torchvision backbones. The loaded backbone must give the same version, else
    the new vectors would not be comparable with the centroids."""
    with Session(ctx.engine) as session:
        params = _index_params(session, dataset_id, space)
        name = session.get(Dataset, dataset_id).name
    known = {f.name for f in fields(IndexRequest)}
    if params:
        request = IndexRequest(**{k: v for k, v in params.items() if k in known})
    elif space.startswith("rotnet-"):
        request = IndexRequest(backbone="default")
    elif space.startswith("torchvision-"):
        request = IndexRequest(backbone="torchvision:" + space.removeprefix("torchvision-").rsplit("-", 1)[0])
    else:
        raise JobFailed(f"cannot tell which backbone made the embedding space {space!r} of {name!r}: no index job of it is recorded",
                        hint=f"re-index it ('nds index {name} --backbone ...'), then sync")
    backbone = resolve_backbone(ctx, request)
    if backbone.version != space:
        raise JobFailed(f"the backbone {request.backbone!r} now gives the embedding space {backbone.version!r}, not {space!r}, "
                        f"the space of the index of {name!r}", hint=f"re-index it ('nds index {name}'): a sync cannot mix two spaces")
    return backbone


def sample_indexed_distances(ctx: CatalogContext, dataset_id: int, index: ActiveIndex, collection: str) -> np.ndarray | None:
    """Cosine distances of up to :data:`DISTANCE_SAMPLE` indexed samples (drawn with a fixed seed)
    to their own cluster's centroid, their vectors read from the vector store; None if it lacks them."""
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(Assignment.sample_id, Assignment.cluster)
            .where(Assignment.dataset_id == dataset_id, Assignment.index_version == index.version).order_by(Assignment.sample_id)
        ).all()
    if not rows:
        return None
    take = np.sort(np.random.default_rng(0).choice(len(rows), size=min(DISTANCE_SAMPLE, len(rows)), replace=False))
    ids = [int(rows[i][0]) for i in take]
    row_of = {int(c): i for i, c in enumerate(index.clusters.tolist())}
    try:
        vectors = normalize_rows(ctx.vectors.fetch_vectors(collection, ids))
    except NotFoundError as exc:
        log.warning("sync of dataset %s: indexed distances not measured: %s", dataset_id, exc)
        return None
    centroid_rows = np.array([row_of.get(int(rows[i][1]), -1) for i in take])
    keep = centroid_rows >= 0
    return 1.0 - np.einsum("ij,ij->i", vectors[keep], index.centroids[centroid_rows[keep]])


@dataclass
class Placement:
    """Where the new samples went: (sample id, cluster, label) of each placed one, their distances."""

    assigned: list[tuple[int, int, str | None]]
    distances: np.ndarray
    undecodable: list[dict[str, str]]
    undecodable_count: int = 0
    indexed_distances: np.ndarray | None = None


def place_new_samples(ctx: CatalogContext, dataset_id: int, first: int, index: ActiveIndex, backbone: Backbone, collection: str,
                      report: JobReporter) -> Placement:
    """Embed the samples stored at positions from ``first``, :data:`EMBED_CHUNK` at a time: assign
    each to a cluster and upsert its point (payload dataset_id, label), as indexing does. Images
    that cannot be read or decoded stay registered without a cluster, as indexing leaves them."""
    with Session(ctx.engine) as session:
        total = session.exec(select(func.count()).select_from(Sample).where(Sample.dataset_id == dataset_id, Sample.position >= first)).one()
    assigned: list[tuple[int, int, str | None]] = []
    distances: list[np.ndarray] = []
    undecodable: list[dict[str, str]] = []
    failures = 0
    done, after = 0, first - 1
    store = ctx.vectors
    store.ensure_collection(collection, backbone.dim)
    workers = max(ctx.settings.scan_workers, 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nds-sync-read") as pool:
        while True:
            with Session(ctx.engine) as session:
                rows = session.exec(
                    select(Sample.id, Sample.uri, Sample.label, Sample.shard, Sample.offset, Sample.byte_size, Sample.position)
                    .where(Sample.dataset_id == dataset_id, Sample.position > after).order_by(Sample.position).limit(EMBED_CHUNK)
                ).all()
            if not rows:
                break
            after = int(rows[-1][6])
            read = list(pool.map(_image_source, rows))
            readable = [i for i, (src, _) in enumerate(read) if src is not None]
            failed = [(i, why) for i, (src, why) in enumerate(read) if src is None]
            loaded = load_images([read[i][0] for i in readable], backbone.input_size, workers=workers, max_pixels=ctx.settings.max_image_pixels)
            failed += [(readable[j], why) for j, why in loaded.failed]
            ok = [readable[j] for j in loaded.index.tolist()]
            if ok:
                vectors = normalize_rows(backbone.embed(loaded.images))
                nonzero = np.linalg.norm(vectors, axis=1) > 0
                failed += [(ok[j], "its embedding is all zeros") for j in np.flatnonzero(~nonzero).tolist()]
                ok = [i for i, keep in zip(ok, nonzero.tolist()) if keep]
                vectors = vectors[nonzero]
            if ok:
                labels = [rows[i][2] for i in ok]
                cluster_rows, dist = index.assign(vectors, labels)
                ids = [int(rows[i][0]) for i in ok]
                store.upsert(collection, ids, vectors, [{"dataset_id": dataset_id, "label": lab} for lab in labels])
                assigned += [(sid, int(index.clusters[r]), lab) for sid, r, lab in zip(ids, cluster_rows.tolist(), labels)]
                distances.append(dist.astype(np.float64))
            failures += len(failed)
            for i, why in sorted(failed)[: max(MAX_LISTED_SKIPS - len(undecodable), 0)]:
                undecodable.append({"uri": rows[i][1], "reason": why})
            done += len(rows)
            report.progress(done / max(total, 1))
    return Placement(assigned, np.concatenate(distances) if distances else np.zeros(0), undecodable, failures)


def _image_source(row: tuple[Any, ...]) -> tuple[str | bytes | None, str | None]:
    """What :func:`load_images` decodes for a sample row: its local path, or its bytes read
    with the I/O layer (a tar member or Parquet row: one ranged read; object storage)."""
    _, uri, _, shard, offset, size, _ = row
    if shard is None and not storage.is_remote(uri):
        return uri, None
    try:
        return storage.read_location(storage.Location(uri, shard, offset, size)), None
    except ServiceUnavailableError:
        raise
    except NDSError as exc:
        return None, exc.message


# --------------------------------------------------------------------------- commit


def commit_sync(ctx: CatalogContext, dataset_id: int, version: int, removed: Sequence[int],
                assigned: Sequence[tuple[int, int, str | None]]) -> int:
    """One transaction: the removed samples go; with an index (``version`` > 0), a new index
    version holds the active one's groups less the removed samples plus ``assigned``, the
    experts move to it, versions older than ``version`` are dropped and it becomes the active
    one; the dataset's counts are updated. Returns the active version after it."""
    new_version = version + 1 if version > 0 else 0
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise JobFailed(f"dataset {dataset_id} no longer exists")
        if dataset.index_version != version:
            raise JobFailed(f"the index of {dataset.name!r} changed during the sync (version {dataset.index_version}, not {version})",
                            hint="sync again")
        if version > 0:
            _write_version(session, dataset_id, version, new_version, removed, assigned)
        for chunk in _chunks(list(removed)):
            session.exec(delete(Assignment).where(col(Assignment.dataset_id) == dataset_id, col(Assignment.sample_id).in_(chunk)))
            session.exec(delete(Sample).where(col(Sample.dataset_id) == dataset_id, col(Sample.id).in_(chunk)))
        dataset.num_samples = session.exec(select(func.count()).select_from(Sample).where(Sample.dataset_id == dataset_id)).one()
        labels = sorted(x for x in session.exec(select(Sample.label).where(Sample.dataset_id == dataset_id, col(Sample.label).is_not(None)).distinct()).all()
                        if x is not None)
        dataset.labels, dataset.num_labels = labels, len(labels)
        if version > 0:
            dataset.index_version = new_version
        dataset.settle()
        dataset.updated_at = utcnow()
    return new_version


def _label_is(column: Any, label: str | None) -> Any:  # noqa: ANN401 - SQL expressions
    return column.is_(None) if label is None else column == label


def _write_version(session: Session, dataset_id: int, version: int, new_version: int, removed: Sequence[int],
                   assigned: Sequence[tuple[int, int, str | None]]) -> None:
    for table in (Assignment, Cluster, Expert, Group):  # nothing should be there; a clean start all the same
        session.exec(delete(table).where(table.dataset_id == dataset_id, table.index_version == new_version))
    sizes: dict[tuple[int, str | None], int] = {
        (int(c), lab): int(n) for c, lab, n in session.exec(
            select(Group.cluster, Group.label, Group.size).where(Group.dataset_id == dataset_id, Group.index_version == version)).all()
    }
    gone: dict[tuple[int, str | None], list[int]] = {}
    for chunk in _chunks(list(removed)):
        for c, lab, rank in session.exec(
            select(Assignment.cluster, Assignment.label, Assignment.rank)
            .where(Assignment.dataset_id == dataset_id, Assignment.index_version == version, col(Assignment.sample_id).in_(chunk))
        ).all():
            gone.setdefault((int(c), lab), []).append(int(rank))
    a = Assignment.__table__
    session.execute(insert(a).from_select(
        ["sample_id", "index_version", "dataset_id", "cluster", "label", "rank"],
        select(a.c.sample_id, literal(new_version), a.c.dataset_id, a.c.cluster, a.c.label, a.c.rank)
        .where(a.c.dataset_id == dataset_id, a.c.index_version == version),
    ))
    for chunk in _chunks(list(removed)):
        session.execute(delete(a).where(a.c.dataset_id == dataset_id, a.c.index_version == new_version, a.c.sample_id.in_(chunk)))
    # the last samples of each group fill the ranks the removed ones left: ranks stay 0..n-1
    moves: list[dict[str, int]] = []
    for (c, lab), ranks in gone.items():
        size = sizes.get((c, lab), 0)
        kept = size - len(ranks)
        holes = sorted(r for r in ranks if r < kept)
        if holes:
            movers = session.execute(
                select(a.c.sample_id).where(a.c.dataset_id == dataset_id, a.c.index_version == new_version, a.c.cluster == c,
                                            _label_is(a.c.label, lab), a.c.rank >= kept).order_by(a.c.rank)
            ).scalars().all()
            if len(movers) != len(holes):
                raise JobFailed(f"the groups of index version {version} do not match its assignments (cluster {c}, label {lab!r})",
                                hint="re-index the dataset")
            moves += [{"sid": int(sid), "to": rank} for sid, rank in zip(movers, holes)]
        sizes[(c, lab)] = kept
    if moves:
        session.execute(update(a).where(a.c.sample_id == bindparam("sid"), a.c.index_version == new_version).values(rank=bindparam("to")), moves)
    rows = []
    for sid, c, lab in assigned:
        rank = sizes.get((c, lab), 0)
        sizes[(c, lab)] = rank + 1
        rows.append({"sample_id": sid, "index_version": new_version, "dataset_id": dataset_id, "cluster": c, "label": lab, "rank": rank})
    bulk_insert(session, a, rows)  # COPY on PostgreSQL, executemany on SQLite: in this transaction
    groups = sorted(((k, n) for k, n in sizes.items() if n > 0), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or ""))
    bulk_insert(session, Group, [{"dataset_id": dataset_id, "index_version": new_version, "cluster": c, "label": lab, "size": n}
                                 for (c, lab), n in groups])
    per_cluster: Counter[int] = Counter()
    for (c, _), n in groups:
        per_cluster[c] += n
    clusters = session.exec(select(Cluster).where(Cluster.dataset_id == dataset_id, Cluster.index_version == version).order_by(Cluster.cluster)).all()
    bulk_insert(session, Cluster, [
        {"dataset_id": dataset_id, "index_version": new_version, "cluster": k.cluster, "size": int(per_cluster.get(k.cluster, 0)),
         "label": k.label, "centroid": k.centroid, "created_at": utcnow()} for k in clusters
    ])
    # the experts are the same networks: their rows (and ids) move to the new version
    session.exec(update(Expert).where(col(Expert.dataset_id) == dataset_id, col(Expert.index_version) == version).values(index_version=new_version))
    # keep the previous version (queries made on it still read it); drop older ones
    for table in (Assignment, Cluster, Expert, Group):
        session.exec(delete(table).where(table.dataset_id == dataset_id, table.index_version < version))


# --------------------------------------------------------------------------- undo


def drop_uncommitted_samples(ctx: CatalogContext, dataset_id: int) -> int:
    """Remove the samples a sync stored but did not commit (and their points); how many.

    Those are the samples past the dataset's first ``num_samples`` positions (a sync stores
    after every committed sample and counts them only when it commits), and never one with
    an assignment (a guard: an index job that ran meanwhile made them committed ones)."""
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            return 0
        count = session.exec(select(func.count()).select_from(Sample).where(Sample.dataset_id == dataset_id)).one()
        if count <= dataset.num_samples:
            return 0
        cut = session.exec(select(Sample.position).where(Sample.dataset_id == dataset_id).order_by(Sample.position)
                           .offset(dataset.num_samples).limit(1)).first()
        if cut is None:
            return 0
        assigned = select(Assignment.sample_id).where(Assignment.dataset_id == dataset_id)
        ids = [int(i) for i in session.exec(select(Sample.id).where(Sample.dataset_id == dataset_id, Sample.position >= cut,
                                                                     col(Sample.id).not_in(assigned))).all() if i is not None]
        for chunk in _chunks(ids):
            session.exec(delete(Sample).where(col(Sample.dataset_id) == dataset_id, col(Sample.id).in_(chunk)))
        space = dataset.backbone if dataset.index_version > 0 else None
    if space and ids:
        _delete_points(ctx, space, ids)
    if ids:
        log.info("removed %d samples of dataset %s that a sync stored but did not commit", len(ids), dataset_id)
    return len(ids)


def _delete_points(ctx: CatalogContext, space: str, ids: Sequence[int]) -> None:
    """Best effort: a point left behind belongs to no sample, and search reads only points
    with a sample and an assignment of the active version."""
    if not ids:
        return
    try:
        ctx.vectors.delete_points(collection_name(space), list(ids))
    except NotFoundError:
        pass
    except NDSError as exc:
        log.warning("could not delete %d points of removed samples from %s: %s", len(ids), collection_name(space), exc)


def release(ctx: CatalogContext, dataset_id: int | None) -> None:
    """The dataset back to 'indexed' (it has an index) or 'ready', changing nothing else."""
    if dataset_id is None:
        return
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is not None and dataset.status == DatasetStatus.indexing:
            dataset.settle()


def undo_sync(ctx: CatalogContext, dataset_id: int | None) -> None:
    """After a failed sync: remove what it stored, put the dataset's status back."""
    if dataset_id is None:
        return
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != DatasetStatus.indexing:
            return
    drop_uncommitted_samples(ctx, dataset_id)
    restore_status(ctx, dataset_id)  # as after a failed index job: its status back, points outside its space dropped


register_job_kind(JobKind(SYNC, handler=run_sync, queue_class=GPU, undo=undo_sync))


# --------------------------------------------------------------------------- summary


def _stats(values: np.ndarray | None) -> dict[str, Any] | None:
    if values is None or len(values) == 0:
        return None
    return {"n": int(len(values)), "mean": round(float(values.mean()), 4), "p90": round(float(np.percentile(values, 90)), 4)}


def advice(placed: Placement | None, *, added: int, removed: int, indexed: int) -> dict[str, Any]:
    """Whether a full re-index is due, and why, from the distances and the share changed."""
    if placed is None:
        return {"advised": False, "reason": "not indexed: the samples are registered, nothing to place"}
    new, old = _stats(placed.distances), _stats(placed.indexed_distances)
    reasons = []
    ratio = None
    if new and old:
        ratio = new["mean"] / old["mean"] if old["mean"] > 0 else (float("inf") if new["mean"] > 0 else 1.0)
        if ratio > REINDEX_RATIO:
            reasons.append(f"the new samples lie {ratio:.2f}x as far from their clusters' centroids as the indexed ones "
                           f"(more than {REINDEX_RATIO}x)")
    if indexed and (added + removed) / indexed > REINDEX_CHANGED_SHARE:
        reasons.append(f"{added + removed} samples added or removed against {indexed} indexed (more than {REINDEX_CHANGED_SHARE:.0%})")
    if reasons:
        return {"advised": True, "ratio": ratio, "reason": "re-index advised: " + "; ".join(reasons)}
    if ratio is not None:
        return {"advised": False, "ratio": ratio,
                "reason": f"no re-index needed: the new samples lie {ratio:.2f}x as far from their clusters' centroids as the indexed ones"}
    return {"advised": False, "ratio": None, "reason": "no re-index needed" + ("" if new else ": no new sample was placed")}


def _result(base: dict[str, Any], scan: StoredScan, *, added: int, removed: int, num_samples: int, version: int, previous: int | None,
            changed: bool, placed: Placement | None, timings: dict[str, float]) -> dict[str, Any]:
    indexed = len(placed.indexed_distances) if placed is not None and placed.indexed_distances is not None else 0
    indexed_total = num_samples - added + removed
    return {
        **base,
        "changed": changed,
        "added": added,
        "removed": removed,
        "num_samples": num_samples,
        "index_version": version,
        "previous_index_version": previous,
        "placed": len(placed.assigned) if placed is not None else 0,
        "undecodable": placed.undecodable_count if placed is not None else 0,
        "undecodable_files": placed.undecodable if placed is not None else [],
        "skipped": scan.skipped,
        "skipped_reasons": dict(scan.reasons),
        "skipped_files": scan.listed,
        "skipped_parts": scan.skipped_parts,
        "distance": None if placed is None else {
            "new": _stats(placed.distances), "indexed": _stats(placed.indexed_distances), "indexed_sampled": indexed,
        },
        "reindex": advice(placed, added=added, removed=removed, indexed=max(indexed_total, 0)) if changed
        else {"advised": False, "ratio": None, "reason": "nothing changed"},
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
