"""The groups of each indexed dataset, read once per (dataset, index version) and cached.

A committed index version never changes, so its group table can be kept in memory by
the process that serves queries: a query then reads no rows at all for the groups.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, select
from sqlmodel import col

from nds.catalog.retrieval.weights import group_cells
from nds.catalog.tables import Group


@dataclass(frozen=True)
class DatasetGroups:
    """One dataset's groups at one index version, as arrays (G_d rows)."""

    cluster: np.ndarray        # int64
    label: tuple[str | None, ...]
    size: np.ndarray           # int64
    cluster_size: np.ndarray   # int64: size of each group's cluster
    label_share: np.ndarray    # float64: P_s(label) over the labelled samples; nan when unlabelled
    labels: frozenset[str]

    @classmethod
    def from_rows(cls, rows: list[tuple[int, str | None, int]]) -> DatasetGroups:
        cluster = np.array([r[0] for r in rows], dtype=np.int64)
        label = tuple(r[1] for r in rows)
        size = np.array([r[2] for r in rows], dtype=np.int64)
        per_cluster = np.bincount(cluster, weights=size, minlength=int(cluster.max(initial=0)) + 1) if len(rows) else np.zeros(0)
        totals: dict[str, int] = {}
        for lab, n in zip(label, size.tolist()):
            if lab is not None:
                totals[lab] = totals.get(lab, 0) + n
        labelled = sum(totals.values())
        share = np.array([totals[lab] / labelled if lab is not None else np.nan for lab in label], dtype=np.float64)
        return cls(cluster, label, size, per_cluster[cluster].astype(np.int64), share, frozenset(totals))


@dataclass(frozen=True)
class GroupLayout:
    """The groups of several datasets (each at one index version) side by side: what a query
    weighs. Datasets in ascending id order, each dataset's groups in catalog order."""

    datasets: dict[int, DatasetGroups]
    slices: dict[int, slice]     # dataset id -> its rows
    dataset_id: np.ndarray       # int64 (G,)
    cluster: np.ndarray          # int64 (G,)
    label: tuple[str | None, ...]
    size: np.ndarray             # int64 (G,)
    cluster_size: np.ndarray     # int64 (G,)
    cells: np.ndarray            # int64 (C, 2): the distinct (dataset id, cluster) pairs, sorted
    cell_of: np.ndarray          # int64 (G,): each group's row in ``cells``
    cell_index: dict[tuple[int, int], int]

    @classmethod
    def of(cls, datasets: dict[int, DatasetGroups]) -> GroupLayout:
        parts = [(did, datasets[did]) for did in sorted(datasets)]
        ends = np.cumsum([len(g.size) for _, g in parts], dtype=np.int64)

        def joined(arrays: list[np.ndarray]) -> np.ndarray:
            return np.concatenate([np.zeros(0, np.int64), *arrays])

        dataset_id = joined([np.full(len(g.size), did, dtype=np.int64) for did, g in parts])
        cluster = joined([g.cluster for _, g in parts])
        cells, cell_of = group_cells(dataset_id, cluster)
        layout = cls(
            datasets=dict(datasets),
            slices={did: slice(int(end) - len(g.size), int(end)) for (did, g), end in zip(parts, ends)},
            dataset_id=dataset_id, cluster=cluster, label=tuple(lab for _, g in parts for lab in g.label),
            size=joined([g.size for _, g in parts]), cluster_size=joined([g.cluster_size for _, g in parts]),
            cells=cells, cell_of=cell_of, cell_index={(d, c): i for i, (d, c) in enumerate(cells.tolist())},
        )
        for array in (layout.dataset_id, layout.cluster, layout.size, layout.cluster_size, layout.cells, layout.cell_of):
            array.flags.writeable = False  # shared by concurrent queries
        return layout


class GroupCache:
    """(dataset id, index version) -> DatasetGroups, filled on first use, and the layouts of the
    sets of them that queries weigh; thread-safe."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._entries: dict[tuple[int, int], DatasetGroups] = {}
        self._layouts: dict[tuple[tuple[int, int], ...], GroupLayout] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def layout(self, conn: Connection, versions: dict[int, int]) -> GroupLayout:
        """The layout of these datasets at these index versions."""
        key = tuple(sorted(versions.items()))
        with self._lock:
            hit = self._layouts.get(key)
        if hit is not None:
            return hit
        layout = GroupLayout.of({did: self.get(conn, did, version) for did, version in key})
        with self._lock:
            if len(self._layouts) >= self.max_entries:
                self._layouts.clear()
            self._layouts[key] = layout
        return layout

    def get(self, conn: Connection, dataset_id: int, version: int) -> DatasetGroups:
        key = (dataset_id, version)
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None:
            return hit
        rows = conn.execute(
            select(col(Group.cluster), col(Group.label), col(Group.size))
            .where(col(Group.dataset_id) == dataset_id, col(Group.index_version) == version)
            .order_by(col(Group.id))
        ).all()
        groups = DatasetGroups.from_rows([(cluster, label, size) for cluster, label, size in rows])
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = groups
        return groups
