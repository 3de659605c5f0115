"""The vector-store interface: argument checks, de-duplication and batching, written once.

:class:`VectorStore` validates every argument (names, dims, ids, matrices, payloads, k), splits
work into batches of ``batch_size``, reports missing ids and unknown collections, and turns
third-party exceptions into project errors through the backend's :meth:`VectorStore._translate`
(called in one place, :meth:`VectorStore._errors`). A backend only implements the small
primitives below (``_dim``, ``_open``, ``_create``, ``_has``, ``_list``, ``_drop``,
``_upsert_batch``, ``_search``, ``_count``, ``_retrieve``, ``_delete_points``, ``_delete_ids``, ``_close``),
each of which talks to its client library and nothing else.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from nds_client.errors import InvalidInputError, NDSError, NotFoundError, VectorStoreError

DISTANCE = "Cosine"
PAYLOAD_INDEXES: tuple[tuple[str, str], ...] = (("dataset_id", "integer"), ("label", "keyword"), ("cluster_id", "integer"))
DEFAULT_BATCH_SIZE = 2048
BUSY_HINT = "stop the other nds process or use server mode with NDS_QDRANT_URL"


def collection_name(backbone_version: str) -> str:
    """The collection of an embedding space (one per backbone version)."""
    return "emb-" + re.sub(r"[^A-Za-z0-9_.-]", "-", backbone_version)[:120]


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MAX_POINT_ID = 2**64 - 1


@dataclass(frozen=True)
class VectorHit:
    """One search result."""

    id: int  # sample id (point id = sample id)
    score: float  # cosine similarity, higher is closer
    payload: dict  # dataset_id (int), label (str|None), cluster_id (int|None)


class VectorStore(ABC):
    """What the catalog needs from a vector database. Collections use cosine distance.

    ``handle`` in the primitives is what :meth:`_open` yields: the backend's open collection.
    """

    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.batch_size = batch_size
        self._closed = False

    # -- public API: checks once, then the backend's primitives --

    def ensure_collection(self, name: str, dim: int) -> None:
        """Create ``name`` (cosine, payload indexes) unless it exists; a different dim is a VectorStoreError."""
        _check_name(name)
        dim = _check_dim(dim)
        with self._errors(f"create vector collection {name!r}"):
            self._check_open()
            existing = self._create(name, dim)
            if existing != dim:
                raise _dim_mismatch(name, existing, dim)

    def has_collection(self, name: str) -> bool:
        _check_name(name)
        with self._errors(f"look up vector collection {name!r}"):
            self._check_open()
            return self._has(name)

    def list_collections(self) -> list[str]:
        with self._errors("list vector collections"):
            self._check_open()
            return sorted(self._list())

    def delete_collection(self, name: str) -> None:
        """Delete ``name`` and its points; deleting a collection that does not exist does nothing."""
        _check_name(name)
        with self._errors(f"delete vector collection {name!r}"):
            self._check_open()
            self._drop(name)

    def upsert(self, name: str, ids: Sequence[int], vectors: np.ndarray, payloads: Sequence[dict]) -> None:
        """Insert or replace points; ``vectors`` is float (n, dim), finite, no zero rows."""
        _check_name(name)
        point_ids = _check_ids(ids)
        with self._errors(f"upsert into vector collection {name!r}"):
            self._check_open()
            dim = self._dim(name)
            matrix = _check_matrix(vectors, len(point_ids), dim)
            items = _check_payloads(payloads, len(point_ids))
            if not point_ids:
                return
            with self._open(name, write=True) as handle:
                locked_dim = self._dim(name)
                if locked_dim != dim:
                    raise _dim_mismatch(name, locked_dim, dim)
                step = max(1, self.batch_size)
                for start in range(0, len(point_ids), step):
                    stop = start + step
                    self._upsert_batch(handle, name, point_ids[start:stop], matrix[start:stop], items[start:stop])

    def search(
        self, name: str, vector: np.ndarray, k: int, *, dataset_ids: Sequence[int] | None = None
    ) -> list[VectorHit]:
        """The ``k`` nearest points, best first; ``dataset_ids`` restricts to those datasets."""
        _check_name(name)
        k = _check_k(k)
        wanted = None if dataset_ids is None else _check_ids(dataset_ids, field="dataset_ids")
        with self._errors(f"search vector collection {name!r}"):
            self._check_open()
            with self._open(name, write=False) as handle:
                query = _check_query(vector, self._dim(name))
                if wanted is not None and not wanted:
                    return []
                return [_hit(p.id, p.score, p.payload) for p in self._search(handle, name, query, k, wanted)]

    def count(self, name: str, *, dataset_id: int | None = None) -> int:
        _check_name(name)
        wanted = None if dataset_id is None else _check_int(dataset_id, "dataset_id")
        with self._errors(f"count vector collection {name!r}"):
            self._check_open()
            with self._open(name, write=False) as handle:
                self._dim(name)  # NotFoundError for an unknown collection
                return int(self._count(handle, name, wanted))

    def fetch_vectors(self, name: str, ids: Sequence[int]) -> np.ndarray:
        """(n, dim) float32 (unit length) in the order of ``ids``; a missing id is a NotFoundError."""
        _check_name(name)
        point_ids = _check_ids(ids)
        with self._errors(f"fetch vectors from vector collection {name!r}"):
            self._check_open()
            with self._open(name, write=False) as handle:
                out = np.empty((len(point_ids), self._dim(name)), dtype=np.float32)
                if not point_ids:
                    return out
                unique = list(dict.fromkeys(point_ids))
                found: dict[int, Any] = {}
                step = max(1, self.batch_size)
                for start in range(0, len(unique), step):
                    for record in self._retrieve(handle, name, unique[start : start + step]):
                        found[int(record.id)] = record.vector
                missing = [i for i in unique if i not in found]
                if missing:
                    raise _missing_error(name, missing)
                for row, pid in enumerate(point_ids):
                    out[row] = found[pid]
                return out

    def delete_points(self, name: str, ids: Sequence[int]) -> None:
        """Delete the points ``ids`` of collection ``name``; ids that are not there are ignored."""
        _check_name(name)
        point_ids = list(dict.fromkeys(_check_ids(ids)))
        with self._errors(f"delete points from vector collection {name!r}"):
            self._check_open()
            if not point_ids:
                return
            with self._open(name, write=True) as handle:
                self._dim(name)  # NotFoundError for an unknown collection
                step = max(1, self.batch_size)
                for start in range(0, len(point_ids), step):
                    self._delete_ids(handle, name, point_ids[start : start + step])

    def delete_dataset(self, dataset_id: int, *, keep: str | None = None) -> int:
        """Delete that dataset's points from every collection (but ``keep``, when named);
        returns how many were deleted."""
        wanted = _check_int(dataset_id, "dataset_id")
        deleted = 0
        for name in self.list_collections():
            if name == keep:
                continue
            with self._errors(f"delete dataset {wanted} from vector collection {name!r}"):
                try:
                    with self._open(name, write=True) as handle:
                        n = int(self._count(handle, name, wanted))
                        if n:
                            self._delete_points(handle, name, wanted)
                except Exception:
                    if self._has(name):
                        raise
                    continue  # the collection was deleted meanwhile
                deleted += n
        return deleted

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close()

    def session(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Hint that a block of calls on ``name`` follows; backends that can, keep it open meanwhile."""
        return contextlib.nullcontext()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- shared plumbing --

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """The one place where third-party exceptions become project errors (via :meth:`_translate`)."""
        try:
            yield
        except NDSError:
            raise
        except Exception as exc:
            raise self._translate(action, exc) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise VectorStoreError("the vector store is closed")

    # -- backend primitives: each runs inside ``_errors`` on an open store and only talks to its library --

    @abstractmethod
    def _translate(self, action: str, exc: Exception) -> NDSError:
        """The project error for a third-party exception raised while trying to ``action``."""

    @abstractmethod
    def _dim(self, name: str) -> int:
        """The dim of collection ``name``; NotFoundError (``_no_collection``) if it does not exist."""

    @abstractmethod
    def _open(self, name: str, *, write: bool) -> contextlib.AbstractContextManager[Any]:
        """Hold ``name`` for one call and yield its handle (writes are durable on a clean exit)."""

    @abstractmethod
    def _create(self, name: str, dim: int) -> int:
        """Create ``name`` (``dim``, payload indexes) unless it exists; returns the collection's dim."""

    @abstractmethod
    def _has(self, name: str) -> bool: ...

    @abstractmethod
    def _list(self) -> Iterable[str]: ...

    @abstractmethod
    def _drop(self, name: str) -> None: ...

    @abstractmethod
    def _upsert_batch(self, handle: Any, name: str, ids: list[int], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None: ...

    @abstractmethod
    def _search(self, handle: Any, name: str, query: np.ndarray, k: int, dataset_ids: list[int] | None) -> Iterable[Any]:
        """Scored points (``.id``, ``.score``, ``.payload``), best first."""

    @abstractmethod
    def _count(self, handle: Any, name: str, dataset_id: int | None) -> int: ...

    @abstractmethod
    def _retrieve(self, handle: Any, name: str, ids: list[int]) -> Iterable[Any]:
        """Records (``.id``, ``.vector``) of those ``ids`` that exist."""

    @abstractmethod
    def _delete_points(self, handle: Any, name: str, dataset_id: int) -> None: ...

    @abstractmethod
    def _delete_ids(self, handle: Any, name: str, ids: list[int]) -> None:
        """Delete the points with these ids (missing ones are no error)."""

    def _close(self) -> None:
        """Release the backend's resources (optional; :meth:`close` calls it once)."""


# ---------------------------------------------------------------------------
# Input checks (same mistake -> same error on every backend)
# ---------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid collection name {name!r}",
            field="name",
            hint="use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit",
        )
    return name


