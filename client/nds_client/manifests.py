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

#: format name -> file suffix, for every format the server streams: the manifests (csv, jsonl,
#: parquet), the selected images as a WebDataset tar (webdataset) and img2dataset's url list
#: (img2dataset, a Parquet of url, caption, key). Two formats share .parquet: a file name asks
#: for the first of them (parquet)
MANIFEST_FORMATS: dict[str, str] = {"csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet", "webdataset": ".tar", "img2dataset": ".parquet"}


def format_for_path(path: str | Path) -> str | None:
    """The manifest format a file name asks for (``m.parquet`` -> ``parquet``, ``m.tar`` ->
    ``webdataset``), or None; a suffix that two formats share names the first."""
    suffix = Path(path).suffix.lower()
    return next((name for name, s in MANIFEST_FORMATS.items() if s == suffix), None)


#: (magic bytes at the start, the suffix): what an image stored without a file name is
_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tiff"), (b"MM\x00*", ".tiff"))


def image_suffix(row: Row, data: bytes | None = None) -> str:
    """The file suffix of a row's image (``.png``): the stored file's, or the tar member's
    (``SHARD#MEMBER``), when it is an image suffix; else, for a Parquet cell (no file name),
    the format ``data`` is in (``.bin`` when no decoder knows it)."""
    from nds_client.images import IMAGE_SUFFIXES

    uri, shard = str(row["uri"]), row.get("shard")
    if shard is None or shard == "":
        name = uri
    elif "#" in uri and not uri.rsplit("#", 1)[1].startswith("row="):
        name = uri.rsplit("#", 1)[1]
    else:
        name = ""
    suffix = Path(name).suffix.lower() if name else ""
    if suffix in IMAGE_SUFFIXES or data is None:
        return suffix
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    try:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            found = (im.format or "").lower()
    except Exception:  # noqa: BLE001 - any decoder failure: not an image format PIL knows
        found = ""
    return "." + {"jpeg": "jpg"}.get(found, found) if found else ".bin"
