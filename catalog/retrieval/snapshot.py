"""Columnar snapshots of index versions: what a manifest takes its rows from, in bulk.

A snapshot holds one row per assignment of one (dataset, index version): the sample's id,
uri, label, shard, offset, size and metadata (JSON text), grouped by (cluster, label) group,
each group's rows in rank order, so a stored query's pick (group, rank) is the row
``start[group] + rank``: a manifest is an array take (:mod:`nds.catalog.retrieval.manifest`).
SQL stays the source of truth: a snapshot is derived from it, one ordered SELECT streamed in
record batches (bounded memory), and rebuilt from it whenever the file is missing, damaged
or does not match the catalog.

**Format.** An Arrow IPC file, uncompressed (memory-mapped, never read into memory), at
:func:`snapshot_key` in the artifact store (temp file + rename, like every artifact). Its
schema's metadata (``nds.snapshot``, JSON) names the dataset, the index version and the
dataset's active version it was built at, the number of rows, and the groups in the catalog's
order (``Group.id``: the order of a query's group table): cluster, label, size, and the row of
its rank 0 (rows are in the database's ``ORDER BY cluster, label, rank``, whatever its
collation; the builder checks every row against that layout).

**Versions that lose samples.** A committed index version never changes, except that a sync
deletes the samples it removes (and their assignments) from the versions it keeps: a query on
the previous version still reads its picks, less the removed samples. That commit also makes
a new version active, so the key carries the active version the snapshot was built at: after
a sync the previous version's snapshot is rebuilt (once, on first use) under the new key.
A pick whose sample is gone has a row with a null ``sample_id`` (ranks keep their rows).

:func:`write_snapshot` builds the snapshot of a committed version (idempotent: an existing
valid file is kept); :func:`open_snapshot` returns it, memory-mapped and cached per process
(a bounded LRU; a local file deleted or replaced since is opened again), building it first
when needed. :class:`SnapshotUnavailable` means no snapshot can serve (the store cannot be
written, the rows do not match their groups): callers fall back to the SQL path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from sqlalchemy import Connection, Text, cast, select
from sqlmodel import col

from nds.catalog.tables import Assignment, Dataset, Group, Sample
from nds_client.errors import NDSError, NotFoundError

if TYPE_CHECKING:
    from nds.catalog.context import CatalogContext

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "snapshots"
SNAPSHOT_FORMAT = 1
BATCH_ROWS = 65_536  # rows per record batch, per streamed SELECT partition
CACHE_ENTRIES = 32   # opened snapshots kept per process
RETRIES = 3          # builds started again when the dataset's active version moved meanwhile

SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("uri", pa.string()), ("label", pa.string()), ("shard", pa.string()),
    ("offset", pa.int64()), ("size", pa.int64()), ("meta", pa.string()),
])


class SnapshotUnavailable(Exception):
    """No snapshot can serve this (dataset, version): read it with SQL."""


def snapshot_key(dataset_id: int, version: int, active: int) -> str:
    """The artifact key of the snapshot of ``version`` built while ``active`` was the dataset's active version."""
    return f"{SNAPSHOT_PREFIX}/{dataset_id}/v{version}-a{active}.arrow"


