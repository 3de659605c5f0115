"""Train on a manifest in three lines::

    ds = ManifestDataset("manifest.csv", transform=torchvision.transforms.ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=64, sampler=ds.sampler())
    for images, targets in loader: ...

A manifest row is one selected sample (columns key, uri, label, dataset, cluster, weight,
count, and shard, offset, size for a sample inside a tar shard or a Parquet file). Every
image is read through :func:`nds_client.storage.read_location`, whatever it is: a local or
object-storage file, a tar member (one ranged read of ``size`` bytes at ``offset`` of
``shard``), a Parquet row (its row group read, the last few kept); the dataset keeps no
open file, so it pickles into DataLoader workers. A client key's manifest names files
relative to the server's data root: ``data_root`` is where this machine sees it.

The dataset holds each row once; :meth:`ManifestDataset.sampler` honours the selection: ``by="count"`` yields every row ``count`` times per epoch, shuffled (the
sampled subset exactly); ``by="weight"`` draws rows with probability proportional to
``weight`` (a fresh sample of the same size every epoch).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

from nds_client.errors import InvalidInputError
from nds_client.storage import Location, is_remote, read_location

REQUIRED = ("uri", "count")
#: the columns that hold integers (a CSV cell is text; an empty one is None)
INTEGERS = ("offset", "size")


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


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
        try:
            row["count"] = int(row["count"])
            row["weight"] = float(row.get("weight") or 0.0)
            for name in INTEGERS:
                value = row.get(name)
                row[name] = None if value is None or value == "" else int(value)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{path.name} row {i}: {exc}", field="manifest", hint="count, offset and size are integers") from None
        row["label"] = row.get("label") or None
        row["shard"] = _text(row.get("shard"))
    return rows


def _located(uri: str, data_root: Path | None) -> str:
    """A uri as this machine reads it: a relative one (a client key's manifest) under ``data_root``."""
    if is_remote(uri) or uri.startswith("file://") or Path(uri).is_absolute():
        return uri
    if data_root is None:
        raise InvalidInputError(f"the manifest names {uri!r}, relative to the server's data roots", field="data_root",
                                hint="pass data_root=, the folder where this machine sees the server's data root")
    return str(Path(data_root) / uri)


def location_of(row: dict[str, Any], data_root: str | Path | None = None) -> Location:
    """Where the image of a manifest row is (relative uris and shards under ``data_root``)."""
    root = None if data_root is None else Path(data_root)
    shard = row.get("shard")
    return Location(_located(str(row["uri"]), root), None if shard is None else _located(str(shard), root), row.get("offset"), row.get("size"))


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
        data_root: str | Path | None = None,
    ) -> None:
        self.rows = read_manifest(manifest)
        self.data_root = None if data_root is None else Path(data_root)
        self.locations = [location_of(r, self.data_root) for r in self.rows]  # relative uris refused here, not in a worker
        self.transform = transform
        self.classes = classes or sorted({r["label"] for r in self.rows if r["label"] is not None})
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.rows[index]
        with Image.open(io.BytesIO(read_location(self.locations[index]))) as im:
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
