"""A stored query's picks resolved to samples: the manifest rows, chunk by chunk, in a fixed order.

The columns are :data:`nds_client.manifests.MANIFEST_COLUMNS`, the one definition the client reads too.

Picks are resolved in bulk from the columnar snapshot of each index version
(:mod:`nds.catalog.retrieval.snapshot`): a chunk of picks (group, rank) is the snapshot rows
``start[group] + rank``, one array take, and the manifest columns are pyarrow arrays
(:func:`iter_manifest_batches`), written by the exporters' columnar path. Row objects
(:func:`iter_manifest`, :class:`ManifestRow`) are made from those batches for the callers that
want rows. :func:`iter_manifest_sql` is the previous path (SQL lookups per chunk, a Python
object per row): the reference the snapshot path is tested against byte for byte, and what
serves when no snapshot can be had (the artifact store cannot be written) or when
``NDS_MANIFEST_SNAPSHOTS=false``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import select as sa_select
from sqlalchemy import tuple_
from sqlmodel import Session, col, select

from nds.catalog.access import LOCAL, Principal
from nds.catalog.context import CatalogContext
from nds.catalog.retrieval.picks import open_picks
from nds.catalog.retrieval.snapshot import Snapshot, SnapshotUnavailable, open_snapshot
from nds.catalog.tables import Assignment, Dataset, Group, Query, Sample
from nds.catalog.uris import uri_column_view
from nds.plugins.contract import Exporter
from nds_client.errors import GoneError, NotFoundError
from nds_client.manifests import MANIFEST_COLUMNS
from nds_client.storage import Location, read_location

log = logging.getLogger(__name__)

#: what :func:`iter_manifest_batches` yields: the manifest columns and ``meta`` (the sample's metadata as JSON text, or null)
BATCH_SCHEMA = Exporter.schema().append(pa.field("meta", pa.string()))
#: with ``stored=True``, also where each sample is stored (uris as stored, whatever the caller sees): what read_image reads
STORED_COLUMNS = ("stored_uri", "stored_shard", "stored_offset", "stored_size")
STORED_SCHEMA = pa.schema(list(BATCH_SCHEMA) + [("stored_uri", pa.string()), ("stored_shard", pa.string()),
                                                ("stored_offset", pa.int64()), ("stored_size", pa.int64())])


class ManifestRow(NamedTuple):
    key: str
    uri: str
    label: str | None
    dataset: str
    cluster: int
    weight: float
    count: int  # type: ignore[assignment]  # a field named count shadows tuple.count; renaming it would change the manifest API
    shard: str | None = None
    offset: int | None = None
    size: int | None = None
    # not columns: the sample's metadata (exporters may write it) and its stored location (for read_image)
    meta: dict[str, Any] | None = None
    location: Location | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as exporters and the API see it: MANIFEST_COLUMNS, and ``meta``."""
        return {**dict(zip(MANIFEST_COLUMNS, self)), "meta": self.meta}


class ImageReader:
    """``read_image(row)`` for exporters that write the images (``needs_images``): the rows of
    the last chunks remember where their samples are stored (uris as stored, whatever view
    the caller has), so the bytes are read from there with the I/O layer."""

    def __init__(self, chunks: Iterator[list[ManifestRow]], keep: int = 2) -> None:
        self._chunks = chunks
        self._keep = keep
        self._recent: list[dict[str, Location]] = []

    def rows(self) -> Iterator[list[dict[str, Any]]]:
        for chunk in self._chunks:
            self._recent = [*self._recent[-(self._keep - 1):], {r.key: r.location for r in chunk if r.location is not None}]
            yield [r.as_dict() for r in chunk]

    def __call__(self, row: dict[str, Any]) -> bytes:
        for known in reversed(self._recent):
            location = known.get(row["key"])
            if location is not None:
                return read_location(location)
        raise NotFoundError(f"{row['key']} is not among the rows being exported")


