"""``parquet``: Parquet files with images, as the Hugging Face Hub stores datasets, local or in object storage.

The location is a Parquet file, a folder (every ``*.parquet`` under it), a glob or a brace
pattern, on a local disk or under an ``s3://`` prefix; or a dataset written by
``datasets.save_to_disk`` (a folder with ``state.json`` and ``data-*.arrow`` files, or a
``DatasetDict``'s folder with ``dataset_dict.json``: option ``split``, default ``train``). Its
parts are the files.

The image column (option ``image_column``; by default the column the schema's Hugging Face
metadata types ``Image``, else one named image/img/jpg/jpeg/png/webp, else the first column of
bytes or ``{bytes, path}`` structs) holds the bytes; a column of paths or uris instead
(option ``path_column``, or a string column named path, image_path, file_name ...) makes each
row a plain file sample, a relative path being relative to the Parquet file's folder. The
label column (option ``label_column``, default ``label``) holds strings, or integers named by
the ``ClassLabel`` in the schema's ``huggingface`` metadata (``-1``: no label). Columns
``url``, ``caption`` (or ``text``) and ``key`` are kept as the sample's metadata.

A row's uri is ``FILE#row=N&column=COL`` (:func:`parquet_row_uri`); it keeps the file as its
shard and the row's number in the file as its offset, so it is read later by row group.
Files are read a row group (an Arrow record batch) at a time, never whole. A file without
an image column is an error naming the file and its columns, before anything is stored; a
file with an unreadable row group is skipped as a whole and listed with the row group.

``hf://datasets/ORG/NAME`` (or ``hf://ORG/NAME``; options ``split`` and ``revision``) reads a
Hub dataset through the ``datasets`` library, streamed (this needs the network and an
``hf://`` prefix in ``NDS_DATA_ROOTS``; it is not exercised by the tests). Its samples keep
their bytes at registration (addresses ``hf://ORG/NAME/SPLIT#row=N&column=COL``); reading them
again later (exports that write images, ``ManifestDataset``) needs the files: download the
dataset's Parquet files and register those instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from nds.plugins.contract import SkippedPart, Source, SourceError, SourceItem, image_value_bytes, parquet_row_uri
from nds_client.errors import NDSError, ServiceUnavailableError
from nds_client.storage import is_remote, join, translated

HINT = "a Parquet file, a folder of them, a glob, or a datasets.save_to_disk folder, with a column of image bytes (or paths)"
SUFFIXES = (".parquet", ".pq")
IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
PATH_NAMES = ("path", "image_path", "img_path", "file_path", "filepath", "file_name", "filename", "file", "image_file", "uri")
URL_NAMES = ("url", "image_url")


@dataclass(frozen=True)
class Columns:
    """Which columns of a file hold what."""

    image: str | None           # bytes or {bytes, path} structs
    path: str | None            # paths or uris (a plain file per row)
    label: str | None
    names: tuple[str, ...] | None  # ClassLabel names of the label column
    meta: tuple[tuple[str, str], ...]  # (meta key, column)

    @property
    def needed(self) -> list[str]:
        cols = [self.image, self.path, self.label, *(c for _, c in self.meta)]
        return list(dict.fromkeys(c for c in cols if c))


def hf_features(metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    """The ``features`` of a schema's Hugging Face metadata (``{}`` when there are none)."""
    raw = (metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    features = (info.get("info") or {}).get("features") if isinstance(info, dict) else None
    return features if isinstance(features, dict) else {}


def _is_bytes_type(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    if pa.types.is_struct(t):
        for i in range(t.num_fields):
            f = t.field(i)
            if f.name == "bytes" and (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)):
                return True
    return False


def _is_string_type(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


class ParquetSource(Source):
    name = "parquet"
    description = "Parquet files with an image column (Hugging Face layout), a save_to_disk folder, or hf://ORG/NAME"
    options = {
        "image_column": "the column of image bytes or {bytes, path} structs (default: the Image feature, else image/img/..., "
                        "else the first bytes column)",
        "label_column": "the label column: strings, or integers with ClassLabel names (default: label, if there is one)",
        "path_column": "a column of image paths or uris, relative to the Parquet file's folder (used for rows without bytes)",
        "split": "hf:// and DatasetDict folders: the split to read (default: train)",
        "revision": "hf:// only: the Hub revision (branch, tag or commit)",
    }

    def __init__(self, location: str, env, **options: str) -> None:  # noqa: ANN001 - SourceEnv
        super().__init__(location, env, **options)
        self.image_column = (options.get("image_column") or "").strip() or None
        self.label_column = (options.get("label_column") or "").strip() or None
        self.path_column = (options.get("path_column") or "").strip() or None
        self.split = (options.get("split") or "").strip() or None
        self.revision = (options.get("revision") or "").strip() or None
        self.hub = location.startswith("hf://")
        if self.revision and not self.hub:
            raise SourceError("the option revision is for hf:// datasets only", field="options")
        self._files: list[str] | None = None
        self._info_features: dict[str, Any] = {}  # save_to_disk: dataset_info.json's features

    # ------------------------------------------------------------------ parts

    def parts(self) -> list[str]:
        if self._files is None:
            if self.hub:
                self._files = [f"{self.location.rstrip('/')}/{self.split or 'train'}"]
            else:
                files = self._list_files()
                self._columns(files[0], self._schema(files[0]))  # a first file without an image column: an error now
                self._files = files
        return list(self._files)

    def _list_files(self) -> list[str]:
        return self.locate((*SUFFIXES, ".arrow"), "Parquet files", HINT, folder=self._folder_files)

    def _folder_files(self, folder: str) -> list[str]:
        dict_file = join(folder, "dataset_dict.json")
        if self.env.exists(dict_file):  # a DatasetDict: one save_to_disk folder per split
            splits = self._json_file(dict_file).get("splits") or []
            split = self.split or ("train" if "train" in splits else (splits[0] if splits else None))
            if split is None or split not in splits:
                raise SourceError(f"{dict_file}: no split {split!r} (splits: {', '.join(map(str, splits)) or 'none'})",
                                  field="split", hint="-O split=NAME")
            folder = join(folder, split)
        state_file = join(folder, "state.json")
        if self.env.exists(state_file):  # datasets.save_to_disk
            state = self._json_file(state_file)
            entries = state.get("_data_files")
            if not isinstance(entries, list) or not entries:
                raise SourceError(f"{state_file}: _data_files: missing or empty", field="path", hint=HINT)
            files = []
            for i, entry in enumerate(entries):
                name = entry.get("filename") if isinstance(entry, dict) else None
                if not isinstance(name, str) or not name or "/" in name:
                    raise SourceError(f"{state_file}: _data_files[{i}].filename: missing or not a file name", field="path", hint=HINT)
                files.append(self.env.check(join(folder, name)))
            info_file = join(folder, "dataset_info.json")
            if self.env.exists(info_file):
                features = self._json_file(info_file).get("features")
                self._info_features = features if isinstance(features, dict) else {}
            return files
        if self.split:
            raise SourceError(f"{folder} is not a DatasetDict folder (no dataset_dict.json): the option split does not apply",
                              field="split")
        found = [u for u in self.env.list_files(folder) if u.lower().endswith(SUFFIXES)]
        if not found:
            raise SourceError(f"{folder} holds no .parquet files", field="path", hint=HINT)
        return found

    def _json_file(self, uri: str) -> dict[str, Any]:
        try:
            value = json.loads(self.env.read_bytes(uri))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{uri}: invalid JSON: {exc}", field="path") from exc
        if not isinstance(value, dict):
            raise SourceError(f"{uri}: expected a JSON object", field="path")
        return value

    # ------------------------------------------------------------------ schema

    def _schema(self, file: str) -> Any:
        """The Arrow schema of a Parquet or Arrow file (its footer or stream header only)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        shown = PurePosixPath(file).name
        try:
            with self.env.open(file) as fh, translated(file):
                if file.lower().endswith(".arrow"):
                    return _arrow_reader(fh, pa).schema
                return pq.ParquetFile(fh).schema_arrow
        except ServiceUnavailableError:
            raise
        except NDSError as exc:
            raise SourceError(f"{shown}: not a readable {'Arrow' if file.lower().endswith('.arrow') else 'Parquet'} file ({exc.message})",
                              field="path", hint=HINT) from exc

    def _columns(self, file: str, schema: Any) -> Columns:
        """The columns of ``file`` (its ``schema``), by the options or the defaults; SourceError without an image column."""
        shown = PurePosixPath(file).name
        names = list(schema.names)
        types = {f.name: f.type for f in schema}
        lower = {n.lower(): n for n in reversed(names)}
        features = hf_features(schema.metadata) or self._info_features
        listed = ", ".join(names) or "none"

        def named(option: str, value: str) -> str:
            if value not in types:
                raise SourceError(f"{shown}: no column {value!r} (option {option}; columns: {listed})", field=option, hint=HINT)
            return value

        image = path = None
        if self.image_column:
            image = named("image_column", self.image_column)
            if _is_string_type(types[image]):
                image, path = None, image
            elif not _is_bytes_type(types[image]):
                raise SourceError(f"{shown}: column {image!r} holds {types[image]}, not image bytes (columns: {listed})",
                                  field="image_column", hint="name a column of bytes, {bytes, path} structs or paths")
        else:
            typed = [n for n in names if isinstance(features.get(n), dict) and features[n].get("_type") == "Image"]
            by_name = [lower[n] for n in IMAGE_NAMES if n in lower and _is_bytes_type(types[lower[n]])]
            by_type = [n for n in names if _is_bytes_type(types[n])]
            image = next(iter(typed + by_name + by_type), None)
        if self.path_column:
            path = named("path_column", self.path_column)
            if not _is_string_type(types[path]):
                raise SourceError(f"{shown}: column {path!r} holds {types[path]}, not paths", field="path_column")
        elif image is None and path is None:
            path = next((lower[n] for n in PATH_NAMES if n in lower and _is_string_type(types[lower[n]])), None)
        if image is None and path is None:
            urls = [lower[n] for n in URL_NAMES if n in lower]
            if urls:
                raise SourceError(f"{shown}: column {urls[0]!r} holds web urls, no images (columns: {listed})", field="image_column",
                                  hint="download the images first (img2dataset) and register its shards, or -O path_column=NAME")
            raise SourceError(f"{shown}: no image column (columns: {listed})", field="image_column",
                              hint="-O image_column=NAME (bytes or {bytes, path} structs) or -O path_column=NAME (paths)")
        label = None
        if self.label_column:
            label = named("label_column", self.label_column)
        elif "label" in lower:
            label = lower["label"]
        class_names = None
        feature = features.get(label) if label else None
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
            class_names = tuple(str(n) for n in feature["names"])
        meta = []
        for key, candidates in (("url", URL_NAMES), ("caption", ("caption", "text")), ("key", ("key",))):
            col = next((lower[n] for n in candidates if n in lower and lower[n] not in (image, path, label)), None)
            if col is not None:
                meta.append((key, col))
        return Columns(image, path, label, class_names, tuple(meta))

    # ------------------------------------------------------------------ items

    def items(self, parts: Sequence[str] | None = None) -> Iterator[SourceItem | SkippedPart]:
        if self.hub:
            yield from self._hub_items()
            return
        wanted = set(parts) if parts is not None else None
        for file in self.parts():
            if wanted is None or file in wanted:
                yield from self._file_items(file)

    def _file_items(self, file: str) -> Iterator[SourceItem | SkippedPart]:
        shown = PurePosixPath(file).name
        groups = self._groups(file)
        first = next(groups)
        if isinstance(first, SkippedPart):
            yield first
            return
        columns: Columns = first
        if columns.image is None:  # paths only: every row group checked before any row is yielded (each row is a file of its own)
            checked = self._groups(file, check_only=True)
            next(checked)
            bad = next((g for g in checked if isinstance(g, SkippedPart)), None)
            checked.close()
            if bad is not None:
                groups.close()
                yield bad
                return
        row = 0
        for group in groups:
            if isinstance(group, SkippedPart):
                yield group
                return
            for values in zip(*(group[c] for c in columns.needed), strict=True):
                yield self._row_item(file, shown, row, dict(zip(columns.needed, values, strict=True)), columns)
                row += 1

    def _groups(self, file: str, *, check_only: bool = False) -> Iterator[Columns | dict[str, list[Any]] | SkippedPart]:
        """The file's :class:`Columns` (from its schema), then the needed columns of each row group
        (record batch) as lists; a SkippedPart in place of the first that cannot be read (and nothing after it)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        shown = PurePosixPath(file).name
        arrow = file.lower().endswith(".arrow")
        unit = "record batch" if arrow else "row group"
        try:
            with self.env.open(file) as fh:
                try:
                    with translated(file):
                        if arrow:
                            reader = _arrow_reader(fh, pa)
                            schema = reader.schema
                            total = getattr(reader, "num_record_batches", None)
                            batches = (reader.get_batch(i) for i in range(total)) if total is not None else iter(reader)
                        else:
                            pf = pq.ParquetFile(fh)
                            schema, total = pf.schema_arrow, pf.num_row_groups
                except ServiceUnavailableError:
                    raise
                except NDSError as exc:
                    yield SkippedPart(file, f"{shown}: not a readable {'Arrow' if arrow else 'Parquet'} file "
                                            f"({exc.message.removeprefix(file + ': ')})")
                    return
                columns = self._columns(file, schema)
                yield columns
                if not arrow:
                    batches = (pf.read_row_group(g, columns=columns.needed) for g in range(total))
                group = rows = 0
                while True:
                    try:
                        with translated(file):
                            batch = next(batches, None)
                            if batch is None:
                                return
                            lists = {} if check_only else {c: batch.column(c).to_pylist() for c in columns.needed}
                    except (ServiceUnavailableError, SourceError):
                        raise
                    except NDSError as exc:
                        of = f" of {total}" if total is not None else ""
                        yield SkippedPart(file, f"{shown}: {unit} {group}{of} (rows from {rows:,}) is unreadable: "
                                                f"{exc.message.removeprefix(file + ': ')}")
                        return
                    if not check_only:
                        yield lists
                    group, rows = group + 1, rows + batch.num_rows
        except (ServiceUnavailableError, SourceError):
            raise
        except NDSError as exc:  # the file vanished or cannot be opened
            yield SkippedPart(file, exc.message)

    def _row_item(self, file: str, shown: str, row: int, cells: dict[str, Any], columns: Columns) -> SourceItem:
        label = self._label(cells.get(columns.label) if columns.label else None, columns)
        meta = {k: str(cells[c]) for k, c in columns.meta if cells.get(c) not in (None, "")} or None
        origin = f"{shown} row {row}"
        if columns.image is not None:
            cell = cells[columns.image]
            data = image_value_bytes(cell)
            if data is not None:
                return SourceItem(parquet_row_uri(file, row, columns.image), label, origin, data=data, shard=file, offset=row,
                                  size=len(data), meta=meta)
            ref = cells.get(columns.path) if columns.path else (cell.get("path") if isinstance(cell, dict) else None)
        else:
            ref = cells[columns.path]
        if not isinstance(ref, str) or not ref.strip():  # no bytes, no path: the catalog counts it skipped
            return SourceItem(parquet_row_uri(file, row, columns.image or columns.path or "image"), label, origin, data=b"",
                              shard=file, offset=row, size=0, meta=meta)
        return SourceItem(self._resolve(file, shown, row, ref.strip()), label, origin, meta=meta)

    def _resolve(self, file: str, shown: str, row: int, ref: str) -> str:
        parsed = urlparse(ref)
        if parsed.scheme == "file":
            return unquote(parsed.path)
        if parsed.scheme in ("http", "https"):
            raise SourceError(f"{shown} row {row}: web urls cannot be registered ({parsed.scheme}://)", field="path_column",
                              hint="download the images first (e.g. with img2dataset) and register the shards or files")
        if is_remote(ref) or ref.startswith("/"):
            return ref
        return f"{file.rsplit('/', 1)[0]}/{ref}"

    @staticmethod
    def _label(value: Any, columns: Columns) -> str | None:
        if value is None or isinstance(value, bool | dict | list):
            return None
        if isinstance(value, int):
            if value < 0:
                return None  # ClassLabel's "no label"
            if columns.names is not None and value < len(columns.names):
                return columns.names[value]
            return str(value)
        text = str(value).strip()
        return text or None

    # ------------------------------------------------------------------ the Hub

    def _hub_items(self) -> Iterator[SourceItem]:
        """A Hub dataset streamed through ``datasets`` (needs the network; not exercised by the tests)."""
        try:
            import datasets
        except ImportError as exc:
            raise SourceError("hf:// sources need the datasets library", field="path", hint="pip install datasets") from exc
        repo = self.location.removeprefix("hf://").removeprefix("datasets/").strip("/")
        split = self.split or "train"
        try:
            ds = datasets.load_dataset(repo, split=split, revision=self.revision, streaming=True)
            features = ds.features or {}
        except Exception as exc:  # noqa: BLE001 - the datasets library raises many kinds; all say the dataset cannot be read
            raise SourceError(f"{self.location}: cannot read the Hub dataset {repo} (split {split}): {exc}", field="path",
                              hint="check the name, split and revision, and that the Hub can be reached") from exc
        image = self.image_column or next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
        if image is None or image not in features:
            raise SourceError(f"{self.location}: no image column (columns: {', '.join(features) or 'none'})", field="image_column",
                              hint="-O image_column=NAME")
        ds = ds.cast_column(image, datasets.Image(decode=False))
        label = self.label_column or ("label" if "label" in features else None)
        feature = features.get(label) if label else None
        names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        meta_cols = tuple((k, c) for k, c in (("url", "url"), ("caption", "caption"), ("key", "key")) if c in features)
        columns = Columns(image, None, label, names, meta_cols)
        base = self.parts()[0]
        for row, cells in enumerate(ds):
            data = image_value_bytes(cells.get(image))
            meta = {k: str(cells[c]) for k, c in meta_cols if cells.get(c) not in (None, "")} or None
            yield SourceItem(parquet_row_uri(base, row, image), self._label(cells.get(label) if label else None, columns),
                             f"{repo} row {row}", data=data or b"", meta=meta)


def _arrow_reader(fh: Any, pa: Any) -> Any:
    """An Arrow IPC reader: the stream format (what ``save_to_disk`` writes) or the file format."""
    head = fh.read(6)
    fh.seek(0)
    return pa.ipc.open_file(fh) if head == b"ARROW1" else pa.ipc.open_stream(fh)
