"""A stored query's picks file: the group table and the picks, written once, read in slices. Artifact I/O, no SQL.

Format 2: 8-byte little-endian header length, a small JSON header (counts, dtypes, the
groups' labels), then raw little-endian arrays: the group table (dataset_id, cluster, size
as int64, mass as float64, G each), the number of picks of each group (int64, G), then the
picks' ranks (int32 when every group is smaller than 2**31, else int64) and counts (the
smallest of uint8, uint16, int32, int64 that holds them). The picks are sorted by group, so
a pick's group follows from the per-group numbers: readable in slices, no pickle.
The reader checks the header against the file's size before it allocates anything: a
missing or damaged file (truncated, overwritten, absurd counts) is a GoneError (410: the
query's stored selection is gone for good, as when its dataset is deleted) that says to
run the query again (same request and seed: the same picks), never a MemoryError or a 500.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

import numpy as np

from nds.catalog.retrieval.sampling import Picks
from nds.catalog.retrieval.weights import GroupTable
from nds_client.errors import ArtifactError, ConflictError, GoneError, NotFoundError

if TYPE_CHECKING:  # only ctx.artifacts is used: the picks file knows nothing of SQL
    from nds.catalog.context import CatalogContext

PICKS_PREFIX = "queries"
PICKS_FORMAT = 2
RANK_DTYPES = ("<i4", "<i8")
COUNT_DTYPES = ("<u1", "<u2", "<i4", "<i8")


class PickSlice(NamedTuple):
    """Rows [start, stop) of a stored query's picks, with their groups."""

    group: np.ndarray  # int64
    rank: np.ndarray   # int64
    count: np.ndarray  # type: ignore[assignment]  # int64; a field named count shadows tuple.count, renaming it would change the picks API


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


def _is_count(value: Any) -> TypeGuard[int]:  # noqa: ANN401 - a JSON value
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
        fh = ctx.artifacts.open_path(picks_key(query_id)).open("rb")  # a store in object storage: downloaded to its cache
    except (FileNotFoundError, NotFoundError):
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

