"""``img2dataset``: a Parquet of ``url``, ``caption``, ``key`` to download the selection again with img2dataset.

For selections from url-based sources: img2dataset's own shards (``webdataset`` source,
whose ``.json`` sidecars carry ``url``, ``caption`` and ``key``, kept as sample metadata) or
a Parquet or manifest source with a url column (a sample whose uri is an ``http(s)://``
url). Columns::

    url       the image's url
    caption   its caption (null when the source has none)
    key       the source's key of the sample (img2dataset's; the manifest key when there is none)
    count     how many times the sample was drawn (keep it with ``--save_additional_columns '["count"]'``)
    nds_key   the manifest key (``dataset/123``)

so that ``img2dataset --url_list subset.parquet --input_format parquet --url_col url
--caption_col caption`` fetches the subset. Rows without a url are left out, and their
number is written in the file's metadata (``nds.rows_without_url``). A selection with no
url at all is refused before anything is sent (HTTP 422, field ``format``): the first chunk
that has one is looked for before the stream starts. One row group per chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nds.plugins.contract import Exporter, ImageReader, InvalidInputError, Row
from nds.plugins.exporters.parquet import _Drain
from nds_client.manifests import MANIFEST_FORMATS  # the built-in formats: the client knows them by name

SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("count", pa.int64()), ("nds_key", pa.string())])
HINT = ("img2dataset needs url-based sources: img2dataset's shards (registered with --source webdataset, "
        "their .json sidecars give url, caption and key) or Parquet/manifest sources with a url column; "
        "export this selection as webdataset, parquet, csv or jsonl instead")


def url_record(row: Row) -> dict[str, Any] | None:
    """The img2dataset row of a manifest row, or None when the sample has no url."""
    meta = row.get("meta") or {}
    url = meta.get("url") if isinstance(meta, dict) else None
    uri = str(row.get("uri") or "")
    if not url and uri.lower().startswith(("http://", "https://")):
        url = uri
    if not url:
        return None
    caption = meta.get("caption") if isinstance(meta, dict) else None
    key = meta.get("key") if isinstance(meta, dict) else None
    return {"url": str(url), "caption": None if caption is None else str(caption), "key": str(key if key not in (None, "") else row["key"]),
            "count": int(row["count"]), "nds_key": str(row["key"])}


class Img2DatasetExporter(Exporter):
    name = "img2dataset"
    media_type = "application/vnd.apache.parquet"
    suffix = MANIFEST_FORMATS["img2dataset"]

    def stream(self, chunks: Iterable[list[Row]], *, read_image: ImageReader | None = None) -> Iterator[bytes]:
        """Checks, before returning, that some row has a url (reading chunks until one has): a
        selection without any fails here, as a 422, not halfway through a download."""
        rest = iter(chunks)
        skipped = 0
        for rows in rest:
            records = [r for r in map(url_record, rows) if r is not None]
            skipped += len(rows) - len(records)
            if records:
                return self._write(records, rest, skipped)
        raise InvalidInputError(f"none of the {skipped} selected samples has a url" if skipped else "the selection is empty: no url to write",
                                field="format", hint=HINT)

    @staticmethod
    def _write(first: list[dict[str, Any]], rest: Iterator[list[Row]], skipped: int) -> Iterator[bytes]:
        sink = _Drain()
        with pq.ParquetWriter(sink, SCHEMA, compression="zstd") as writer:
            writer.write_table(pa.Table.from_pylist(first, schema=SCHEMA))
            yield sink.take()
            for rows in rest:
                records = [r for r in map(url_record, rows) if r is not None]
                skipped += len(rows) - len(records)
                if records:
                    writer.write_table(pa.Table.from_pylist(records, schema=SCHEMA))
                    yield sink.take()
            writer.add_key_value_metadata({"nds.rows_without_url": str(skipped)})
        yield sink.take()