def iter_manifest_sql(
    ctx: CatalogContext, query: Query, *, offset: int = 0, limit: int | None = None, chunk: int = 2000, principal: Principal = LOCAL,
) -> Iterator[list[ManifestRow]]:
    """The query's picks as manifest rows resolved with SQL, row by row: the previous path, kept
    as the reference the snapshot path is checked against and as its fallback.

    Reads ``chunk`` picks at a time from the picks file and resolves them with a few indexed
    lookups: a rank range for each group with many nearly consecutive picks, and one
    row-value ``IN`` per dataset for the picks scattered over the other groups (a budget
    spread over a thousand groups costs a handful of round trips, not a thousand). Memory
    stays bounded whatever the number of rows.
    """
    versions = {int(k): int(v) for k, v in query.index_versions.items()}
    show = ctx.shown_uri(principal)  # client keys see uris relative to the data roots (nds.catalog.uris)
    with open_picks(ctx, query.id, datasets=set(versions)) as (table, total, read), Session(ctx.engine) as session:
        names: dict[int, str] = {}
        for dataset in session.exec(select(Dataset).where(col(Dataset.id).in_(list(versions)))).all():
            assert dataset.id is not None  # a primary key read back from the table (SQLModel types it Optional for unsaved rows)
            names[dataset.id] = dataset.name
        _check_versions_exist(session, versions, names)
        weights = table.weight
        group_of = {(int(d), int(c), lab): g for g, (d, c, lab) in enumerate(zip(table.dataset_id.tolist(), table.cluster.tolist(), table.label))}
        stop = total if limit is None else min(total, offset + limit)
        for start in range(offset, stop, chunk):
            picks = read(start, min(start + chunk, stop))
            found: dict[tuple[int, int], tuple[Any, ...]] = {}  # (group, rank) -> (sample id, uri, label, shard, offset, size, meta)
            scattered: dict[int, list[tuple[int, list[int]]]] = {}          # dataset -> [(group, ranks)]
            lookups = []                                                     # the SQL selects resolving this chunk
            bounds = np.flatnonzero(np.diff(picks.group)) + 1  # picks are sorted by group
            for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(picks.group)]])):
                g = int(picks.group[lo])
                ranks = picks.rank[lo:hi].tolist()
                d = int(table.dataset_id[g])
                if len(ranks) > 64 and ranks[-1] - ranks[0] < 4 * len(ranks):  # dense: one range scan
                    lab = table.label[g]
                    lookups.append(_ASSIGNED.where(col(Assignment.dataset_id) == d, col(Assignment.index_version) == versions[d],
                                                   col(Assignment.cluster) == int(table.cluster[g]),
                                                   col(Assignment.label).is_(None) if lab is None else col(Assignment.label) == lab,
                                                   col(Assignment.rank).between(ranks[0], ranks[-1])))
                else:
                    scattered.setdefault(d, []).append((g, ranks))
            for d, groups in scattered.items():
                labelled = [(int(table.cluster[g]), table.label[g], r) for g, ranks in groups if table.label[g] is not None for r in ranks]
                unlabelled = [(int(table.cluster[g]), r) for g, ranks in groups if table.label[g] is None for r in ranks]
                in_version = (col(Assignment.dataset_id) == d, col(Assignment.index_version) == versions[d])
                if labelled:
                    lookups.append(_ASSIGNED.where(*in_version, tuple_(Assignment.cluster, Assignment.label, Assignment.rank).in_(labelled)))
                if unlabelled:
                    lookups.append(_ASSIGNED.where(*in_version, col(Assignment.label).is_(None), tuple_(Assignment.cluster, Assignment.rank).in_(unlabelled)))
            for lookup in lookups:
                for d, cluster, label, rank, *sample in session.execute(lookup).all():  # what exec runs for a Select
                    found[(group_of[(d, cluster, label)], rank)] = tuple(sample)
            rows: list[ManifestRow] = []
            for g, rank, count in zip(picks.group.tolist(), picks.rank.tolist(), picks.count.tolist()):
                hit = found.get((g, rank))
                if hit is not None:
                    name = names[int(table.dataset_id[g])]
                    sid, uri, slabel, shard, at, size, meta = hit
                    inside = shard is not None
                    rows.append(ManifestRow(f"{name}/{sid}", show(uri), slabel, name, int(table.cluster[g]), float(weights[g]), count,
                                            show(shard) if inside else None, at if inside else None, size if inside else None,
                                            meta, Location(uri, shard, at, size)))
            yield rows


# SQLAlchemy's select: sqlmodel's select() and Session.exec() are typed for at most four columns
_ASSIGNED = sa_select(
    col(Assignment.dataset_id), col(Assignment.cluster), col(Assignment.label), col(Assignment.rank), col(Sample.id), col(Sample.uri), col(Sample.label),
    col(Sample.shard), col(Sample.offset), col(Sample.byte_size), col(Sample.meta),
).join(Sample, col(Sample.id) == col(Assignment.sample_id))


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


# --------------------------------------------------------------------------- the snapshot path


