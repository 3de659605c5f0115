"""``parquet`` manifests, written one row group per chunk (or record batch) with pyarrow.

:meth:`ParquetExporter.stream` builds each row group from rows, :meth:`ParquetExporter.stream_batches`
takes the columns of a record batch as they are: the same chunks give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nds.plugins.contract import MANIFEST_COLUMNS, Exporter, ImageReader, Row
from nds_client.manifests import MANIFEST_FORMATS  # the built-in formats: the client knows them by name

#: the arrow type of each manifest column; the columns and their order are MANIFEST_COLUMNS'
TYPES = {"key": pa.string(), "uri": pa.string(), "label": pa.string(), "dataset": pa.string(),
         "cluster": pa.int64(), "weight": pa.float64(), "count": pa.int64(), "shard": pa.string(), "offset": pa.int64(), "size": pa.int64()}
SCHEMA = pa.schema([(c, TYPES[c]) for c in MANIFEST_COLUMNS])


class _Drain(io.RawIOBase):
    """A write-only sink whose bytes are taken out after each row group."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # noqa: ANN001 - bytes-like
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


class ParquetExporter(Exporter):
    name = "parquet"
    media_type = "application/vnd.apache.parquet"
    suffix = MANIFEST_FORMATS["parquet"]

    def stream(self, chunks: Iterable[list[Row]], *, read_image: ImageReader | None = None) -> Iterator[bytes]:
        sink = _Drain()
        with pq.ParquetWriter(sink, SCHEMA, compression="zstd") as writer:
            wrote = False
            for rows in chunks:
                if not rows:
                    continue
                writer.write_table(pa.Table.from_pydict({c: [row[c] for row in rows] for c in MANIFEST_COLUMNS}, schema=SCHEMA))
                wrote = True
                yield sink.take()
            if not wrote:
                writer.write_table(SCHEMA.empty_table())
        yield sink.take()

    def stream_batches(self, batches: Iterable[Any]) -> Iterator[bytes]:
        sink = _Drain()
        with pq.ParquetWriter(sink, SCHEMA, compression="zstd") as writer:
            wrote = False
            for batch in batches:
                if not batch.num_rows:
                    continue
                writer.write_table(pa.Table.from_arrays([batch.column(c) for c in MANIFEST_COLUMNS], schema=SCHEMA))
                wrote = True
                yield sink.take()
            if not wrote:
                writer.write_table(SCHEMA.empty_table())
        yield sink.take()
