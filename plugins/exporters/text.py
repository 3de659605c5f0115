"""``csv`` and ``jsonl`` manifests.

Two paths give the same bytes: :meth:`stream` over rows (the standard library's csv writer
and json.dumps, per row) and :meth:`stream_batches` over pyarrow record batches (the
server's path), which builds each line with pyarrow's string kernels. Values the kernels
cannot render exactly as the standard library does (a string with a character csv would
quote or json would escape; a null float) are rendered by the standard library itself, one
value at a time, so both paths agree byte for byte whatever the data.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from nds.plugins.contract import MANIFEST_COLUMNS, Exporter, ImageReader, Row
from nds_client.manifests import MANIFEST_FORMATS  # the built-in formats: the client knows them by name


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form: stable, byte for byte
    return value


def _csv_field(value: str) -> str:
    """One field as the csv writer writes it (quoted or not)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([value, ""])
    return buf.getvalue()[:-2]  # less the ',' of the empty second field and the line end


#: strings that may need the csv writer (quoting) or json (escaping): every control character,
#: the quote, the comma, the backslash and the characters past ASCII that some Pythons treat as line ends
_CSV_SPECIAL = '[\\x00-\\x1f\\x{7f}-\\x{9f}",\\x{2028}\\x{2029}]'
_JSON_SPECIAL = '[\\x00-\\x1f"\\\\]'


#: the bytes that may be part of such a character (in UTF-8): what the byte screen looks for
_CSV_UNSAFE = bytes(range(0x20)) + b'",' + bytes(range(0x7F, 0x100))
_JSON_UNSAFE = bytes(range(0x20)) + b'"\\'


def _safe_bytes(unsafe: bytes) -> bytes:
    return bytes(b for b in range(256) if b not in unsafe)


_SAFE = {_CSV_SPECIAL: _safe_bytes(_CSV_UNSAFE), _JSON_SPECIAL: _safe_bytes(_JSON_UNSAFE)}


def _all_plain(column: Any, special: str) -> bool:  # noqa: ANN401 - a pyarrow array
    """Whether no value can match ``special``, from the column's bytes alone (one C pass: the
    regex runs only for columns holding a byte that could be part of a special character)."""
    import pyarrow as pa

    if column.null_count == len(column):
        return True
    if not pa.types.is_string(column.type):
        return False
    return not _joined_bytes(column).translate(None, _SAFE[special])


def _strings(column: Any, special: str, render: Callable[[str], str], plain: Callable[[Any], Any]) -> Any:  # noqa: ANN401 - pyarrow arrays
    """A string column as text: ``plain`` for ordinary values, ``render`` one by one where ``special`` matches."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = plain(column)
    if _all_plain(column, special):
        return out
    odd = pc.fill_null(pc.match_substring_regex(column, special), False)
    if pc.any(odd).as_py():
        values = pc.filter(column, odd).to_pylist()
        out = pc.replace_with_mask(out, odd, pa.array([render(v) for v in values], pa.string()))
    return out


def _floats(column: Any, render: Callable[[float], str]) -> Any:  # noqa: ANN401 - pyarrow arrays
    """A float column as text, ``render`` once per distinct value (by its bits: -0.0 is not 0.0)."""
    import numpy as np
    import pyarrow as pa

    if column.null_count:
        return pa.array([None if v is None else render(v) for v in column.to_pylist()], pa.string())
    values = column.to_numpy(zero_copy_only=False)
    bits, inverse = np.unique(values.view(np.int64), return_inverse=True)
    return pa.array([render(float(v)) for v in bits.view(np.float64)], pa.string()).take(pa.array(inverse.reshape(-1)))


def _text_of(column: Any, *, strings: Callable[[Any], Any], floats: Callable[[Any], Any]) -> Any:  # noqa: ANN401 - pyarrow arrays
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return strings(column)
    if pa.types.is_floating(kind):
        return floats(column)
    return pc.cast(column, pa.string())  # int64: str(int)


def _joined_bytes(lines: Any) -> bytes:  # noqa: ANN401 - a pyarrow StringArray
    """The values of a string array, concatenated (its data buffer between the first and last offsets)."""
    import numpy as np

    if len(lines) == 0:
        return b""
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset: lines.offset + len(lines) + 1]
    return memoryview(lines.buffers()[2])[int(offsets[0]):int(offsets[-1])].tobytes()


def _csv_batch(batch: Any) -> bytes:  # noqa: ANN401 - a pyarrow RecordBatch
    import pyarrow.compute as pc

    if batch.num_rows == 0:
        return b""
    cells = [pc.fill_null(_text_of(batch.column(c), strings=lambda a: _strings(a, _CSV_SPECIAL, _csv_field, lambda x: x),
                                     floats=lambda a: _floats(a, float.__repr__)), "")
             for c in MANIFEST_COLUMNS]
    lines = pc.binary_join_element_wise(pc.binary_join_element_wise(*cells, ","), "", "\n")
    return _joined_bytes(lines)


def _json_batch(batch: Any) -> bytes:  # noqa: ANN401 - a pyarrow RecordBatch
    import pyarrow.compute as pc

    if batch.num_rows == 0:
        return b""

    def quoted(column: Any) -> Any:  # noqa: ANN401
        return pc.binary_join_element_wise('"', column, '"', "")

    pieces: list[Any] = []
    for i, c in enumerate(MANIFEST_COLUMNS):
        text = _text_of(batch.column(c), strings=lambda a: _strings(a, _JSON_SPECIAL, lambda v: json.dumps(v, ensure_ascii=False), quoted),
                        floats=lambda a: _floats(a, json.dumps))
        pieces += [("{" if i == 0 else ", ") + json.dumps(c) + ": ", pc.fill_null(text, "null")]
    pieces.append("}\n")
    return _joined_bytes(pc.binary_join_element_wise(*pieces, ""))


class CsvExporter(Exporter):
    name = "csv"
    media_type = "text/csv"
    suffix = MANIFEST_FORMATS["csv"]

    @staticmethod
    def _header() -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(MANIFEST_COLUMNS)
        return buf.getvalue().encode()

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

    def stream_batches(self, batches: Iterable[Any]) -> Iterator[bytes]:
        yield self._header()
        for batch in batches:
            yield _csv_batch(batch)


class JsonlExporter(Exporter):
    name = "jsonl"
    media_type = "application/x-ndjson"
    suffix = MANIFEST_FORMATS["jsonl"]

    def stream(self, chunks: Iterable[list[Row]], *, read_image: ImageReader | None = None) -> Iterator[bytes]:
        for rows in chunks:
            yield "".join(json.dumps({c: row[c] for c in MANIFEST_COLUMNS}, ensure_ascii=False) + "\n" for row in rows).encode()

    def stream_batches(self, batches: Iterable[Any]) -> Iterator[bytes]:
        for batch in batches:
            yield _json_batch(batch)
