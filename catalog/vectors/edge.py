"""Qdrant Edge (the Qdrant engine in-process) behind :class:`~nds.catalog.vectors.base.VectorStore`.

One shard directory per collection under ``path/<name>/`` with its dimension in ``path/<name>.json``.
Qdrant Edge may be opened by one process at a time, so every operation takes an exclusive
``fcntl.flock`` on ``path/.locks/<name>.lock``, opens the shard, works, flushes and closes it
again (opening costs ~10-20 ms for a few thousand points). An API server and a Celery worker
can therefore share one directory; a process that waits longer than ``lock_timeout`` gets
:class:`VectorStoreBusyError`. :meth:`EdgeVectorStore.session` keeps one collection open
for a block of calls from the same thread. ``qdrant_edge`` is imported where it is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nds.catalog.vectors.base import _NAME_RE, BUSY_HINT, DEFAULT_BATCH_SIZE, DISTANCE, PAYLOAD_INDEXES, VectorStore, _check_name, _no_collection
from nds_client.errors import NDSError, VectorStoreBusyError, VectorStoreError


class EdgeVectorStore(VectorStore):
    """Qdrant Edge under ``path``, shareable between processes (each call locks, opens, closes).

    Thread-safe: every call opens its own lock file descriptor, and ``flock`` serialises
    descriptors within one process as well as across processes. No file stays open between
    calls, so the store survives ``fork`` (Celery prefork). Shards are created without a
    write-ahead log (replaying it made every open slow); each write is flushed before the
    shard is closed, so a write is durable, and visible to other processes, once the call returns.
    """

    def __init__(self, path: Path, *, lock_timeout: float = 60.0, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        super().__init__(batch_size)
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._local = threading.local()
        with self._errors(f"create the vector store folder {self.path}"):
            (self.path / ".locks").mkdir(parents=True, exist_ok=True)

    def _translate(self, action: str, exc: Exception) -> NDSError:
        text = str(exc)  # qdrant_edge raises plain Exception/TypeError; OSError from the filesystem
        if "WouldBlock" in text:
            return VectorStoreBusyError(f"cannot {action}: the Qdrant Edge folder {self.path} is held by another process", hint=BUSY_HINT)
        return VectorStoreError(f"cannot {action} (Qdrant Edge at {self.path}): {text}")

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
        tmp = self.path / f".{name}.json.tmp"
        with open(tmp, "w") as fh:
            json.dump({"dim": dim, "distance": DISTANCE, "format": 1}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._meta_path(name))

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
        """This thread's open collections: name -> (shard, dim)."""
        sessions = getattr(self._local, "sessions", None)
        if sessions is None:
            sessions = self._local.sessions = {}
        return sessions

    @contextlib.contextmanager
    def _open(self, name: str, *, write: bool) -> Iterator[Any]:
        """Yield the open shard under the collection lock (this thread's session's, if any); flush after a write."""
        sessions = self._sessions()
        current = sessions.get(name)
        if current is not None:
            yield current[0]
            if write:
                current[0].flush()
            return
        from qdrant_edge import EdgeShard

        with self._locked(name):
            dim = self._read_dim(name)
            shard = EdgeShard.load(str(self._shard_dir(name)))
            sessions[name] = (shard, dim)  # so that _dim answers from memory while it is open
            try:
                yield shard
                if write:
                    shard.flush()
            finally:
                del sessions[name]
                shard.close()

    @staticmethod
    def _dataset_filter(dataset_ids: Sequence[int]) -> Any:
        from qdrant_edge import FieldCondition, Filter, MatchAny

        return Filter(must=[FieldCondition("dataset_id", match=MatchAny(list(dataset_ids)))])

    @contextlib.contextmanager
    def session(self, name: str) -> Iterator[None]:
        """Keep collection ``name`` locked and open for the calls this thread makes inside the block.

        Other processes (and threads) wait until the block ends, so keep it short. Deleting the
        collection inside its own session is refused.
        """
        _check_name(name)
        if name in self._sessions():
            yield
            return
        stack = contextlib.ExitStack()
        with self._errors(f"open vector collection {name!r}"):
            self._check_open()
            stack.enter_context(self._open(name, write=False))
        try:
            yield
        finally:
            with self._errors(f"close vector collection {name!r}"):
                stack.close()

    # -- primitives --

    def _dim(self, name: str) -> int:
        current = self._sessions().get(name)
        return current[1] if current is not None else self._read_dim(name)

    def _create(self, name: str, dim: int) -> int:
        if name in self._sessions():
            return self._dim(name)
        from qdrant_edge import Distance, EdgeConfig, EdgeShard, EdgeVectorParams, IntegerIndexParams, PayloadSchemaType, UpdateOperation

        # Integer indexes without the range structure: only exact matches are asked for, and
        # the range index doubles what loading the shard costs (every call loads it).
        schema = {"integer": IntegerIndexParams(lookup=True, range=False), "keyword": PayloadSchemaType.Keyword}
        with self._locked(name):
            if self._meta_path(name).exists():
                return self._read_dim(name)
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
        return dim

    def _has(self, name: str) -> bool:
        return self._meta_path(name).exists()

    def _list(self) -> list[str]:
        names = [p.name[: -len(".json")] for p in self.path.glob("*.json")]
        return [n for n in names if _NAME_RE.fullmatch(n) and self._shard_dir(n).is_dir()]

    def _drop(self, name: str) -> None:
        if name in self._sessions():
            raise VectorStoreError(f"cannot delete vector collection {name!r} inside its own session")
        with self._locked(name):
            self._meta_path(name).unlink(missing_ok=True)  # first: the collection is gone from now on
            if self._shard_dir(name).exists():
                shutil.rmtree(self._shard_dir(name))

    def _upsert_batch(self, handle: Any, name: str, ids: list[int], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        from qdrant_edge import Point, UpdateOperation

        handle.update(UpdateOperation.upsert_points([Point(pid, row, payload) for pid, row, payload in zip(ids, vectors, payloads)]))

    def _search(self, handle: Any, name: str, query: np.ndarray, k: int, dataset_ids: list[int] | None) -> Any:
        from qdrant_edge import Query, QueryRequest

        flt = None if dataset_ids is None else self._dataset_filter(dataset_ids)
        return handle.query(QueryRequest(query=Query.Nearest(query.tolist()), limit=k, filter=flt, with_payload=True, with_vector=False))

    def _count(self, handle: Any, name: str, dataset_id: int | None) -> int:
        from qdrant_edge import CountRequest

        return handle.count(CountRequest(exact=True, filter=None if dataset_id is None else self._dataset_filter([dataset_id])))

    def _retrieve(self, handle: Any, name: str, ids: list[int]) -> Any:
        return handle.retrieve(ids, False, True)

    def _delete_points(self, handle: Any, name: str, dataset_id: int) -> None:
        from qdrant_edge import UpdateOperation

        handle.update(UpdateOperation.delete_points_by_filter(self._dataset_filter([dataset_id])))

    def _delete_ids(self, handle: Any, name: str, ids: list[int]) -> None:
        from qdrant_edge import UpdateOperation

        handle.update(UpdateOperation.delete_points(ids))

    def __repr__(self) -> str:
        return f"EdgeVectorStore({str(self.path)!r})"
