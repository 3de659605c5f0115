"""The vector store: one interface, two backends (embedded Qdrant Edge, Qdrant server).

Every indexed sample is one point: point id = sample id, the vector is its embedding
(cosine distance), the payload is ``{"dataset_id": int, "label": str|None, "cluster_id": int|None}``.
A *collection* holds the points of one embedding space (one backbone); all collections
carry payload indexes on ``dataset_id`` (integer), ``label`` (keyword) and ``cluster_id`` (integer).

Backends:

* :class:`EdgeVectorStore` -- Qdrant Edge (the Qdrant engine in-process), one shard
  directory per collection under ``path/<name>/`` with its dimension in ``path/<name>.json``.
  Qdrant Edge may be opened by one process at a time, so every operation takes an exclusive
  ``fcntl.flock`` on ``path/.locks/<name>.lock``, opens the shard, works, flushes and closes it
  again (opening costs ~10-20 ms for a few thousand points). An API server and a Celery worker
  can therefore share one directory; a process that waits longer than ``lock_timeout`` gets
  :class:`VectorStoreBusyError`. :meth:`EdgeVectorStore.session` keeps one collection open
  for a block of calls from the same thread.
* :class:`QdrantServerStore` -- a Qdrant server (or cluster) through ``qdrant_client``.

Third-party exceptions are translated in exactly one place per backend (``_errors``).
Vectors come back from :meth:`VectorStore.fetch_vectors` L2-normalised: cosine collections
store unit vectors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from nds.catalog.settings import Settings
from nds_client.errors import (
    InvalidInputError,
    NDSError,
    NotFoundError,
    ServiceUnavailableError,
    VectorStoreBusyError,
    VectorStoreError,
)

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

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
    """What the catalog needs from a vector database. Collections use cosine distance."""

    @abstractmethod
    def ensure_collection(self, name: str, dim: int) -> None:
        """Create ``name`` (cosine, payload indexes) unless it exists; a different dim is a VectorStoreError."""

    @abstractmethod
    def has_collection(self, name: str) -> bool: ...

    @abstractmethod
    def list_collections(self) -> list[str]: ...

    @abstractmethod
    def delete_collection(self, name: str) -> None:
        """Delete ``name`` and its points; deleting a collection that does not exist does nothing."""

    @abstractmethod
    def upsert(self, name: str, ids: Sequence[int], vectors: np.ndarray, payloads: Sequence[dict]) -> None:
        """Insert or replace points; ``vectors`` is float (n, dim), finite, no zero rows."""

    @abstractmethod
    def search(
        self, name: str, vector: np.ndarray, k: int, *, dataset_ids: Sequence[int] | None = None
    ) -> list[VectorHit]:
        """The ``k`` nearest points, best first; ``dataset_ids`` restricts to those datasets."""

    @abstractmethod
    def count(self, name: str, *, dataset_id: int | None = None) -> int: ...

    @abstractmethod
    def fetch_vectors(self, name: str, ids: Sequence[int]) -> np.ndarray:
        """(n, dim) float32 (unit length) in the order of ``ids``; a missing id is a NotFoundError."""

    @abstractmethod
    def delete_dataset(self, dataset_id: int, *, keep: str | None = None) -> int:
        """Delete that dataset's points from every collection (but ``keep``, when named);
        returns how many were deleted."""

    @abstractmethod
    def close(self) -> None: ...

    def session(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Hint that a block of calls on ``name`` follows; backends that can, keep it open meanwhile."""
        return contextlib.nullcontext()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_vector_store(settings: Settings) -> VectorStore:
    """The server store when ``NDS_QDRANT_URL`` is set, else the embedded store under NDS_HOME."""
    if settings.qdrant_url:
        return QdrantServerStore(
            settings.qdrant_url, settings.qdrant_api_key,
            shard_number=settings.qdrant_shards, replication_factor=settings.qdrant_replication_factor,
        )
    return EdgeVectorStore(settings.vectors_path)


