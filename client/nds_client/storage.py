"""One I/O layer for every address the platform reads: local paths, ``file://`` and object storage.

Local paths (and ``file://`` uris) are read with the operating system directly; every
other scheme (``s3://``, and whatever else an installed fsspec implementation serves) goes
through fsspec, installed with the ``remote`` extra (``pip install 'nds-client[remote]'``,
fsspec and s3fs). For S3 the endpoint comes from ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) as boto3 reads it, region and credentials from the standard AWS
variables and files; nothing here stores them.

A sample is read from its :class:`Location`:

* a whole file (``shard`` is None): ``uri`` is the image;
* a tar member (``shard`` a tar file): ``offset``/``size`` are the byte range of the
  member's data inside the shard, read with one ranged read, the shard never scanned;
* a Parquet (or Arrow) row (``shard`` a ``.parquet``/``.arrow`` file): ``offset`` is the
  row's number in the file; the image column is named in the uri's fragment
  (``FILE#row=12&column=image``); rows are read by row group, the last groups cached.

The server's data roots are not this module's business: the catalog checks a uri before
it asks for it (``nds.catalog.paths``).
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlparse

from nds_client.errors import InvalidInputError, NDSError, StorageError, StorageMissing, StorageTooLarge, StorageUnavailable

__all__ = [
    "Location", "StorageError", "StorageMissing", "StorageTooLarge", "StorageUnavailable", "is_remote", "local_path", "join", "normalize", "filesystem",
    "open_input", "read_bytes", "read_range", "read_location", "exists", "is_dir", "size", "list_files", "expand",
    "shard_kind", "parquet_row_uri", "SEQUENTIAL_BLOCK",
]

SEQUENTIAL_BLOCK = 16 << 20  # an object-storage file read front to back is fetched in ranges of this size
REMOTE_HINT = "install the remote extra: pip install 'nds-client[remote]' (fsspec and s3fs)"


@dataclass(frozen=True)
class Location:
    """Where one sample's image bytes are (see the module docstring)."""

    uri: str
    shard: str | None = None
    offset: int | None = None
    size: int | None = None


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names object storage (any scheme but ``file``; a Windows drive letter is local)."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return len(scheme) > 1 and scheme != "file"


def local_path(uri: str | os.PathLike[str]) -> Path:
    text = os.fspath(uri)
    if text.startswith("file://"):
        return Path(unquote(urlparse(text).path))
    return Path(text)


def normalize(uri: str) -> str:
    """``file://`` uris as plain paths, object-storage uris without a trailing slash."""
    if uri.startswith("file://"):
        return str(local_path(uri))
    return uri.rstrip("/") if is_remote(uri) and not uri.endswith("://") else uri


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def _storage_options(protocol: str) -> dict[str, Any]:
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # no listings cache: a long-running server must see the objects added and removed since it last listed
        options: dict[str, Any] = {"use_listings_cache": False}
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options
    return {}


