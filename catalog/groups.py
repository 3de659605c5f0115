"""The groups of each indexed dataset, read once per (dataset, index version) and cached.

A committed index version never changes, so its group table can be kept in memory by
the process that serves queries: a query then reads no rows at all for the groups.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, select

from catalog.models import Group


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


class GroupCache:
    """(dataset id, index version) -> DatasetGroups, filled on first use; thread-safe."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._entries: dict[tuple[int, int], DatasetGroups] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def get(self, conn: Connection, dataset_id: int, version: int) -> DatasetGroups:
        key = (dataset_id, version)
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None:
            return hit
        rows = conn.execute(
            select(Group.cluster, Group.label, Group.size)
            .where(Group.dataset_id == dataset_id, Group.index_version == version)
            .order_by(Group.id)
        ).all()
        groups = DatasetGroups.from_rows([tuple(r) for r in rows])
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = groups
        return groups
