"""What a training manifest is, for the server that writes it and the client that reads it.

A manifest has one row per selected sample, with the columns :data:`MANIFEST_COLUMNS`:
``key`` (a stable id, ``dataset/sample``), ``uri`` (where the image is), ``label``,
``dataset``, ``cluster``, ``weight`` (its importance weight), ``count`` (how many times the
sample was drawn), and where the sample lives inside a container: ``shard`` (the tar shard
or Parquet file; empty for a plain file), ``offset`` (a tar member's data offset in bytes,
or a Parquet row's number) and ``size`` (the member's length in bytes). A loader reads a
tar member with one ranged read of ``size`` bytes at ``offset`` of ``shard``
(:func:`nds_client.storage.read_location` does). The server streams it in one of
:data:`MANIFEST_FORMATS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MANIFEST_COLUMNS: tuple[str, ...] = ("key", "uri", "label", "dataset", "cluster", "weight", "count", "shard", "offset", "size")

#: one manifest row: a value for each of MANIFEST_COLUMNS
Row = dict[str, Any]

#: format name -> file suffix, for every format the server streams
MANIFEST_FORMATS: dict[str, str] = {"csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet"}


def format_for_path(path: str | Path) -> str | None:
    """The manifest format a file name asks for (``m.parquet`` -> ``parquet``), or None."""
    suffix = Path(path).suffix.lower()
    return next((name for name, s in MANIFEST_FORMATS.items() if s == suffix), None)
