"""The vector store: one interface, two backends (embedded Qdrant Edge, Qdrant server).

Every indexed sample is one point: point id = sample id, the vector is its embedding
(cosine distance), the payload is ``{"dataset_id": int, "label": str|None, "cluster_id": int|None}``.
A *collection* holds the points of one embedding space (one backbone); all collections
carry payload indexes on ``dataset_id`` (integer), ``label`` (keyword) and ``cluster_id`` (integer).

* :mod:`.base` -- :class:`VectorStore`: the argument checks, id de-duplication, batching and
  missing-id checks, once, over small backend primitives.
* :mod:`.edge` -- :class:`EdgeVectorStore`: Qdrant Edge in-process, one locked shard per collection.
* :mod:`.qdrant_server` -- :class:`QdrantServerStore`: a Qdrant server (or cluster) through ``qdrant_client``.

Third-party exceptions are translated in exactly one place per backend (``_translate``); the
backends import their libraries where they use them, so importing this package stays light.
Vectors come back from :meth:`VectorStore.fetch_vectors` L2-normalised: cosine collections
store unit vectors.
"""

from __future__ import annotations

from nds.catalog.settings import Settings
from nds.catalog.vectors.base import BUSY_HINT, DEFAULT_BATCH_SIZE, DISTANCE, PAYLOAD_INDEXES, VectorHit, VectorStore, collection_name
from nds.catalog.vectors.edge import EdgeVectorStore
from nds.catalog.vectors.qdrant_server import QdrantServerStore

__all__ = [
    "BUSY_HINT", "DEFAULT_BATCH_SIZE", "DISTANCE", "PAYLOAD_INDEXES", "EdgeVectorStore", "QdrantServerStore",
    "VectorHit", "VectorStore", "collection_name", "open_vector_store",
]


def open_vector_store(settings: Settings) -> VectorStore:
    """The server store when ``NDS_QDRANT_URL`` is set, else the embedded store under NDS_HOME."""
    if settings.qdrant_url:
        return QdrantServerStore(
            settings.qdrant_url, settings.qdrant_api_key,
            shard_number=settings.qdrant_shards, replication_factor=settings.qdrant_replication_factor,
        )
    return EdgeVectorStore(settings.vectors_path)