def _check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) < 1:
        raise InvalidInputError(f"dim must be a positive integer, got {dim!r}", field="dim")
    return int(dim)


def _check_ids(ids: Sequence[int], field: str = "ids") -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InvalidInputError(f"{field} must be a flat sequence of integers", field=field)
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"{field} must be integers, got {arr.dtype}", field=field)
    if int(arr.min()) < 0 or int(arr.max()) > _MAX_POINT_ID:
        raise InvalidInputError(f"{field} must be between 0 and 2**64-1", field=field)
    return arr.tolist()


def _check_int(value: int | None, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{field} must be an integer, got {value!r}", field=field)
    return int(value)


def _check_matrix(vectors: np.ndarray, n: int, dim: int) -> np.ndarray:
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"vectors must be a float array: {exc}", field="vectors") from exc
    if arr.ndim != 2 or arr.shape != (n, dim):
        raise InvalidInputError(f"vectors must have shape ({n}, {dim}), got {arr.shape}", field="vectors")
    _check_rows(arr)
    return np.ascontiguousarray(arr)


def _check_query(vector: np.ndarray, dim: int) -> np.ndarray:
    try:
        arr = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"vector must be a float array: {exc}", field="vector") from exc
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != (dim,):
        raise InvalidInputError(f"vector must have shape ({dim},), got {arr.shape}", field="vector")
    _check_rows(arr[None, :], field="vector")
    return arr


