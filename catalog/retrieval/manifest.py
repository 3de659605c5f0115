"""A stored query's picks resolved to samples: the manifest rows, chunk by chunk, in a fixed order.

The columns are :data:`nds_client.manifests.MANIFEST_COLUMNS`, the one definition the client reads too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import select as sa_select
from sqlalchemy import tuple_
from sqlmodel import Session, col, select

from nds.catalog.access import LOCAL, Principal
from nds.catalog.context import CatalogContext
from nds.catalog.retrieval.picks import open_picks
from nds.catalog.tables import Assignment, Dataset, Group, Query, Sample
from nds_client.errors import GoneError, NotFoundError
from nds_client.manifests import MANIFEST_COLUMNS
from nds_client.storage import Location, read_location


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
