"""Everything a catalog operation needs, built once from settings and passed in.

``CatalogContext`` owns the database engine, the artifact store, the plugin registries
and (opened on first use, because the embedded store locks its folder) the vector store.
The API server, the CLI and the workers each build one; nothing here is global.
"""

from __future__ import annotations

import threading
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from nds.catalog.artifacts import ArtifactStore, RemoteArtifactStore
from nds.catalog.db import check_schema, create_db_engine
from nds.catalog.retrieval.groups import GroupCache
from nds.catalog.settings import Settings
from nds.plugins.registry import Registry, backbone_registry, exporter_registry, source_registry

if TYPE_CHECKING:
    from nds.catalog.vectors import VectorStore


class CatalogContext:
    def __init__(self, settings: Settings, *, engine: Engine | None = None, vectors: VectorStore | None = None) -> None:
        self.settings = settings
        self.engine = engine or create_db_engine(settings)
        self.artifacts: ArtifactStore | RemoteArtifactStore = (
            RemoteArtifactStore(settings.artifacts_uri, settings.artifacts_path) if settings.artifacts_uri else ArtifactStore(settings.artifacts_path)
        )
        self.sources: Registry = source_registry()
        self.backbones: Registry = backbone_registry()
        self.exporters: Registry = exporter_registry()
        self.groups = GroupCache()
        self._vectors: VectorStore | None = vectors  # given: the caller's (tests pass a qdrant-client local-mode store)
        self._vectors_lock = threading.Lock()

    @classmethod
    def open(cls, settings: Settings, *, check: bool = True) -> CatalogContext:
        ctx = cls(settings)
        if check:
            check_schema(ctx.engine)
        return ctx

    @property
    def vectors(self) -> VectorStore:
        with self._vectors_lock:
            if self._vectors is None:
                from nds.catalog.vectors import open_vector_store

                self._vectors = open_vector_store(self.settings)
            return self._vectors

    @cached_property
    def autocommit_engine(self) -> Engine:
        """The engine for work that needs no transaction: reads (authentication, a query's rows,
        a manifest's lookups) and single-statement writes (a query's row). The same pool, in
        autocommit, so such work is its statements alone, without the BEGIN and COMMIT or
        ROLLBACK round trips a transaction adds on PostgreSQL. Each statement commits on its
        own: anything that writes more than one statement uses :attr:`engine`."""
        return self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @cached_property
    def data_roots(self):  # noqa: ANN201 - list[Path]
        """The local folders among the data roots (resolved)."""
        return self.settings.resolved_data_roots

    @cached_property
    def roots(self):  # noqa: ANN201 - DataRoots
        """Every data root: local folders and object-storage prefixes."""
        from nds.catalog.paths import DataRoots

        return DataRoots(tuple(self.data_roots), tuple(self.settings.remote_data_roots))

    @cached_property
    def source_storage(self):  # noqa: ANN201 - RootedStorage
        """The I/O layer for sources, every uri checked against the data roots."""
        from nds.catalog.paths import RootedStorage

        return RootedStorage(self.roots)

    def shown_uri(self, principal):  # noqa: ANN001, ANN201 - Principal -> Callable[[str], str]
        """How ``principal`` sees stored uris (nds.catalog.uris: relative paths for client keys)."""
        from nds.catalog.uris import uri_view

        return uri_view(principal, self.data_roots, self.settings.resolved_public_uris)

    def close(self) -> None:
        with self._vectors_lock:
            if self._vectors is not None:
                self._vectors.close()
                self._vectors = None
        self.engine.dispose()

    def __enter__(self) -> CatalogContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