def parse_snapshot_key(key: str) -> tuple[int, int, int] | None:
    """(dataset id, version, active version) of a snapshot key; None for any other key."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != SNAPSHOT_PREFIX or not parts[1].isdigit() or not parts[2].endswith(".arrow"):
        return None
    version, _, active = parts[2][: -len(".arrow")].partition("-")
    if not (version.startswith("v") and version[1:].isdigit() and active.startswith("a") and active[1:].isdigit()):
        return None
    return int(parts[1]), int(version[1:]), int(active[1:])


# --------------------------------------------------------------------------- the groups


@dataclass(frozen=True)
class SnapshotGroups:
    """A version's groups in catalog order (``Group.id``), and where each one's rows start."""

    cluster: np.ndarray  # int64 (G,)
    label: tuple[str | None, ...]
    size: np.ndarray     # int64 (G,)
    start: np.ndarray    # int64 (G,): the row of rank 0

    def digest(self) -> str:
        h = hashlib.sha256()
        for array in (self.cluster, self.size, self.start):
            h.update(np.ascontiguousarray(array, dtype="<i8").tobytes())
        h.update(json.dumps(list(self.label)).encode())
        return h.hexdigest()


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<i8").tobytes()).decode()


def _unb64(text: Any, n: int) -> np.ndarray:  # noqa: ANN401 - a JSON value
    if not isinstance(text, str):
        raise ValueError("not base64 text")
    array = np.frombuffer(base64.b64decode(text, validate=True), dtype="<i8").astype(np.int64)
    if len(array) != n:
        raise ValueError("wrong length")
    return array


# --------------------------------------------------------------------------- building


def _active_version(conn: Connection, dataset_id: int) -> int | None:
    return conn.execute(select(col(Dataset.index_version)).where(col(Dataset.id) == dataset_id)).scalar()


def _layout(conn: Connection, dataset_id: int, version: int) -> SnapshotGroups | None:
    """The groups in catalog order, with their starts in the database's row order; None when the
    version has no groups (gone)."""
    where = (col(Group.dataset_id) == dataset_id, col(Group.index_version) == version)
    rows = conn.execute(select(col(Group.cluster), col(Group.label), col(Group.size)).where(*where).order_by(col(Group.id))).all()
    if not rows:
        return None
    cluster = np.array([int(r[0]) for r in rows], dtype=np.int64)
    label = tuple(r[1] for r in rows)
    size = np.array([int(r[2]) for r in rows], dtype=np.int64)
    index = {(int(c), lab): i for i, (c, lab) in enumerate(zip(cluster.tolist(), label))}
    if len(index) != len(rows) or (size < 0).any():
        raise SnapshotUnavailable(f"index version {version} of dataset {dataset_id} has duplicate or negative groups")
    # the order rows come in: the same ORDER BY, on a column of the same type, as the rows' select
    ordered = conn.execute(select(col(Group.cluster), col(Group.label)).where(*where).order_by(col(Group.cluster), col(Group.label))).all()
    order = [index[(int(c), lab)] for c, lab in ordered]
    start = np.zeros(len(rows), dtype=np.int64)
    start[order] = np.cumsum(size[order]) - size[order]
    return SnapshotGroups(cluster, label, size, start)


_ROWS = (
    select(col(Assignment.cluster), col(Assignment.label), col(Assignment.rank), col(Sample.id), col(Sample.uri), col(Sample.label),
           col(Sample.shard), col(Sample.offset), col(Sample.byte_size), cast(col(Sample.meta), Text))
    .select_from(Assignment)
    .outerjoin(Sample, col(Sample.id) == col(Assignment.sample_id))
    .order_by(col(Assignment.cluster), col(Assignment.label), col(Assignment.rank))
)


def _write_rows(conn: Connection, dataset_id: int, version: int, groups: SnapshotGroups, path: Path, metadata: dict) -> None:
    """Stream the version's rows into an IPC file at ``path``: holes (removed samples) as null rows."""
    index = {(int(groups.cluster[i]), groups.label[i]): i for i in range(len(groups.size))}
    total = int(groups.size.sum())
    ends = groups.start + groups.size
    written = 0
    stmt = _ROWS.where(col(Assignment.dataset_id) == dataset_id, col(Assignment.index_version) == version)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA.with_metadata({"nds.snapshot": json.dumps(metadata)})) as writer:
        result = conn.execution_options(stream_results=True, yield_per=BATCH_ROWS).execute(stmt)
        for part in result.partitions(BATCH_ROWS):
            columns = list(zip(*part))
            try:
                group = np.fromiter((index[(int(c), lab)] for c, lab in zip(columns[0], columns[1])), dtype=np.int64, count=len(part))
            except KeyError as exc:
                raise SnapshotUnavailable(f"an assignment of index version {version} of dataset {dataset_id} is in no group: {exc}") from None
            rank = np.asarray(columns[2], dtype=np.int64)
            row = groups.start[group] + rank
            if (rank < 0).any() or (row >= ends[group]).any() or row[0] < written or (np.diff(row) <= 0).any():
                raise SnapshotUnavailable(f"the assignments of index version {version} of dataset {dataset_id} do not match its groups")
            batch = pa.record_batch([
                pa.array(columns[3], pa.int64()), pa.array(columns[4], pa.string()), pa.array(columns[5], pa.string()),
                pa.array(columns[6], pa.string()), pa.array(columns[7], pa.int64()), pa.array(columns[8], pa.int64()),
                pa.array(columns[9], pa.string()),
            ], schema=SCHEMA)
            span = int(row[-1]) + 1 - written
            if span != len(part):  # ranks left by removed samples: null rows in their place
                take = np.full(span, -1, dtype=np.int64)
                take[row - written] = np.arange(len(part))
                batch = batch.take(pa.array(take, mask=take < 0))
            writer.write_batch(batch)
            written += span
        while written < total:
            n = min(BATCH_ROWS, total - written)
            writer.write_batch(pa.record_batch([pa.nulls(n, f.type) for f in SCHEMA], schema=SCHEMA))
            written += n


