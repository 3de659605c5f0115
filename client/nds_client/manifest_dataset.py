"""Train on a manifest in three lines::

    ds = ManifestDataset("manifest.csv", transform=torchvision.transforms.ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=64, sampler=ds.sampler())
    for images, targets in loader: ...

A manifest row is one selected sample (columns key, uri, label, dataset, cluster, weight,
count). The dataset holds each row once; :meth:`ManifestDataset.sampler` honours the
selection: ``by="count"`` yields every row ``count`` times per epoch, shuffled (the
sampled subset exactly); ``by="weight"`` draws rows with probability proportional to
``weight`` (a fresh sample of the same size every epoch).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

from nds_client.errors import InvalidInputError

REQUIRED = ("uri", "count")


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .csv, .jsonl or .parquet manifest as dicts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            rows = [dict(r) for r in csv.DictReader(fh)]
    elif suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise InvalidInputError(f"unknown manifest format {suffix!r}", field="manifest", hint="use .csv, .jsonl or .parquet")
    for i, row in enumerate(rows, start=2 if suffix == ".csv" else 1):
        missing = [c for c in REQUIRED if c not in row]
        if missing:
            raise InvalidInputError(f"{path.name} row {i}: missing {missing}", field="manifest")
        row["count"] = int(row["count"])
        row["weight"] = float(row.get("weight") or 0.0)
        row["label"] = row.get("label") or None
    return rows


class CountSampler(Sampler[int]):
    """Every row ``count`` times per epoch, in a new random order each epoch."""

    def __init__(self, counts: list[int], generator: torch.Generator | None = None) -> None:
        self.index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
        self.generator = generator

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.index), generator=self.generator)
        return iter(self.index[order].tolist())

    def __len__(self) -> int:
        return len(self.index)


class ManifestDataset(Dataset):
    def __init__(
        self,
        manifest: str | Path,
        *,
        transform: Callable[[Image.Image], Any] | None = None,
        classes: list[str] | None = None,
    ) -> None:
        self.rows = read_manifest(manifest)
        self.transform = transform
        self.classes = classes or sorted({r["label"] for r in self.rows if r["label"] is not None})
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.rows[index]
        with Image.open(row["uri"]) as im:
            image = im.convert("RGB")
        target = self.class_to_idx.get(row["label"], -1) if row["label"] is not None else -1
        return (self.transform(image) if self.transform else image), target

    @property
    def counts(self) -> list[int]:
        return [r["count"] for r in self.rows]

    def sampler(self, *, by: str = "count", num_samples: int | None = None, generator: torch.Generator | None = None) -> Sampler[int]:
        if by == "count":
            return CountSampler(self.counts, generator=generator)
        if by == "weight":
            weights = [float(r["weight"]) for r in self.rows]
            return WeightedRandomSampler(weights, num_samples or sum(self.counts), replacement=True, generator=generator)
        raise InvalidInputError(f"unknown sampler {by!r}", field="by", hint="count or weight")
