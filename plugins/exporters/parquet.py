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

SCHEMA = Exporter.schema()  # the manifest columns, in order, with their arrow types


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
        return _write(pa.Table.from_pydict({c: [row[c] for row in rows] for c in MANIFEST_COLUMNS}, schema=SCHEMA) for rows in chunks if rows)

    def stream_batches(self, batches: Iterable[Any]) -> Iterator[bytes]:
        return _write(pa.Table.from_arrays([b.column(c) for c in MANIFEST_COLUMNS], schema=SCHEMA) for b in batches if b.num_rows)


def _write(tables: Iterable[pa.Table]) -> Iterator[bytes]:
    """A parquet file of one row group per table, its bytes taken out after each."""
    sink = _Drain()
    with pq.ParquetWriter(sink, SCHEMA, compression="zstd") as writer:
        wrote = False
        for table in tables:
            writer.write_table(table)
            wrote = True
            yield sink.take()
        if not wrote:
            writer.write_table(SCHEMA.empty_table())
    yield sink.take()