def iter_manifest_batches(
    ctx: CatalogContext, query: Query, *, offset: int = 0, limit: int | None = None, chunk: int = 2000, principal: Principal = LOCAL,
    stored: bool = False, session: Session | None = None,
) -> Iterator[pa.RecordBatch]:
    """The query's picks as manifest record batches (:data:`BATCH_SCHEMA`; :data:`STORED_SCHEMA`
    with ``stored``), in the fixed order (group, then rank), one batch per ``chunk`` picks: the
    rows :func:`iter_manifest_sql` gives, the same chunks, as columns.

    Each chunk of picks is an array take from the snapshots of the query's index versions;
    the uris are shown to ``principal`` column-wise. A gone index version or dataset is the
    same GoneError as ever, raised before the first batch. Without a snapshot (the store cannot
    be written, or ``NDS_MANIFEST_SNAPSHOTS=false``) the SQL path serves, converted to batches.
    ``session``: the caller's, for the few lookups made before the first batch (else one of its own)."""
    if not ctx.settings.manifest_snapshots:
        yield from _sql_batches(ctx, query, offset=offset, limit=limit, chunk=chunk, principal=principal, stored=stored)
        return
    versions = {int(k): int(v) for k, v in query.index_versions.items()}
    with open_picks(ctx, query.id, datasets=set(versions)) as (table, total, read):
        with nullcontext(session) if session is not None else Session(ctx.autocommit_engine) as session:
            names: dict[int, str] = {}
            active: dict[int, int] = {}
            for did, name, current in session.exec(
                select(Dataset.id, Dataset.name, Dataset.index_version).where(col(Dataset.id).in_(list(versions)))
            ).all():
                assert did is not None  # a primary key read back from the table (SQLModel types it Optional for unsaved rows)
                names[did], active[did] = name, current
            _check_versions_exist(session, versions, names)
        stop = total if limit is None else min(total, offset + limit)
        try:
            resolver = _Resolver(ctx, table, read, versions, names, active, principal, stored)
            resolver.open(offset, stop)
        except SnapshotUnavailable as exc:
            log.warning("manifest of query %s from SQL: %s", query.id, exc)
            resolver = None
        if resolver is not None:
            for start in range(offset, stop, chunk):
                yield resolver.batch(start, min(start + chunk, stop))
            return
    yield from _sql_batches(ctx, query, offset=offset, limit=limit, chunk=chunk, principal=principal, stored=stored)


def _sql_batches(ctx: CatalogContext, query: Query, *, offset: int, limit: int | None, chunk: int, principal: Principal,
                 stored: bool) -> Iterator[pa.RecordBatch]:
    schema = STORED_SCHEMA if stored else BATCH_SCHEMA
    for rows in iter_manifest_sql(ctx, query, offset=offset, limit=limit, chunk=chunk, principal=principal):
        yield rows_batch(rows, schema)