def _build(ctx: CatalogContext, dataset_id: int, version: int) -> tuple[str, int] | None:
    """Build and publish the snapshot of (dataset, version) at the dataset's active version:
    (its key, that active version), or None when the dataset or the version is gone."""
    for _ in range(RETRIES):
        with ctx.engine.connect() as conn:
            active = _active_version(conn, dataset_id)
            groups = None if active is None else _layout(conn, dataset_id, version)
            if active is None or groups is None:
                return None
            key = snapshot_key(dataset_id, version, active)
            metadata = {
                "format": SNAPSHOT_FORMAT, "dataset_id": dataset_id, "version": version, "active": active,
                "rows": int(groups.size.sum()), "groups": len(groups.size), "labels": list(groups.label),
                "cluster": _b64(groups.cluster), "size": _b64(groups.size), "start": _b64(groups.start), "digest": groups.digest(),
            }

            def write(path: Path, conn: Connection = conn, groups: SnapshotGroups = groups, active: int = active, metadata: dict = metadata) -> None:
                _write_rows(conn, dataset_id, version, groups, path, metadata)
                # a sync that committed meanwhile (it removes samples and moves the active version in
                # one transaction) may have changed what was read: build again under the new key
                if _active_version(conn, dataset_id) != active:
                    raise _Moved

            try:
                ctx.artifacts.write_with(key, write, durable=False)
            except _Moved:
                continue
            except NDSError as exc:  # the store is full or unwritable: the SQL path serves
                raise SnapshotUnavailable(f"cannot write snapshot {key}: {exc.message}") from exc
            log.info("wrote snapshot %s (%d rows)", key, metadata["rows"])
            return key, active
    raise SnapshotUnavailable(f"the index of dataset {dataset_id} kept changing while its snapshot was built")


class _Moved(Exception):
    pass


# --------------------------------------------------------------------------- reading


class Snapshot:
    """One memory-mapped snapshot: its groups and :meth:`take` of rows."""

    def __init__(self, key: str, path: Path, dataset_id: int, version: int, active: int) -> None:
        self.key, self.path = key, path
        self._map = pa.memory_map(str(path), "r")
        try:
            reader = pa.ipc.open_file(self._map)
            if not reader.schema.equals(SCHEMA, check_metadata=False):
                raise ValueError("unexpected columns")
            meta = json.loads((reader.schema.metadata or {}).get(b"nds.snapshot", b"null"))
            if not isinstance(meta, dict) or meta.get("format") != SNAPSHOT_FORMAT:
                raise ValueError("unknown format")
            if (meta.get("dataset_id"), meta.get("version"), meta.get("active")) != (dataset_id, version, active):
                raise ValueError("another version's snapshot")
            G, rows, labels = meta.get("groups"), meta.get("rows"), meta.get("labels")
            if not (isinstance(G, int) and isinstance(rows, int) and isinstance(labels, list) and len(labels) == G):
                raise ValueError("bad counts")
            if not all(lab is None or isinstance(lab, str) for lab in labels):
                raise ValueError("bad labels")
            self.groups = SnapshotGroups(_unb64(meta.get("cluster"), G), tuple(labels), _unb64(meta.get("size"), G), _unb64(meta.get("start"), G))
            if self.groups.digest() != meta.get("digest"):
                raise ValueError("digest mismatch")
            if (self.groups.size < 0).any() or int(self.groups.size.sum()) != rows:
                raise ValueError("bad group sizes")
            by_start = np.argsort(self.groups.start, kind="stable")
            if not np.array_equal(self.groups.start[by_start], np.cumsum(self.groups.size[by_start]) - self.groups.size[by_start]):
                raise ValueError("groups do not tile the rows")
            self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            lengths = np.array([len(b) for b in self.batches], dtype=np.int64)
            if int(lengths.sum()) != rows:
                raise ValueError(f"{int(lengths.sum())} rows where the header says {rows}")
            self.bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        except BaseException:
            self._map.close()
            raise
        self.rows = rows
        self.dataset_id, self.version, self.active = dataset_id, version, active
        self._cell: dict[tuple[int, str | None], int] | None = None

    def take(self, rows: np.ndarray) -> pa.RecordBatch:
        """The snapshot's rows ``rows`` (int64, any order, each in [0, rows)), as one record batch in that order.

        Taken batch by batch (a take over the whole chunked file would concatenate it first):
        a run of consecutive rows is a zero-copy slice of the mapped file."""
        if len(rows) == 0:
            return pa.record_batch([pa.array([], f.type) for f in SCHEMA], schema=SCHEMA)
        steps = np.diff(rows)
        order = None if bool((steps > 0).all()) else np.argsort(rows, kind="stable")
        wanted = rows if order is None else rows[order]
        strict = order is None or bool((np.diff(wanted) > 0).all())
        cuts = np.searchsorted(wanted, self.bounds)
        parts = []
        for b in np.flatnonzero(cuts[1:] > cuts[:-1]).tolist():
            lo, hi = int(cuts[b]), int(cuts[b + 1])
            first, last = int(wanted[lo] - self.bounds[b]), int(wanted[hi - 1] - self.bounds[b])
            if strict and last - first == hi - lo - 1:
                parts.append(self.batches[b].slice(first, hi - lo))  # consecutive rows: no copy
            else:
                parts.append(self.batches[b].take(pa.array(wanted[lo:hi] - self.bounds[b])))
        out = parts[0] if len(parts) == 1 else pa.concat_batches(parts)
        if order is not None:
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            out = out.take(pa.array(back))
        return out

    def close(self) -> None:
        self.batches = []
        self._map.close()