def _check_rows(arr: np.ndarray, field: str = "vectors") -> None:
    if arr.size == 0:
        return
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InvalidInputError(f"{field} has NaN or infinite values (row {int(bad[0])}, {bad.size} rows)", field=field)
    zero = ~np.any(arr != 0, axis=1)
    if zero.any():
        bad = np.flatnonzero(zero)
        raise InvalidInputError(
            f"{field} has all-zero rows (row {int(bad[0])}, {bad.size} rows); cosine similarity is undefined for them",
            field=field,
        )


def _check_payloads(payloads: Sequence[Mapping[str, Any]], n: int) -> list[dict[str, Any]]:
    if len(payloads) != n:
        raise InvalidInputError(f"got {len(payloads)} payloads for {n} ids", field="payloads")
    out: list[dict[str, Any]] = []
    for i, payload in enumerate(payloads):
        if not isinstance(payload, Mapping):
            raise InvalidInputError(f"payload {i} must be a dict", field="payloads")
        item = dict(payload)
        dataset_id = item.get("dataset_id")
        if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)):
            raise InvalidInputError(f"payload {i} needs an integer dataset_id, got {dataset_id!r}", field="payloads")
        item["dataset_id"] = int(dataset_id)
        label = item.get("label")
        if label is not None and not isinstance(label, str):
            raise InvalidInputError(f"payload {i}: label must be a string or None, got {label!r}", field="payloads")
        item["label"] = label
        cluster_id = item.get("cluster_id")
        if cluster_id is not None:
            if isinstance(cluster_id, bool) or not isinstance(cluster_id, (int, np.integer)):
                raise InvalidInputError(f"payload {i}: cluster_id must be an integer or None", field="payloads")
            cluster_id = int(cluster_id)
        item["cluster_id"] = cluster_id
        out.append(item)
    return out


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}", field="k")
    return int(k)


def _hit(point_id: Any, score: float, payload: Mapping[str, Any] | None) -> VectorHit:
    data = dict(payload or {})
    data.setdefault("label", None)
    data.setdefault("cluster_id", None)
    return VectorHit(id=int(point_id), score=float(score), payload=data)


def _missing_error(name: str, missing: Sequence[int]) -> NotFoundError:
    shown = ", ".join(str(i) for i in sorted(missing)[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return NotFoundError(f"{len(missing)} ids are not in vector collection {name!r}: {shown}{more}")


def _no_collection(name: str) -> NotFoundError:
    return NotFoundError(f"vector collection {name!r} does not exist", hint="index a dataset with that backbone first")


def _dim_mismatch(name: str, existing: int, wanted: int) -> VectorStoreError:
    return VectorStoreError(
        f"vector collection {name!r} exists with dim {existing}, not {wanted}",
        hint="delete the collection first or use another name",
    )