class _Resolver:
    """Picks -> manifest batches for one query: its group table mapped onto its snapshots."""

    def __init__(self, ctx: CatalogContext, table: Any, read: Any, versions: dict[int, int], names: dict[int, str],  # noqa: ANN401
                 active: dict[int, int], principal: Principal, stored: bool) -> None:
        self.ctx, self.table, self.read, self.versions, self.names, self.active, self.stored = ctx, table, read, versions, names, active, stored
        self.view = uri_column_view(principal, ctx.data_roots, ctx.settings.resolved_public_uris)
        dataset_id = np.asarray(table.dataset_id, dtype=np.int64)
        if len(dataset_id) and (np.diff(dataset_id) < 0).any():  # a layout puts each dataset's groups together, datasets ascending
            raise SnapshotUnavailable("the query's groups are not grouped by dataset")
        self.dataset_id = dataset_id
        ids, first = np.unique(dataset_id, return_index=True)
        self.first = dict(zip(ids.tolist(), first.tolist()))  # dataset -> its first group in the table
        self.cluster = np.asarray(table.cluster, dtype=np.int64)
        self.weight = np.asarray(table.weight, dtype=np.float64)
        self.snapshots: dict[int, Snapshot] = {}

    def open(self, start: int, stop: int) -> None:
        """Open (building if needed) and check the snapshots of the datasets picks [start, stop) fall in."""
        if stop <= start:
            return
        lo, hi = int(self.read(start, start + 1).group[0]), int(self.read(stop - 1, stop).group[0])
        for d in np.unique(self.dataset_id[lo:hi + 1]).tolist():
            snap = open_snapshot(self.ctx, d, self.versions[d], active=self.active[d])
            first = self.first[d]
            n = int((self.dataset_id == d).sum())
            groups = snap.groups
            if (len(groups.size) != n or not np.array_equal(groups.cluster, self.cluster[first:first + n])
                    or not np.array_equal(groups.size, np.asarray(self.table.size[first:first + n], dtype=np.int64))
                    or groups.label != tuple(self.table.label[first:first + n])):
                raise SnapshotUnavailable(f"snapshot {snap.key} does not have the groups of the query")
            self.snapshots[d] = snap

    def batch(self, start: int, stop: int) -> pa.RecordBatch:
        """Picks [start, stop) as one batch: a take from each dataset's snapshot, then every
        column built once for the whole chunk (the uri view included)."""
        picks = self.read(start, stop)
        group, count = np.asarray(picks.group, dtype=np.int64), np.asarray(picks.count, dtype=np.int64)
        d_of = self.dataset_id[group]
        cuts = np.flatnonzero(np.diff(d_of)) + 1
        taken: list[pa.RecordBatch] = []
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(d_of)]):
            d = int(d_of[lo])
            snap = self.snapshots[d]
            taken.append(snap.take(snap.groups.start[group[lo:hi] - self.first[d]] + picks.rank[lo:hi]))
        if not taken:
            return pa.record_batch([pa.array([], f.type) for f in self.schema], schema=self.schema)
        rows = taken[0] if len(taken) == 1 else pa.concat_batches(taken)
        sample_id = rows.column(0)
        if sample_id.null_count:  # samples a sync removed since the query: never named
            keep = pc.is_valid(sample_id)
            rows = rows.filter(keep)
            mask = keep.to_numpy(zero_copy_only=False)
            group, count, d_of = group[mask], count[mask], d_of[mask]
            sample_id = rows.column(0)
        return self._columns(rows, sample_id, group, count, d_of)

    @property
    def schema(self) -> pa.Schema:
        return STORED_SCHEMA if self.stored else BATCH_SCHEMA

    def _columns(self, taken: pa.RecordBatch, sample_id: pa.Array, g: np.ndarray, count: np.ndarray, d_of: np.ndarray) -> pa.RecordBatch:
        uri, shard, at, size = taken.column(1), taken.column(3), taken.column(4), taken.column(5)
        inside = pc.is_valid(shard)
        no_int = pa.scalar(None, pa.int64())
        ids, where = np.unique(d_of, return_inverse=True)
        name = pa.array([self.names[int(d)] for d in ids], pa.string()).take(pa.array(where.reshape(-1)))
        columns = [
            pc.binary_join_element_wise(name, pc.cast(sample_id, pa.string()), "/"),  # key: f"{name}/{sample id}"
            self.view(uri), taken.column(2), name,
            pa.array(self.cluster[g], pa.int64()), pa.array(self.weight[g], pa.float64()), pa.array(count, pa.int64()),
            self.view(shard), pc.if_else(inside, at, no_int), pc.if_else(inside, size, no_int), taken.column(6),
        ]
        if self.stored:
            columns += [uri, shard, at, size]
        return pa.record_batch(columns, schema=self.schema)


def rows_batch(rows: list[ManifestRow], schema: pa.Schema = BATCH_SCHEMA) -> pa.RecordBatch:
    """Manifest rows as a record batch of ``schema`` (:data:`BATCH_SCHEMA` or :data:`STORED_SCHEMA`)."""
    data: dict[str, list[Any]] = {c: [getattr(r, c) for r in rows] for c in MANIFEST_COLUMNS}
    data["meta"] = [None if r.meta is None else orjson.dumps(r.meta).decode() for r in rows]
    if schema.get_field_index("stored_uri") >= 0:
        where = [r.location or Location(r.uri) for r in rows]
        data.update(stored_uri=[w.uri for w in where], stored_shard=[w.shard for w in where],
                    stored_offset=[w.offset for w in where], stored_size=[w.size for w in where])
    return pa.record_batch([pa.array(data[f.name], f.type) for f in schema], schema=schema)


def batch_rows(batch: pa.RecordBatch) -> list[ManifestRow]:
    """A batch with the stored columns (``stored=True``) as :class:`ManifestRow` objects."""
    columns = [batch.column(c).to_pylist() for c in (*MANIFEST_COLUMNS, "meta", *STORED_COLUMNS)]
    return [ManifestRow._make([*values, None if m is None else orjson.loads(m), Location(su, ss, so, sz)])
            for *values, m, su, ss, so, sz in zip(*columns)]


def iter_manifest(
    ctx: CatalogContext, query: Query, *, offset: int = 0, limit: int | None = None, chunk: int = 2000, principal: Principal = LOCAL,
) -> Iterator[list[ManifestRow]]:
    """The query's picks as manifest rows, in a fixed order (group, then rank), chunk by chunk:
    :func:`iter_manifest_batches` made into :class:`ManifestRow` objects (for callers that want
    rows: the image exporters, the tests). Memory stays bounded whatever the number of rows."""
    for batch in iter_manifest_batches(ctx, query, offset=offset, limit=limit, chunk=chunk, principal=principal, stored=True):
        yield batch_rows(batch)