def filesystem(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem serving an object-storage ``uri`` and the path inside it."""
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - the server always has it
        raise StorageError(f"{uri}: reading object storage needs fsspec", hint=REMOTE_HINT) from exc
    protocol = uri.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(uri, **_storage_options(protocol))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{uri}: no filesystem for '{protocol}://' ({exc})", hint=REMOTE_HINT) from exc
    return fs, path


#: transport failures (botocore, aiohttp, fsspec; matched by class name, so none of them is imported here)
_TRANSPORT_ERRORS = frozenset({
    "HTTPClientError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError", "ClientConnectionError", "ClientConnectorError",
    "ServerDisconnectedError", "ClientPayloadError", "ClientOSError", "ServerTimeoutError", "FSTimeoutError", "IncompleteRead",
})
#: S3 error codes: the credentials themselves refused, the store overloaded or failing
_CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "AuthorizationHeaderMalformed", "InvalidSecurity", "RequestTimeTooSkewed", "NotSignedUp", "AccountProblem",
})
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "403"})
_FAILING_CODES = frozenset({"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout", "500", "502", "503", "504"})
_CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and what they may read"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (s3fs raises an OSError from botocore's ClientError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError among ``exc``'s causes."""
    for e in _causes(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            if code:
                return str(code)
    return None


def _transport_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a connection that failed: refused, reset, timed out, cut off."""
    for e in _causes(exc):
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if any(cls.__name__ in _TRANSPORT_ERRORS for cls in type(e).__mro__):
            return True
    return False


def _translate(uri: str, exc: BaseException) -> NDSError:
    """An exception of a filesystem as the project's error, saying which kind of problem it is:
    a missing file, the store not answering (connection refused, reset or timed out), the
    credentials refused, access denied, or the store failing (5xx, throttled)."""
    if isinstance(exc, NDSError):
        return exc
    name = type(exc).__name__
    text = str(exc)
    code = _error_code(exc)
    if isinstance(exc, FileNotFoundError) and code not in _DENIED_CODES:
        return StorageMissing(f"{uri} does not exist", hint="check the path")
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return StorageUnavailable(f"{uri}: no credentials for the object store ({text})", hint=_CREDENTIALS_HINT)
    if code in _CREDENTIAL_CODES:
        return StorageUnavailable(f"{uri}: the object store refused the credentials ({code}: {text})", hint=_CREDENTIALS_HINT)
    if code in _DENIED_CODES or isinstance(exc, PermissionError):
        shown = f" {code}" if code and code != "403" else ""
        return StorageUnavailable(f"{uri}: the object store refused access (HTTP 403{shown}: {text}); "
                                  "the credentials are refused or may not read it", hint=_CREDENTIALS_HINT)
    if code in _FAILING_CODES:
        return StorageUnavailable(f"{uri}: the object store is failing or overloaded ({code}: {text})",
                                  hint="retry later; check the object store's health")
    if _transport_failure(exc):
        return StorageUnavailable(f"{uri}: the object store does not answer ({name}: {text})",
                                  hint="check AWS_ENDPOINT_URL and that the store is up, then retry")
    if isinstance(exc, OSError):
        return StorageError(f"{uri}: {exc.strerror or text}")
    return StorageError(f"{uri}: {name}: {text}")


@contextmanager
def translated(uri: str) -> Iterator[None]:
    """Run a block of storage calls; what they raise comes out as a :class:`StorageError`."""
    try:
        yield
    except NDSError:
        raise
    except Exception as exc:  # noqa: BLE001 - filesystems raise many types; all become one
        raise _translate(uri, exc) from exc


@contextmanager
def open_input(uri: str, *, sequential: bool = True) -> Iterator[IO[bytes]]:
    """A binary file to read ``uri``; object storage read front to back in :data:`SEQUENTIAL_BLOCK` ranges
    (``sequential``), so a shard costs a few large requests, never one per member."""
    if not is_remote(uri):
        with translated(uri), open(local_path(uri), "rb") as fh:
            yield fh
        return
    fs, path = filesystem(uri)
    with translated(uri):
        kwargs = {"block_size": SEQUENTIAL_BLOCK, "cache_type": "readahead"} if sequential else {}
        fh = fs.open(path, "rb", **kwargs)
    try:
        with translated(uri):
            yield fh
    finally:
        fh.close()


def read_bytes(uri: str, *, limit: int | None = None) -> bytes:
    """The whole of ``uri``; StorageError when it is larger than ``limit`` bytes (checked before reading)."""
    if limit is not None:
        found = size(uri)
        if found > limit:
            raise StorageTooLarge(uri, found, limit)
    if not is_remote(uri):
        with translated(uri):
            return local_path(uri).read_bytes()
    fs, path = filesystem(uri)
    with translated(uri):
        return fs.cat_file(path)


def read_range(uri: str, offset: int, length: int) -> bytes:
    """``length`` bytes of ``uri`` from ``offset``: one ``pread`` or one ranged GET."""
    if offset < 0 or length < 0:
        raise InvalidInputError(f"{uri}: a negative offset or size ({offset}, {length})", field="offset")
    if not is_remote(uri):
        with translated(uri), open(local_path(uri), "rb") as fh:
            data = os.pread(fh.fileno(), length, offset)
    else:
        fs, path = filesystem(uri)
        with translated(uri):
            data = fs.cat_file(path, start=offset, end=offset + length)
    if len(data) != length:
        raise StorageError(f"{uri}: {len(data)} bytes at offset {offset}, expected {length} (the file changed or is truncated)")
    return data


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return local_path(uri).exists()
    fs, path = filesystem(uri)
    with translated(uri):
        return bool(fs.exists(path))


def is_dir(uri: str) -> bool:
    if not is_remote(uri):
        return local_path(uri).is_dir()
    fs, path = filesystem(uri)
    with translated(uri):
        return bool(fs.isdir(path))


def size(uri: str) -> int:
    if not is_remote(uri):
        with translated(uri):
            return local_path(uri).stat().st_size
    fs, path = filesystem(uri)
    with translated(uri):
        return int(fs.size(path))


def _remote_uri(uri: str, path: str) -> str:
    return f"{uri.split('://', 1)[0]}://{path.lstrip('/')}"


def list_files(uri: str) -> list[str]:
    """Every file under the folder ``uri``, recursively, sorted; hidden names (``.x``) left out."""
    if not is_remote(uri):
        root = local_path(uri)
        found: list[str] = []
        def unreadable(exc: OSError) -> None:
            raise exc

        with translated(uri):
            for folder, dirs, files in os.walk(root, onerror=unreadable):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(os.path.join(folder, f) for f in files if not f.startswith("."))
        return sorted(found)
    fs, path = filesystem(uri)
    with translated(uri):
        listed = fs.find(path)
    base = path.rstrip("/") + "/"
    keep = [p for p in listed if not any(part.startswith(".") for part in p[len(base):].split("/"))]
    return sorted(_remote_uri(uri, p) for p in keep)


def expand(pattern: str) -> list[str]:
    """The files a pattern names, sorted: brace ranges and lists (``shards/{000..099}.tar``,
    expanded as WebDataset does, with braceexpand), then glob wildcards (``*``, ``?``, ``[]``).
    A brace pattern names its files exactly (a missing one is an error naming it); a glob
    matches what is there."""
    from braceexpand import braceexpand

    names = list(braceexpand(pattern)) if "{" in pattern else [pattern]
    out: list[str] = []
    for name in names:
        if any(c in name for c in "*?["):
            if is_remote(name):
                fs, path = filesystem(name)
                with translated(name):
                    out.extend(_remote_uri(name, p) for p in fs.glob(path) if not fs.isdir(p))
            else:
                import glob

                out.extend(p for p in glob.glob(str(local_path(name)), recursive=True) if os.path.isfile(p))
        else:
            if not exists(name):
                raise StorageMissing(f"{name} does not exist (named by the pattern {pattern})", hint="check the pattern's range")
            out.append(normalize(name))
    return sorted(dict.fromkeys(out))


# --------------------------------------------------------------------------- samples


def shard_kind(shard: str) -> str:
    """``parquet``, ``arrow`` or ``tar``, from the container's name."""
    name = shard.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "tar"


def parquet_row_uri(file: str, row: int, column: str) -> str:
    """The address of row ``row``'s image in column ``column`` of a Parquet or Arrow file."""
    return f"{file}#row={row}&column={column}"


def _column_of(uri: str) -> str | None:
    if "#" not in uri:
        return None
    query = parse_qs(uri.rsplit("#", 1)[1])
    return query.get("column", [None])[0]


def read_location(location: Location) -> bytes:
    """The image bytes of one sample (see the module docstring)."""
    if location.shard is None:
        return read_bytes(location.uri)
    if location.offset is None:
        raise StorageError(f"{location.uri}: a sample inside {location.shard} without an offset")
    kind = shard_kind(location.shard)
    if kind == "tar":
        if location.size is None:
            raise StorageError(f"{location.uri}: a tar member without a size")
        return read_range(location.shard, location.offset, location.size)
    column = _column_of(location.uri) or "image"
    return _ROWS.read(location.shard, kind, location.offset, column)


def image_value_bytes(value: Any) -> bytes | None:
    """The bytes of a Parquet image cell: raw bytes, or a ``{bytes, path}`` struct as Hugging Face stores it."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, bytes | bytearray | memoryview):
            return bytes(data)
    return None


class _RowGroups:
    """Rows of Parquet and Arrow files read a row group (record batch) at a time; the last few groups kept."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._groups: OrderedDict[tuple[str, str, int], list[Any]] = OrderedDict()
        self._bounds: dict[str, list[int]] = {}

    def _layout(self, file: str, kind: str) -> list[int]:
        """The first row of each group, and the total at the end."""
        found = self._bounds.get(file)
        if found is not None:
            return found
        starts = [0]
        if kind == "parquet":
            import pyarrow.parquet as pq

            with open_input(file, sequential=False) as fh, translated(file):
                meta = pq.ParquetFile(fh).metadata
                for g in range(meta.num_row_groups):
                    starts.append(starts[-1] + meta.row_group(g).num_rows)
        else:
            for batch in self._arrow_batches(file):
                starts.append(starts[-1] + batch.num_rows)
        self._bounds[file] = starts
        return starts

    @staticmethod
    def _arrow_batches(file: str) -> Iterator[Any]:
        import pyarrow as pa

        data = read_bytes(file)
        with translated(file):
            reader = pa.ipc.open_stream(io.BytesIO(data)) if not data.startswith(b"ARROW1") else pa.ipc.open_file(io.BytesIO(data))
            if hasattr(reader, "num_record_batches"):
                yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                yield from reader

    def read(self, file: str, kind: str, row: int, column: str) -> bytes:
        import bisect

        with self._lock:
            starts = self._layout(file, kind)
        if not 0 <= row < starts[-1]:
            raise StorageError(f"{file}: no row {row} (the file has {starts[-1]})")
        group = bisect.bisect_right(starts, row) - 1
        key = (file, column, group)
        with self._lock:
            values = self._groups.get(key)
            if values is not None:
                self._groups.move_to_end(key)
        if values is None:
            values = self._load(file, kind, group, column)
            with self._lock:
                self._groups[key] = values
                while len(self._groups) > self.keep:
                    self._groups.popitem(last=False)
        data = image_value_bytes(values[row - starts[group]])
        if data is None:
            raise StorageError(f"{file} row {row}: column {column!r} holds no image bytes")
        return data

    def _load(self, file: str, kind: str, group: int, column: str) -> list[Any]:
        if kind == "parquet":
            import pyarrow.parquet as pq

            with open_input(file, sequential=False) as fh, translated(file):
                table = pq.ParquetFile(fh).read_row_group(group, columns=[column])
            return table.column(column).to_pylist()
        for i, batch in enumerate(self._arrow_batches(file)):
            if i == group:
                with translated(file):
                    return batch.column(column).to_pylist()
        raise StorageError(f"{file}: no record batch {group}")


_ROWS = _RowGroups()
