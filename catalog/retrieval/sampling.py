"""Sampling a budget from the group masses. Pure: numpy only, no SQL.

Weights are constant inside a group ``g = (dataset, cluster, label)``, so the sampler works
on the G group masses ``m_g = sum of w over g`` (:class:`~nds.catalog.retrieval.weights.GroupTable`):
it draws group counts (multinomial with replacement; without replacement it fills groups in
proportion and spills over when a group runs out, with the budget capped at the number of
samples that have weight), then picks samples inside each group by rank. Cost O(G + B),
independent of N; nothing per-sample is read until a manifest is exported.

Same group table + budget + seed = the same picks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nds.catalog.retrieval.weights import GroupTable


@dataclass
class Picks:
    """What a query selected: each picked (group, rank) once, with how many times it was drawn.

    Sorted by group, then rank: the picks of group g are the ``unique[g]`` rows after those
    of groups 0..g-1, so a pick's group follows from the per-group numbers.
    """

    rank: np.ndarray      # int (U,): rank inside its group
    count: np.ndarray     # int (U,): draws of this sample (1 without replacement)
    selected: np.ndarray  # int64 (G,): draws per group
    unique: np.ndarray    # int64 (G,): picks (distinct samples) per group

    @property
    def group(self) -> np.ndarray:
        """int64 (U,): each pick's group."""
        return np.repeat(np.arange(len(self.unique), dtype=np.int64), self.unique)

def sample_groups(table: GroupTable, budget: int, *, replacement: bool, seed: int) -> Picks:
    """Draw the picks in O(G + B): group counts first, then ranks inside each group.

    Picks come out sorted by (group, rank), each (group, rank) once with its count.
    """
    rng = np.random.default_rng(seed)
    G = len(table.size)
    if replacement:
        counts = rng.multinomial(budget, table.mass)
        if budget == 0:
            return Picks(np.zeros(0, np.int64), np.zeros(0, np.int64), counts, np.zeros(G, np.int64))
        index = np.int32 if int(table.size.sum()) < 2**31 else np.int64  # half the bytes to move and sort
        offsets = np.zeros(G, dtype=index)  # where each group starts in the concatenation of all groups
        np.cumsum(table.size[:-1], out=offsets[1:])
        keys = rng.random(budget)
        keys *= np.repeat(table.size.astype(np.float64), counts)   # draws are in group order: repeat, no gather
        keys = keys.astype(index)                                   # floor: a uniform rank inside the group
        keys += np.repeat(offsets, counts)                          # group-major position: sorting keeps groups in order
        keys.sort()
        first = np.empty(budget, dtype=bool)
        first[0] = True
        np.not_equal(keys[1:], keys[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        picked = keys[starts]
        drawn = np.empty(len(starts), dtype=np.int64)  # draws of each pick: the gaps between first occurrences
        np.subtract(starts[1:], starts[:-1], out=drawn[:-1])
        drawn[-1] = budget - starts[-1]
        unique = np.diff(np.searchsorted(picked, offsets), append=len(picked)).astype(np.int64)
        picked -= np.repeat(offsets, unique)
        return Picks(picked, drawn, counts, unique)
    counts = np.zeros(G, dtype=np.int64)
    capacity = np.where(table.mass > 0, table.size, 0)
    remaining = int(min(budget, capacity.sum()))
    while remaining > 0:
        share = np.where(capacity - counts > 0, table.mass, 0.0)
        draw = np.minimum(rng.multinomial(remaining, share / share.sum()), capacity - counts)  # a full group spills over
        counts += draw
        remaining -= int(draw.sum())
    ranks = [np.sort(rng.choice(int(table.size[g]), int(counts[g]), replace=False)) if counts[g] < table.size[g] else np.arange(int(table.size[g]))
             for g in np.flatnonzero(counts)]
    rank = np.concatenate(ranks).astype(np.int64) if ranks else np.zeros(0, np.int64)
    return Picks(rank, np.ones(len(rank), dtype=np.int64), counts, counts)  # every pick drawn once
