"""Moving a catalog from one deployment to another: the embedded default into server mode.

:func:`copy_catalog` copies, from a source context to an empty target context (both
built from settings, so any pair of backends works):

1. **rows** (copied last): every table of the catalog, in foreign-key order, ids kept (the vector store's
   point ids are sample ids and artifact keys hold dataset ids), in chunks; on PostgreSQL
   the id sequences are moved past the copied ids afterwards;
2. **vectors**: the points of every indexed dataset's active index version (read back by
   sample id from the source store, payload rebuilt from the catalog rows), into a
   collection of the same name on the target store;
3. **artifacts**: every file of the artifact store (experts, backbones, query picks), each
   written to a temp file and renamed; files already there with the same size are kept.

The target's schema is brought to the head revision by migrations first; a target that
already holds rows is refused, so nothing stored there is overwritten or half-merged.
Vectors and artifacts are copied before the rows, and the rows go in one transaction (all
or nothing): after a failure the target holds no rows and the copy can simply run again
(vectors are upserts, artifacts already there are kept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Integer, Table, func, select, text
from sqlmodel import SQLModel

from nds.catalog.context import CatalogContext
from nds.catalog.tables import Assignment, Dataset, Sample
from nds.catalog.vectors import collection_name
from nds_client.errors import ConflictError

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
ROW_CHUNK = 5000
VECTOR_CHUNK = 2048


@dataclass
class TransferReport:
    rows: dict[str, int] = field(default_factory=dict)        # table -> rows copied
    points: dict[str, int] = field(default_factory=dict)      # collection -> points copied
    files: int = 0
    bytes: int = 0
    files_kept: int = 0                                       # already at the target with the same size


def _tables() -> list[Table]:
    return list(SQLModel.metadata.sorted_tables)  # parents before children


def _check_empty(target: CatalogContext) -> None:
    with target.engine.connect() as conn:
        busy = [t.name for t in _tables() if conn.execute(select(func.count()).select_from(t)).scalar_one() > 0]
    if busy:
        raise ConflictError(
            f"the target catalog is not empty (rows in {', '.join(busy)})",
            hint="copy into a fresh database: nothing there is overwritten or merged",
        )


def copy_rows(source: CatalogContext, target: CatalogContext, report: TransferReport, progress: ProgressFn | None = None) -> None:
    tables = _tables()
    with source.engine.connect() as src, target.engine.begin() as dst:
        for i, table in enumerate(tables):
            total = src.execute(select(func.count()).select_from(table)).scalar_one()
            order = list(table.primary_key.columns)
            result = src.execution_options(stream_results=True).execute(select(table).order_by(*order))
            copied = 0
            while rows := result.fetchmany(ROW_CHUNK):
                dst.execute(table.insert(), [dict(r._mapping) for r in rows])
                copied += len(rows)
                if progress:
                    progress(f"rows: {table.name}", copied, total)
            report.rows[table.name] = copied
        if target.engine.dialect.name == "postgresql":
            for table in tables:
                pk = list(table.primary_key.columns)
                if len(pk) == 1 and isinstance(pk[0].type, Integer):
                    name, col = table.name, pk[0].name
                    dst.execute(text(
                        f"SELECT setval(pg_get_serial_sequence('{name}', '{col}'), COALESCE(MAX({col}), 1), MAX({col}) IS NOT NULL) FROM {name}"
                    ))


def copy_vectors(source: CatalogContext, target: CatalogContext, report: TransferReport, progress: ProgressFn | None = None) -> None:
    with source.engine.connect() as conn:
        datasets = conn.execute(
            select(Dataset.id, Dataset.index_version, Dataset.backbone).where(Dataset.index_version > 0, Dataset.backbone.is_not(None))
        ).all()
        for dataset_id, version, backbone in datasets:
            collection = collection_name(backbone)
            rows = conn.execute(
                select(Assignment.sample_id, Assignment.cluster, Sample.label)
                .join(Sample, Sample.id == Assignment.sample_id)
                .where(Assignment.dataset_id == dataset_id, Assignment.index_version == version)
                .order_by(Assignment.sample_id)
            ).all()
            with source.vectors.session(collection):
                for start in range(0, len(rows), VECTOR_CHUNK):
                    chunk = rows[start : start + VECTOR_CHUNK]
                    ids = [r[0] for r in chunk]
                    vectors = source.vectors.fetch_vectors(collection, ids)
                    target.vectors.ensure_collection(collection, vectors.shape[1])
                    target.vectors.upsert(collection, ids, vectors, [{"dataset_id": dataset_id, "label": r[2]} for r in chunk])
                    report.points[collection] = report.points.get(collection, 0) + len(ids)
                    if progress:
                        progress(f"vectors: dataset {dataset_id}", start + len(chunk), len(rows))


def copy_artifacts(source: CatalogContext, target: CatalogContext, report: TransferReport, progress: ProgressFn | None = None) -> None:
    """Every artifact of the source's store (local or in object storage: listed there, not in its
    cache) into the target's, skipping those already there with the same size."""
    objects = source.artifacts.list_objects()
    for i, obj in enumerate(objects, start=1):
        there = target.artifacts.stat(obj.key)
        if there is not None and there.size == obj.size:
            report.files_kept += 1
        else:
            target.artifacts.copy_in(obj.key, source.artifacts.open_path(obj.key))
            report.files += 1
            report.bytes += obj.size
        if progress:
            progress("artifacts", i, len(objects))


def copy_catalog(source: CatalogContext, target: CatalogContext, *, progress: ProgressFn | None = None) -> TransferReport:
    """Copy rows, vectors and artifacts from ``source`` into the empty catalog of ``target``
    (whose schema must already be at head: run migrations on it first)."""
    _check_empty(target)
    report = TransferReport()
    # vectors and artifacts first: without rows nothing refers to them, and a rerun after a
    # failure upserts or keeps them; the rows go last, in one transaction
    copy_vectors(source, target, report, progress)
    copy_artifacts(source, target, report, progress)
    copy_rows(source, target, report, progress)
    return report
