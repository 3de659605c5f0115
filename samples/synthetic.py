"""Synthetic indexed catalogs: rows that look like an indexed dataset, without images or training.

Used by the retrieval tests and benchmarks to build catalogs of any size quickly (the
query path reads only groups, experts and, for manifests, assignments and samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import insert

from nds.catalog.context import CatalogContext
from nds.catalog.db import session_scope
from nds.catalog.tables import Assignment, Cluster, Dataset, DatasetStatus, Expert, ExpertKind, Group, Sample
from nds.catalog.vectors import collection_name


@dataclass
class SyntheticDataset:
    dataset_id: int
    name: str
    expert_ids: dict[int, int]            # cluster -> rotation expert id
    group_sizes: dict[tuple[int, str], int]  # (cluster, label) -> size


def add_indexed_dataset(
    ctx: CatalogContext, name: str, *, clusters: int, labels: Sequence[str], sizes: np.ndarray | None = None,
    samples_per_group: int = 10, with_samples: bool = True, chunk: int = 200_000,
) -> SyntheticDataset:
    """A dataset at index version 1 with ``clusters`` x ``labels`` groups; ``sizes`` (clusters, labels) overrides the sizes."""
    if sizes is None:
        sizes = np.full((clusters, len(labels)), samples_per_group, dtype=np.int64)
    total = int(sizes.sum())
    with session_scope(ctx.engine) as session:
        dataset = Dataset(name=name, source="synthetic", uri=f"/synthetic/{name}", status=DatasetStatus.indexed,
                          num_samples=total, num_labels=len(labels), labels=sorted(labels), index_version=1, backbone="synthetic")
        session.add(dataset)
        session.flush()
        did = dataset.id
        session.execute(insert(Cluster), [
            {"dataset_id": did, "index_version": 1, "cluster": k, "size": int(sizes[k].sum())} for k in range(clusters)
        ])
        session.execute(insert(Group), [
            {"dataset_id": did, "index_version": 1, "cluster": k, "label": lab, "size": int(sizes[k, j])}
            for k in range(clusters) for j, lab in enumerate(labels) if sizes[k, j] > 0
        ])
        experts = {}
        for k in range(clusters):
            e = Expert(dataset_id=did, index_version=1, kind=ExpertKind.rotation, cluster=k, artifact=f"synthetic/{name}-{k}.onnx",
                       sha256="0" * 64, input_size=64)
            session.add(e)
            session.flush()
            experts[k] = e.id
        session.add(Expert(dataset_id=did, index_version=1, kind=ExpertKind.classifier, cluster=None, artifact=f"synthetic/{name}-cls.onnx",
                           sha256="0" * 64, input_size=64))
    if with_samples:
        _insert_samples(ctx, did, name, sizes, labels, chunk)
    return SyntheticDataset(did, name, experts, {(k, lab): int(sizes[k, j]) for k in range(clusters) for j, lab in enumerate(labels)})


def _insert_samples(ctx: CatalogContext, did: int, name: str, sizes: np.ndarray, labels: Sequence[str], chunk: int) -> None:
    """Samples and their assignments, in chunks (millions of rows stay cheap).

    Plain Core executemany on the tables (no ORM bulk-insert bookkeeping per row): about
    twice as fast, which is what makes catalogs of 10^7 samples practical.
    """
    from sqlmodel import select

    position = 0
    batch_s: list[dict] = []
    batch_a: list[tuple[int, str, int]] = []
    sample_insert, assignment_insert = Sample.__table__.insert(), Assignment.__table__.insert()

    def flush() -> None:
        nonlocal batch_s, batch_a
        if not batch_s:
            return
        with session_scope(ctx.engine) as session:
            first = position - len(batch_s)
            conn = session.connection()
            conn.execute(sample_insert, batch_s)
            ids = conn.execute(select(Sample.id).where(Sample.dataset_id == did, Sample.position >= first).order_by(Sample.position)).scalars().all()
            conn.execute(assignment_insert, [
                {"sample_id": sid, "index_version": 1, "dataset_id": did, "cluster": c, "label": lab, "rank": r}
                for sid, (c, lab, r) in zip(ids, batch_a)
            ])
        batch_s, batch_a = [], []

    for k in range(sizes.shape[0]):
        for j, lab in enumerate(labels):
            for r in range(int(sizes[k, j])):
                batch_s.append({"dataset_id": did, "position": position, "uri": f"/synthetic/{name}/{k}/{lab}/{r}.png", "label": lab,
                                "width": 32, "height": 32, "byte_size": 100, "sha256": "0" * 64})
                batch_a.append((k, lab, r))
                position += 1
                if len(batch_s) >= chunk:
                    flush()
    flush()


def add_files_and_vectors(ctx: CatalogContext, *, dim: int = 8, seed: int = 0) -> int:
    """Give every expert of the catalog a (fake) model file in the artifact store and every
    sample a random unit vector in the ``synthetic`` space (collection ``collection_name("synthetic")``, the
    backbone :func:`add_indexed_dataset` records): what downloads, search and catalog moves
    read. Returns the number of points."""
    from sqlmodel import Session, select

    with Session(ctx.engine) as session:
        for expert in session.exec(select(Expert)).all():
            ctx.artifacts.write_bytes(expert.artifact, f"model {expert.id}".encode())
        samples = session.exec(select(Sample.id, Sample.dataset_id, Sample.label).order_by(Sample.id)).all()
    collection = collection_name("synthetic")
    ctx.vectors.ensure_collection(collection, dim)
    vectors = np.random.default_rng(seed).normal(size=(len(samples), dim)) + 0.1
    ctx.vectors.upsert(collection, [s[0] for s in samples], vectors, [{"dataset_id": s[1], "label": s[2]} for s in samples])
    return len(samples)
