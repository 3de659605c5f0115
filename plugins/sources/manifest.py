"""``manifest``: a CSV or JSONL file with a ``uri`` column and an optional ``label`` column.

Relative uris are relative to the manifest's folder; ``file://`` uris, absolute paths and
object-storage uris (``s3://``, inside the data roots) are accepted, and the manifest itself
may live in object storage. A missing ``uri`` column or a malformed row is an error naming
its line. Its parts are the uris it lists (``nds datasets sync`` registers rows added since).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from nds.plugins.contract import Source, SourceError, SourceItem

HINT = "a manifest is a .csv with a header row or a .jsonl file, with a 'uri' column and an optional 'label' column"


class ManifestSource(Source):
    name = "manifest"
    description = "a CSV or JSONL file with columns uri (required) and label (optional)"
    chunked = False  # its parts are its rows: one streaming scan, not a listing of every row per chunk

    def __init__(self, location: str, env, **options: str) -> None:  # noqa: ANN001 - SourceEnv
        super().__init__(location, env, **options)
        self.file_name = PurePosixPath(location).name
        if not env.exists(location) or env.is_dir(location):
            raise SourceError(f"{location} is not a file", field="path", hint=HINT)
        suffix = PurePosixPath(location).suffix.lower()
        if suffix not in {".csv", ".jsonl", ".ndjson"}:
            raise SourceError(f"{self.file_name}: unknown manifest format '{suffix}'", field="path", hint=HINT)
        self._jsonl = suffix != ".csv"
        self._items: list[SourceItem] | None = None

    def parts(self) -> list[str]:
        return list(dict.fromkeys(item.uri for item in self._all()))

    def count_parts(self) -> int:
        """The rows, counted while streaming (every row validated), none held."""
        return sum(1 for _ in self._read())

    def _all(self) -> list[SourceItem]:
        if self._items is None:
            self._items = list(self._read())
        return self._items

    def items(self, parts: Sequence[str] | None = None) -> Iterator[SourceItem]:
        if parts is None:
            yield from self._read()
            return
        wanted = set(parts)
        yield from (item for item in self._all() if item.uri in wanted)

    def _read(self) -> Iterator[SourceItem]:
        rows = self._jsonl_rows() if self._jsonl else self._csv_rows()
        for line, row in rows:
            uri = row.get("uri")
            if not isinstance(uri, str) or not uri.strip():
                raise SourceError(f"{self.file_name} line {line}: empty or missing 'uri'", field="uri", hint=HINT)
            label = row.get("label")
            if label is not None and not isinstance(label, (str, int)):
                raise SourceError(f"{self.file_name} line {line}: 'label' must be a string", field="label", hint=HINT)
            label = str(label).strip() if label not in (None, "") else None
            yield SourceItem(self._resolve(uri.strip(), line), label, f"line {line}")

    def _resolve(self, uri: str, line: int) -> str:
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            return unquote(parsed.path)
        if parsed.scheme in ("http", "https"):
            raise SourceError(
                f"{self.file_name} line {line}: web urls cannot be registered ({parsed.scheme}://)",
                field="uri",
                hint="download the images first (e.g. with img2dataset) and register the shards or files",
            )
        if parsed.scheme and len(parsed.scheme) > 1:
            return uri  # object storage: the catalog checks it against the data roots
        if uri.startswith("/"):
            return uri
        parent = self.location.rsplit("/", 1)[0]
        return f"{parent}/{uri}"

    @contextmanager
    def _text(self) -> Iterator[io.TextIOWrapper]:
        """The manifest as text, streamed (local or object storage); decoding errors surface while reading."""
        with self.env.open(self.location) as fh:
            yield io.TextIOWrapper(fh, encoding="utf-8", newline="" if not self._jsonl else None)

    def _csv_rows(self) -> Iterator[tuple[int, dict]]:
        try:
            with self._text() as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                if header is None:
                    raise SourceError(f"{self.file_name} is empty", field="path", hint=HINT)
                header = [h.strip().lower() for h in header]
                if "uri" not in header:
                    raise SourceError(
                        f"{self.file_name} line 1: no 'uri' column (columns: {', '.join(header)})", field="uri", hint=HINT
                    )
                for row in reader:
                    line = reader.line_num
                    if not row or all(not c.strip() for c in row):
                        continue
                    if len(row) != len(header):
                        raise SourceError(
                            f"{self.file_name} line {line}: {len(row)} fields, the header has {len(header)}",
                            field="path",
                            hint=HINT,
                        )
                    yield line, dict(zip(header, row))
        except UnicodeDecodeError as exc:
            raise SourceError(f"{self.file_name} is not UTF-8 text: {exc}", field="path", hint=HINT) from exc
        except csv.Error as exc:
            raise SourceError(f"{self.file_name}: malformed CSV: {exc}", field="path", hint=HINT) from exc

    def _jsonl_rows(self) -> Iterator[tuple[int, dict]]:
        try:
            with self._text() as fh:
                for line, text in enumerate(fh, start=1):
                    if not text.strip():
                        continue
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise SourceError(f"{self.file_name} line {line}: invalid JSON: {exc.msg}", field="path", hint=HINT) from exc
                    if not isinstance(row, dict):
                        raise SourceError(f"{self.file_name} line {line}: expected a JSON object", field="path", hint=HINT)
                    yield line, row
        except UnicodeDecodeError as exc:
            raise SourceError(f"{self.file_name} is not UTF-8 text: {exc}", field="path", hint=HINT) from exc
