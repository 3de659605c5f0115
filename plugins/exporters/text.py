"""``csv`` and ``jsonl`` manifests."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator

from nds.plugins.contract import MANIFEST_COLUMNS, Exporter, ImageReader, Row
from nds_client.manifests import MANIFEST_FORMATS  # the built-in formats: the client knows them by name


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form: stable, byte for byte
    return value


class CsvExporter(Exporter):
    name = "csv"
    media_type = "text/csv"
    suffix = MANIFEST_FORMATS["csv"]

    def stream(self, chunks: Iterable[list[Row]], *, read_image: ImageReader | None = None) -> Iterator[bytes]:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        yield buf.getvalue().encode()
        for rows in chunks:
            buf.seek(0)
            buf.truncate()
            writer.writerows([_cell(row[c]) for c in MANIFEST_COLUMNS] for row in rows)
            yield buf.getvalue().encode()


class JsonlExporter(Exporter):
    name = "jsonl"
    media_type = "application/x-ndjson"
    suffix = MANIFEST_FORMATS["jsonl"]

    def stream(self, chunks: Iterable[list[Row]], *, read_image: ImageReader | None = None) -> Iterator[bytes]:
        for rows in chunks:
            yield "".join(json.dumps({c: row[c] for c in MANIFEST_COLUMNS}, ensure_ascii=False) + "\n" for row in rows).encode()