_cache: OrderedDict[tuple[str, str], tuple[Snapshot, tuple[int, int, int] | None]] = OrderedDict()
_cache_lock = threading.Lock()
_build_locks: dict[tuple[str, str], threading.Lock] = {}


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _cached(ctx: CatalogContext, key: str) -> Snapshot | None:
    """The opened snapshot of ``key`` when it is still the file on disk (local stores: same inode,
    size and time; a store in object storage: its cached copy)."""
    ident = (ctx.artifacts.uri, key)
    with _cache_lock:
        hit = _cache.get(ident)
        if hit is None:
            return None
        snap, seen = hit
        if _signature(snap.path) == seen:
            _cache.move_to_end(ident)
            return snap
        del _cache[ident]
    return None


def _remember(ctx: CatalogContext, snap: Snapshot) -> None:
    ident = (ctx.artifacts.uri, snap.key)
    with _cache_lock:
        _cache[ident] = (snap, _signature(snap.path))
        _cache.move_to_end(ident)
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)  # its memory map closes when the last batch taken from it goes


def _open_file(ctx: CatalogContext, key: str, dataset_id: int, version: int, active: int) -> Snapshot | None:
    """The snapshot at ``key``, or None when it is missing or unreadable (a damaged file is removed)."""
    try:
        path = ctx.artifacts.open_path(key)
    except (NotFoundError, FileNotFoundError):
        return None
    try:
        return Snapshot(key, path, dataset_id, version, active)
    except (OSError, ValueError, pa.ArrowException) as exc:
        log.warning("snapshot %s is unreadable (%s): building it again", key, exc)
        return None


def _matches_catalog(ctx: CatalogContext, snap: Snapshot) -> bool:
    """Whether the snapshot's groups are the catalog's groups of its version (cached per process)."""
    with ctx.engine.connect() as conn:
        groups = ctx.groups.get(conn, snap.dataset_id, snap.version)
    return (np.array_equal(groups.cluster, snap.groups.cluster) and np.array_equal(groups.size, snap.groups.size)
            and tuple(groups.label) == snap.groups.label)


def open_snapshot(ctx: CatalogContext, dataset_id: int, version: int, *, active: int | None = None) -> Snapshot:
    """The snapshot of (dataset, version) as of the dataset's active version (``active``, read
    from the catalog when not given), memory-mapped; built from SQL when it is missing,
    unreadable or does not match the catalog. SnapshotUnavailable when none can be had."""
    if active is None:
        with ctx.engine.connect() as conn:
            active = _active_version(conn, dataset_id)
        if active is None:
            raise SnapshotUnavailable(f"dataset {dataset_id} is gone")
    key = snapshot_key(dataset_id, version, active)
    snap = _cached(ctx, key)
    if snap is not None:
        return snap
    ident = (ctx.artifacts.uri, key)
    with _cache_lock:
        lock = _build_locks.setdefault(ident, threading.Lock())
    with lock:  # one build per key in this process; another process may build the same file: same bytes
        snap = _cached(ctx, key)
        if snap is not None:
            return snap
        snap = _open_file(ctx, key, dataset_id, version, active)
        if snap is not None and not _matches_catalog(ctx, snap):
            log.warning("snapshot %s does not match the catalog's groups: building it again", key)
            snap.close()
            snap = None
        if snap is None:
            built = _build(ctx, dataset_id, version)
            if built is None or built[1] != active:
                raise SnapshotUnavailable(f"index version {version} of dataset {dataset_id} changed while its snapshot was built")
            snap = _open_file(ctx, key, dataset_id, version, active)
            if snap is None:
                raise SnapshotUnavailable(f"snapshot {key} cannot be read back")
        _remember(ctx, snap)
    return snap


def write_snapshot(ctx: CatalogContext, dataset_id: int, version: int) -> str | None:
    """Build the snapshot of a committed (dataset, version) unless a valid one is there: its key,
    or None when the version is gone or no snapshot can be written (manifests then read SQL, and
    the next one tries again, or with ``NDS_MANIFEST_SNAPSHOTS=false``). For the index and sync
    commits: call it after the commit."""
    if not ctx.settings.manifest_snapshots:
        return None
    try:
        return open_snapshot(ctx, dataset_id, version).key
    except SnapshotUnavailable as exc:
        log.warning("no snapshot of index version %s of dataset %s: %s", version, dataset_id, exc)
        return None