# ---------------------------------------------------------------------------
# Input checks shared by both backends (same mistake -> same error everywhere)
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


# ---------------------------------------------------------------------------
# Qdrant Edge (embedded)
# ---------------------------------------------------------------------------


class EdgeVectorStore(VectorStore):
    """Qdrant Edge under ``path``, shareable between processes (each call locks, opens, closes).

    Thread-safe: every call opens its own lock file descriptor, and ``flock`` serialises
    descriptors within one process as well as across processes. No file stays open between
    calls, so the store survives ``fork`` (Celery prefork). Shards are created without a
    write-ahead log (replaying it made every open slow); each write is flushed before the
    shard is closed, so a write is durable, and visible to other processes, once the call returns.
    """

    def __init__(self, path: Path, *, lock_timeout: float = 60.0, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self.batch_size = batch_size
        self._closed = False
        self._local = threading.local()
        with self._errors(f"create the vector store folder {self.path}"):
            (self.path / ".locks").mkdir(parents=True, exist_ok=True)

    # -- the one place where third-party errors become project errors --

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except NDSError:
            raise
        except Exception as exc:  # qdrant_edge raises plain Exception/TypeError; OSError from the filesystem
            text = str(exc)
            if "WouldBlock" in text:
                raise VectorStoreBusyError(
                    f"cannot {action}: the Qdrant Edge folder {self.path} is held by another process", hint=BUSY_HINT
                ) from exc
            raise VectorStoreError(f"cannot {action} (Qdrant Edge at {self.path}): {text}") from exc

    # -- files, locks and shards --

    def _shard_dir(self, name: str) -> Path:
        return self.path / name

    def _meta_path(self, name: str) -> Path:
        return self.path / f"{name}.json"

    def _read_dim(self, name: str) -> int:
        try:
            meta = json.loads(self._meta_path(name).read_text())
        except FileNotFoundError:
            raise _no_collection(name) from None
        return int(meta["dim"])

    def _write_meta(self, name: str, dim: int) -> None:
        target = self._meta_path(name)
        tmp = self.path / f".{name}.json.tmp"
        with open(tmp, "w") as fh:
            json.dump({"dim": dim, "distance": DISTANCE, "format": 1}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Hold the exclusive lock of collection ``name`` (waits up to ``lock_timeout``)."""
        fd = os.open(self.path / ".locks" / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout
            delay = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise VectorStoreBusyError(
                            f"vector collection {name!r} in {self.path} has been locked by another process "
                            f"for more than {self.lock_timeout:g} s",
                            hint=BUSY_HINT,
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.01)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _sessions(self) -> dict[str, tuple[Any, int]]:
        sessions = getattr(self._local, "sessions", None)
        if sessions is None:
            sessions = self._local.sessions = {}
        return sessions

    @contextlib.contextmanager
    def _shard(self, name: str, *, write: bool) -> Iterator[tuple[Any, int]]:
        """Yield ``(open shard, dim)`` under the collection lock; flush after a successful write."""
        self._check_open()
        current = self._sessions().get(name)
        if current is not None:
            yield current
            if write:
                current[0].flush()
            return
        from qdrant_edge import EdgeShard

        with self._locked(name):
            dim = self._read_dim(name)
            shard = EdgeShard.load(str(self._shard_dir(name)))
            try:
                yield shard, dim
                if write:
                    shard.flush()
            finally:
                shard.close()

    def _check_open(self) -> None:
        if self._closed:
            raise VectorStoreError("the vector store is closed")

    @staticmethod
    def _dataset_filter(dataset_ids: Sequence[int]) -> Any:
        from qdrant_edge import FieldCondition, Filter, MatchAny

        return Filter(must=[FieldCondition("dataset_id", match=MatchAny(list(dataset_ids)))])

    # -- public API --

    @contextlib.contextmanager
    def session(self, name: str) -> Iterator[None]:
        """Keep collection ``name`` locked and open for the calls this thread makes inside the block.

        Other processes (and threads) wait until the block ends, so keep it short. Deleting the
        collection inside its own session is refused.
        """
        _check_name(name)
        sessions = self._sessions()
        if name in sessions:
            yield
            return
        stack = contextlib.ExitStack()
        with self._errors(f"open vector collection {name!r}"):
            self._check_open()
            from qdrant_edge import EdgeShard

            with contextlib.ExitStack() as setup:
                setup.enter_context(self._locked(name))
                dim = self._read_dim(name)
                shard = EdgeShard.load(str(self._shard_dir(name)))
                setup.callback(shard.close)
                stack = setup.pop_all()
        sessions[name] = (shard, dim)
        try:
            yield
        finally:
            del sessions[name]
            with self._errors(f"close vector collection {name!r}"):
                stack.close()

    def ensure_collection(self, name: str, dim: int) -> None:
        _check_name(name)
        dim = _check_dim(dim)
        with self._errors(f"create vector collection {name!r}"):
            self._check_open()
            if name in self._sessions():
                existing = self._sessions()[name][1]
                if existing != dim:
                    raise _dim_mismatch(name, existing, dim)
                return
            from qdrant_edge import (
                Distance,
                EdgeConfig,
                EdgeShard,
                EdgeVectorParams,
                IntegerIndexParams,
                PayloadSchemaType,
                UpdateOperation,
            )

            # Integer indexes without the range structure: only exact matches are asked for, and
            # the range index doubles what loading the shard costs (every call loads it).
            schema = {"integer": IntegerIndexParams(lookup=True, range=False), "keyword": PayloadSchemaType.Keyword}
            with self._locked(name):
                if self._meta_path(name).exists():
                    existing = self._read_dim(name)
                    if existing != dim:
                        raise _dim_mismatch(name, existing, dim)
                    return
                shard_dir = self._shard_dir(name)
                if shard_dir.exists():  # left over by a create or delete that did not finish
                    shutil.rmtree(shard_dir)
                config = EdgeConfig(vectors=EdgeVectorParams(size=dim, distance=Distance.Cosine), wal_enabled=False)
                shard = EdgeShard.create(str(shard_dir), config)
                try:
                    for field, kind in PAYLOAD_INDEXES:
                        shard.update(UpdateOperation.create_field_index(field, schema[kind]))
                    shard.flush()
                finally:
                    shard.close()
                self._write_meta(name, dim)

    def has_collection(self, name: str) -> bool:
        _check_name(name)
        self._check_open()
        return self._meta_path(name).exists()

    def list_collections(self) -> list[str]:
        with self._errors("list vector collections"):
            self._check_open()
            names = [p.name[: -len(".json")] for p in self.path.glob("*.json")]
            return sorted(n for n in names if _NAME_RE.fullmatch(n) and self._shard_dir(n).is_dir())

    def delete_collection(self, name: str) -> None:
        _check_name(name)
        with self._errors(f"delete vector collection {name!r}"):
            self._check_open()
            if name in self._sessions():
                raise VectorStoreError(f"cannot delete vector collection {name!r} inside its own session")
            with self._locked(name):
                self._meta_path(name).unlink(missing_ok=True)  # first: the collection is gone from now on
                if self._shard_dir(name).exists():
                    shutil.rmtree(self._shard_dir(name))

    def upsert(self, name: str, ids: Sequence[int], vectors: np.ndarray, payloads: Sequence[dict]) -> None:
        _check_name(name)
        point_ids = _check_ids(ids)
        with self._errors(f"upsert into vector collection {name!r}"):
            self._check_open()
            dim = self._sessions()[name][1] if name in self._sessions() else self._read_dim(name)
            matrix = _check_matrix(vectors, len(point_ids), dim)
            items = _check_payloads(payloads, len(point_ids))
            if not point_ids:
                return
            from qdrant_edge import Point, UpdateOperation

            with self._shard(name, write=True) as (shard, locked_dim):
                if locked_dim != dim:
                    raise _dim_mismatch(name, locked_dim, dim)
                step = max(1, self.batch_size)
                for start in range(0, len(point_ids), step):
                    stop = start + step
                    points = [
                        Point(pid, row, payload)
                        for pid, row, payload in zip(point_ids[start:stop], matrix[start:stop], items[start:stop])
                    ]
                    shard.update(UpdateOperation.upsert_points(points))

    def search(
        self, name: str, vector: np.ndarray, k: int, *, dataset_ids: Sequence[int] | None = None
    ) -> list[VectorHit]:
        _check_name(name)
        k = _check_k(k)
        wanted = None if dataset_ids is None else _check_ids(dataset_ids, field="dataset_ids")
        with self._errors(f"search vector collection {name!r}"):
            with self._shard(name, write=False) as (shard, dim):
                query = _check_query(vector, dim)
                if wanted is not None and not wanted:
                    return []
                from qdrant_edge import Query, QueryRequest

                request = QueryRequest(
                    query=Query.Nearest(query.tolist()),
                    limit=k,
                    filter=None if wanted is None else self._dataset_filter(wanted),
                    with_payload=True,
                    with_vector=False,
                )
                return [_hit(p.id, p.score, p.payload) for p in shard.query(request)]

    def count(self, name: str, *, dataset_id: int | None = None) -> int:
        _check_name(name)
        wanted = None if dataset_id is None else _check_int(dataset_id, "dataset_id")
        with self._errors(f"count vector collection {name!r}"):
            with self._shard(name, write=False) as (shard, _dim):
                from qdrant_edge import CountRequest

                flt = None if wanted is None else self._dataset_filter([wanted])
                return int(shard.count(CountRequest(exact=True, filter=flt)))

    def fetch_vectors(self, name: str, ids: Sequence[int]) -> np.ndarray:
        _check_name(name)
        point_ids = _check_ids(ids)
        with self._errors(f"fetch vectors from vector collection {name!r}"):
            with self._shard(name, write=False) as (shard, dim):
                out = np.empty((len(point_ids), dim), dtype=np.float32)
                if not point_ids:
                    return out
                unique = list(dict.fromkeys(point_ids))
                found: dict[int, Any] = {}
                step = max(1, self.batch_size)
                for start in range(0, len(unique), step):
                    for record in shard.retrieve(unique[start : start + step], False, True):
                        found[int(record.id)] = record.vector
                missing = [i for i in unique if i not in found]
                if missing:
                    raise _missing_error(name, missing)
                for row, pid in enumerate(point_ids):
                    out[row] = found[pid]
                return out

    def delete_dataset(self, dataset_id: int, *, keep: str | None = None) -> int:
        wanted = _check_int(dataset_id, "dataset_id")
        deleted = 0
        for name in self.list_collections():
            if name == keep:
                continue
            with self._errors(f"delete dataset {wanted} from vector collection {name!r}"):
                try:
                    with self._shard(name, write=True) as (shard, _dim):
                        from qdrant_edge import CountRequest, UpdateOperation

                        flt = self._dataset_filter([wanted])
                        n = int(shard.count(CountRequest(exact=True, filter=flt)))
                        if n:
                            shard.update(UpdateOperation.delete_points_by_filter(flt))
                        deleted += n
                except NotFoundError:  # the collection was deleted meanwhile
                    continue
        return deleted

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return f"EdgeVectorStore({str(self.path)!r})"


# ---------------------------------------------------------------------------
# Qdrant server (remote; qdrant-client)
# ---------------------------------------------------------------------------


class QdrantServerStore(VectorStore):
    """A Qdrant server or cluster through ``qdrant_client.QdrantClient``.

    ``client`` may be injected (tests pass ``QdrantClient(location=":memory:")``); an injected
    client is not closed by :meth:`close`. Collections are created with ``shard_number`` and
    ``replication_factor``. Collection dims are cached per store instance. Thread-safe as far
    as ``QdrantClient`` is (its HTTP client is).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        client: QdrantClient | None = None,
        shard_number: int = 1,
        replication_factor: int = 1,
        timeout: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self.url = url
        self.shard_number = shard_number
        self.replication_factor = replication_factor
        self.batch_size = batch_size
        self._dims: dict[str, int] = {}
        self._closed = False
        self._owns_client = client is None
        if client is None:
            with self._errors(f"connect to Qdrant at {url}"):
                from qdrant_client import QdrantClient

                client = QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)
        self.client = client

    # -- the one place where third-party errors become project errors --

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except NDSError:
            raise
        except Exception as exc:  # anything qdrant-client, httpx or grpc raise
            from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

            if isinstance(exc, UnexpectedResponse):
                detail = exc.content[:300].decode("utf-8", "replace")
                if exc.status_code == 404:
                    raise NotFoundError(f"cannot {action}: {detail}") from exc
                raise VectorStoreError(
                    f"cannot {action}: Qdrant at {self.url} answered {exc.status_code} {exc.reason_phrase}: {detail}"
                ) from exc
            if isinstance(exc, ResponseHandlingException):
                raise ServiceUnavailableError(
                    f"cannot {action}: Qdrant at {self.url} cannot be reached ({exc.source!r})",
                    hint="check NDS_QDRANT_URL and that the Qdrant server is running",
                ) from exc
            raise VectorStoreError(f"cannot {action} (Qdrant at {self.url}): {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise VectorStoreError("the vector store is closed")

    def _dim(self, name: str, *, fresh: bool = False) -> int:
        """The dim of collection ``name`` (NotFoundError if it does not exist); inside ``_errors``."""
        self._check_open()
        if not fresh and name in self._dims:
            return self._dims[name]
        if not self.client.collection_exists(name):
            self._dims.pop(name, None)
            raise _no_collection(name)
        params = self.client.get_collection(name).config.params.vectors
        size = getattr(params, "size", None)
        if size is None:
            raise VectorStoreError(f"Qdrant collection {name!r} has named vectors; it is not an nds collection")
        distance = getattr(getattr(params, "distance", None), "value", None)
        if distance != DISTANCE:
            raise VectorStoreError(f"Qdrant collection {name!r} uses {distance} distance, not {DISTANCE}")
        self._dims[name] = int(size)
        return int(size)

    @staticmethod
    def _dataset_filter(dataset_ids: Sequence[int]) -> Any:
        from qdrant_client import models

        return models.Filter(must=[models.FieldCondition(key="dataset_id", match=models.MatchAny(any=list(dataset_ids)))])

    # -- public API --

    def ensure_collection(self, name: str, dim: int) -> None:
        _check_name(name)
        dim = _check_dim(dim)
        with self._errors(f"create vector collection {name!r}"):
            self._check_open()
            from qdrant_client import models

            if not self.client.collection_exists(name):
                try:
                    self.client.create_collection(
                        name,
                        vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                        shard_number=self.shard_number,
                        replication_factor=self.replication_factor,
                    )
                except Exception:
                    if not self.client.collection_exists(name):  # not a lost race with another process
                        raise
                schema = {"integer": models.PayloadSchemaType.INTEGER, "keyword": models.PayloadSchemaType.KEYWORD}
                for field, kind in PAYLOAD_INDEXES:
                    self.client.create_payload_index(name, field, schema[kind], wait=True)
            existing = self._dim(name, fresh=True)
            if existing != dim:
                raise _dim_mismatch(name, existing, dim)

    def has_collection(self, name: str) -> bool:
        _check_name(name)
        with self._errors(f"look up vector collection {name!r}"):
            self._check_open()
            return bool(self.client.collection_exists(name))

    def list_collections(self) -> list[str]:
        with self._errors("list vector collections"):
            self._check_open()
            return sorted(c.name for c in self.client.get_collections().collections)

    def delete_collection(self, name: str) -> None:
        _check_name(name)
        with self._errors(f"delete vector collection {name!r}"):
            self._check_open()
            self._dims.pop(name, None)
            if self.client.collection_exists(name):
                self.client.delete_collection(name)

    def upsert(self, name: str, ids: Sequence[int], vectors: np.ndarray, payloads: Sequence[dict]) -> None:
        _check_name(name)
        point_ids = _check_ids(ids)
        with self._errors(f"upsert into vector collection {name!r}"):
            dim = self._dim(name)
            matrix = _check_matrix(vectors, len(point_ids), dim)
            items = _check_payloads(payloads, len(point_ids))
            from qdrant_client import models

            step = max(1, self.batch_size)
            for start in range(0, len(point_ids), step):
                stop = start + step
                batch = models.Batch(ids=point_ids[start:stop], vectors=matrix[start:stop].tolist(), payloads=items[start:stop])
                self.client.upsert(name, points=batch, wait=True)

    def search(
        self, name: str, vector: np.ndarray, k: int, *, dataset_ids: Sequence[int] | None = None
    ) -> list[VectorHit]:
        _check_name(name)
        k = _check_k(k)
        wanted = None if dataset_ids is None else _check_ids(dataset_ids, field="dataset_ids")
        with self._errors(f"search vector collection {name!r}"):
            query = _check_query(vector, self._dim(name))
            if wanted is not None and not wanted:
                return []
            response = self.client.query_points(
                name,
                query=query.tolist(),
                limit=k,
                query_filter=None if wanted is None else self._dataset_filter(wanted),
                with_payload=True,
                with_vectors=False,
            )
            return [_hit(p.id, p.score, p.payload) for p in response.points]

    def count(self, name: str, *, dataset_id: int | None = None) -> int:
        _check_name(name)
        wanted = None if dataset_id is None else _check_int(dataset_id, "dataset_id")
        with self._errors(f"count vector collection {name!r}"):
            self._dim(name)
            flt = None if wanted is None else self._dataset_filter([wanted])
            return int(self.client.count(name, count_filter=flt, exact=True).count)

    def fetch_vectors(self, name: str, ids: Sequence[int]) -> np.ndarray:
        _check_name(name)
        point_ids = _check_ids(ids)
        with self._errors(f"fetch vectors from vector collection {name!r}"):
            dim = self._dim(name)
            out = np.empty((len(point_ids), dim), dtype=np.float32)
            unique = list(dict.fromkeys(point_ids))
            found: dict[int, Any] = {}
            step = max(1, self.batch_size)
            for start in range(0, len(unique), step):
                records = self.client.retrieve(name, ids=unique[start : start + step], with_payload=False, with_vectors=True)
                for record in records:
                    found[int(record.id)] = record.vector
            missing = [i for i in unique if i not in found]
            if missing:
                raise _missing_error(name, missing)
            for row, pid in enumerate(point_ids):
                out[row] = found[pid]
            return out

    def delete_dataset(self, dataset_id: int, *, keep: str | None = None) -> int:
        wanted = _check_int(dataset_id, "dataset_id")
        deleted = 0
        for name in self.list_collections():
            if name == keep:
                continue
            with self._errors(f"delete dataset {wanted} from vector collection {name!r}"):
                from qdrant_client import models

                flt = self._dataset_filter([wanted])
                try:
                    n = int(self.client.count(name, count_filter=flt, exact=True).count)
                    if n:
                        self.client.delete(name, points_selector=models.FilterSelector(filter=flt), wait=True)
                except Exception:
                    if self.client.collection_exists(name):
                        raise
                    continue  # the collection was deleted meanwhile
                deleted += n
        return deleted

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            with self._errors("close the Qdrant client"):
                self.client.close()

    def __repr__(self) -> str:
        return f"QdrantServerStore({self.url!r})"
