"""``manifest``: a CSV or JSONL file with a ``uri`` column and an optional ``label`` column.

Relative uris are relative to the manifest's folder; ``file://`` uris and absolute paths
are accepted. A missing ``uri`` column or a malformed row is an error naming its line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from nds.plugins.contract import Source, SourceError, SourceItem

HINT = "a manifest is a .csv with a header row or a .jsonl file, with a 'uri' column and an optional 'label' column"


class ManifestSource(Source):
    name = "manifest"
    description = "a CSV or JSONL file with columns uri (required) and label (optional)"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        if not path.is_file():
            raise SourceError(f"{path} is not a file", field="path", hint=HINT)
        suffix = path.suffix.lower()
        if suffix not in {".csv", ".jsonl", ".ndjson"}:
            raise SourceError(f"{path.name}: unknown manifest format '{suffix}'", field="path", hint=HINT)
        self._jsonl = suffix != ".csv"

    def items(self) -> Iterator[SourceItem]:
        rows = self._jsonl_rows() if self._jsonl else self._csv_rows()
        for line, row in rows:
            uri = row.get("uri")
            if not isinstance(uri, str) or not uri.strip():
                raise SourceError(f"{self.path.name} line {line}: empty or missing 'uri'", field="uri", hint=HINT)
            label = row.get("label")
            if label is not None and not isinstance(label, (str, int)):
                raise SourceError(f"{self.path.name} line {line}: 'label' must be a string", field="label", hint=HINT)
            label = str(label).strip() if label not in (None, "") else None
            yield SourceItem(self._resolve(uri.strip(), line), label, f"line {line}")

    def _resolve(self, uri: str, line: int) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            return Path(unquote(parsed.path))
        if parsed.scheme and len(parsed.scheme) > 1:
            raise SourceError(
                f"{self.path.name} line {line}: only local files can be registered, not '{parsed.scheme}://' uris",
                field="uri",
                hint="download the images first (e.g. with img2dataset) and list their paths",
            )
        path = Path(uri)
        return path if path.is_absolute() else self.path.parent / path

    def _csv_rows(self) -> Iterator[tuple[int, dict]]:
        try:
            with self.path.open(newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                if header is None:
                    raise SourceError(f"{self.path.name} is empty", field="path", hint=HINT)
                header = [h.strip().lower() for h in header]
                if "uri" not in header:
                    raise SourceError(
                        f"{self.path.name} line 1: no 'uri' column (columns: {', '.join(header)})", field="uri", hint=HINT
                    )
                for row in reader:
                    line = reader.line_num
                    if not row or all(not c.strip() for c in row):
                        continue
                    if len(row) != len(header):
                        raise SourceError(
                            f"{self.path.name} line {line}: {len(row)} fields, the header has {len(header)}",
                            field="path",
                            hint=HINT,
                        )
                    yield line, dict(zip(header, row))
        except UnicodeDecodeError as exc:
            raise SourceError(f"{self.path.name} is not UTF-8 text: {exc}", field="path", hint=HINT) from exc
        except csv.Error as exc:
            raise SourceError(f"{self.path.name}: malformed CSV: {exc}", field="path", hint=HINT) from exc

    def _jsonl_rows(self) -> Iterator[tuple[int, dict]]:
        try:
            with self.path.open(encoding="utf-8") as fh:
                for line, text in enumerate(fh, start=1):
                    if not text.strip():
                        continue
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise SourceError(f"{self.path.name} line {line}: invalid JSON: {exc.msg}", field="path", hint=HINT) from exc
                    if not isinstance(row, dict):
                        raise SourceError(f"{self.path.name} line {line}: expected a JSON object", field="path", hint=HINT)
                    yield line, row
        except UnicodeDecodeError as exc:
            raise SourceError(f"{self.path.name} is not UTF-8 text: {exc}", field="path", hint=HINT) from exc
