"""Importance weights: expert scores x label priors -> a mass per group. Pure: numpy only, no SQL.

The weights (also in the README):

1. **Scores -> cluster probabilities.** The scores of the rotation experts that were
   scored are min-max normalised to [0, 1] (all equal scores -> all 1, never a division
   by zero) and turned into probabilities over their clusters by a softmax with
   temperature T (default :data:`~nds.catalog.retrieval.request.DEFAULT_TEMPERATURE` = 0.1):
   ``p_k = softmax(s'_k / T)``.
   Experts that were not scored get no mass. With T = 0.1 an expert's mass halves for
   every 0.069 it lies below the best on the normalised scale, so the mass spreads over
   all the experts that score close to the best and collapses onto one only when the
   scores say one expert is far ahead (the original service's T = 0.01 put ~99% on one
   cluster whatever the gaps).
2. **Samples of cluster k** get ``p_k / |k|``; with label priors for their dataset, times
   ``P_t(y) / P_s(y)``, where ``P_s(y)`` is label y's share of the dataset. Samples without
   a label keep factor 1. Priors alone (no scores) give every dataset with priors the
   same mass, spread inside it by ``P_t(y) / P_s(y)``.

Weights are constant inside a group ``g = (dataset, cluster, label)``, so they are kept as
the G group masses ``m_g = sum of w over g`` (:func:`group_masses`, :class:`GroupTable`);
:mod:`nds.catalog.retrieval.sampling` draws from those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nds_client import preprocessing

if TYPE_CHECKING:
    from nds.catalog.retrieval.groups import GroupLayout


def normalized_scores(scores: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; equal scores all become 1."""
    lo, hi = float(scores.min()), float(scores.max())
    if hi - lo <= 1e-12:
        return np.ones_like(scores, dtype=np.float64)
    return (scores - lo) / (hi - lo)


def softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(x / T)`` of a 1-D array: :func:`nds_client.preprocessing.softmax` on one row."""
    return preprocessing.softmax((x / temperature)[np.newaxis])[0]


def group_cells(dataset_id: np.ndarray, cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, 2) array of the distinct (dataset_id, cluster) pairs, sorted, and each group's row in it.
    One 1-D unique over a combined key (a 2-D ``numpy.unique(axis=0)`` costs ten times more)."""
    dataset_rank = np.unique(dataset_id, return_inverse=True)[1].reshape(-1)
    key = dataset_rank * (int(cluster.max(initial=0)) + 1) + cluster
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return np.stack([dataset_id[first], cluster[first]], axis=1).reshape(-1, 2), inverse.reshape(-1).astype(np.int64)


@dataclass
class GroupTable:
    """The G groups a query samples from, with their masses."""

    dataset_id: np.ndarray    # int64 (G,)
    cluster: np.ndarray       # int64 (G,)
    label: Sequence[str | None]  # (G,)
    size: np.ndarray          # int64 (G,)
    mass: np.ndarray          # float64 (G,), sums to 1
    cell_index: tuple[np.ndarray, np.ndarray] | None = None  # cells(), when the layout already knows them

    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, 2) array of the distinct (dataset_id, cluster) pairs, sorted, and each group's row in it."""
        return self.cell_index if self.cell_index is not None else group_cells(self.dataset_id, self.cluster)

    @property
    def weight(self) -> np.ndarray:
        """Per-sample weight inside each group (mass / size)."""
        return np.where(self.size > 0, self.mass / np.maximum(self.size, 1), 0.0)


def group_masses(
    layout: GroupLayout,
    cluster_scores: Mapping[tuple[int, int], float],
    label_priors: Mapping[int, Mapping[str, float]] | None,
    temperature: float,
) -> np.ndarray:
    """float64 (G,): the masses ``m_g = w * |g|`` of the layout's groups (steps 1 and 2), not normalised.

    ``cluster_scores``: the rotation experts' scores per (dataset, cluster); ``label_priors``:
    P_t(y) per dataset, labels the dataset has (the caller checks them)."""
    per_dataset = layout.datasets
    if cluster_scores:
        keys = sorted(cluster_scores)
        p_all = softmax(normalized_scores(np.array([cluster_scores[k] for k in keys])), temperature)
        p_cell = np.zeros(len(layout.cells))  # p_k of each (dataset, cluster); clusters without groups are left out
        for key, prob in zip(keys, p_all.tolist()):
            cell = layout.cell_index.get(key)
            if cell is not None:
                p_cell[cell] = prob
        w = p_cell[layout.cell_of] / np.maximum(layout.cluster_size, 1)  # p_k / |k| per sample
    else:  # priors alone: every dataset with priors gets the same mass
        w = np.zeros(len(layout.size))
        with_priors = [d for d in (label_priors or {}) if d in per_dataset]
        for did in with_priors:
            w[layout.slices[did]] = 1.0 / len(with_priors) / max(int(per_dataset[did].size.sum()), 1)
    for did, priors in (label_priors or {}).items():
        if did in per_dataset:  # times P_t(y) / P_s(y); unlabelled samples keep factor 1
            g = per_dataset[did]
            pt = np.array([priors.get(lab, 0.0) if lab is not None else np.nan for lab in g.label], dtype=np.float64)
            w[layout.slices[did]] *= np.where(np.isnan(g.label_share), 1.0, pt / np.where(np.isnan(g.label_share), 1.0, g.label_share))
    return w * layout.size
