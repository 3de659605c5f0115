"""A Qdrant server (or cluster) through ``qdrant_client``, behind :class:`~nds.catalog.vectors.base.VectorStore`.

``qdrant_client`` is imported where it is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nds.catalog.vectors.base import DEFAULT_BATCH_SIZE, DISTANCE, PAYLOAD_INDEXES, VectorStore, _no_collection
from nds_client.errors import NDSError, NotFoundError, ServiceUnavailableError, VectorStoreError

if TYPE_CHECKING:
    from qdrant_client import QdrantClient


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
        super().__init__(batch_size)
        self.url = url
        self.shard_number = shard_number
        self.replication_factor = replication_factor
        self._dims: dict[str, int] = {}
        self._owns_client = client is None
        if client is None:
            with self._errors(f"connect to Qdrant at {url}"):
                from qdrant_client import QdrantClient

                client = QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)
        self.client = client

    def _translate(self, action: str, exc: Exception) -> NDSError:
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse  # anything qdrant-client, httpx or grpc raise

        if isinstance(exc, UnexpectedResponse):
            detail = exc.content[:300].decode("utf-8", "replace")
            if exc.status_code == 404:
                return NotFoundError(f"cannot {action}: {detail}")
            return VectorStoreError(f"cannot {action}: Qdrant at {self.url} answered {exc.status_code} {exc.reason_phrase}: {detail}")
        if isinstance(exc, ResponseHandlingException):
            return ServiceUnavailableError(
                f"cannot {action}: Qdrant at {self.url} cannot be reached ({exc.source!r})",
                hint="check NDS_QDRANT_URL and that the Qdrant server is running",
            )
        return VectorStoreError(f"cannot {action} (Qdrant at {self.url}): {exc}")

    @staticmethod
    def _dataset_filter(dataset_ids: Sequence[int]) -> Any:
        from qdrant_client import models

        return models.Filter(must=[models.FieldCondition(key="dataset_id", match=models.MatchAny(any=list(dataset_ids)))])

    # -- primitives --

    def _dim(self, name: str, *, fresh: bool = False) -> int:
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

    def _open(self, name: str, *, write: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext(self.client)  # every request stands alone; ``wait=True`` makes writes durable

    def _create(self, name: str, dim: int) -> int:
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
        return self._dim(name, fresh=True)

    def _has(self, name: str) -> bool:
        return bool(self.client.collection_exists(name))

    def _list(self) -> list[str]:
        return [c.name for c in self.client.get_collections().collections]

    def _drop(self, name: str) -> None:
        self._dims.pop(name, None)
        if self.client.collection_exists(name):
            self.client.delete_collection(name)

    def _upsert_batch(self, handle: Any, name: str, ids: list[int], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        from qdrant_client import models

        handle.upsert(name, points=models.Batch(ids=ids, vectors=vectors.tolist(), payloads=payloads), wait=True)

    def _search(self, handle: Any, name: str, query: np.ndarray, k: int, dataset_ids: list[int] | None) -> Any:
        flt = None if dataset_ids is None else self._dataset_filter(dataset_ids)
        return handle.query_points(name, query=query.tolist(), limit=k, query_filter=flt, with_payload=True, with_vectors=False).points

    def _count(self, handle: Any, name: str, dataset_id: int | None) -> int:
        flt = None if dataset_id is None else self._dataset_filter([dataset_id])
        return handle.count(name, count_filter=flt, exact=True).count

    def _retrieve(self, handle: Any, name: str, ids: list[int]) -> Any:
        return handle.retrieve(name, ids=ids, with_payload=False, with_vectors=True)

    def _delete_points(self, handle: Any, name: str, dataset_id: int) -> None:
        from qdrant_client import models

        handle.delete(name, points_selector=models.FilterSelector(filter=self._dataset_filter([dataset_id])), wait=True)

    def _delete_ids(self, handle: Any, name: str, ids: list[int]) -> None:
        from qdrant_client import models

        handle.delete(name, points_selector=models.PointIdsList(points=ids), wait=True)

    def _close(self) -> None:
        if self._owns_client:
            with self._errors("close the Qdrant client"):
                self.client.close()

    def __repr__(self) -> str:
        return f"QdrantServerStore({self.url!r})"
