"""``webdataset``: tar shards as WebDataset writes them (img2dataset, LAION, DataComp), local or in object storage.

The location is a folder (every ``*.tar`` under it), a glob (``shards/*.tar``) or a brace
pattern (``shards/{00000..00999}.tar``: every shard it names must exist), on a local disk
or under an ``s3://`` prefix. Its parts are the shards.

Members are grouped into samples by key, as WebDataset does: consecutive members whose
paths agree up to the first dot of the file name (``a/000123.jpg``, ``a/000123.cls`` and
``a/000123.json`` are the sample ``a/000123``); names like ``__index__`` are left out. A
sample's image is its first member with an image suffix; its label is the text of its
``.cls`` member, or, with the option ``label_field``, a field of its ``.json`` member
(``-O label_field=meta.class`` for a nested one) or the text of the member with that
extension (``label_field=cls2``), or none. img2dataset's layout (``KEY.jpg`` with
``KEY.json`` and ``KEY.txt`` sidecars, and a ``.parquet`` beside each shard, read for
samples that lack a ``.json``) is read as is.

Each shard is read once, front to back (in object storage a few large sequential reads,
never one request per member). A sample's uri is ``SHARD#MEMBER``; it keeps its shard, the
byte offset of the member's data in it and its size, so it is read later with one ranged
read, and its ``meta`` holds ``key`` (the sample's key) and, where the sidecars give them,
``url`` and ``caption``. A truncated or corrupt shard is skipped as a whole (nothing of it
is stored) and listed with the reason; the other shards register. A sample without an
image member is yielded with its first member, so the catalog counts it as skipped.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from nds.plugins.contract import IMAGE_SUFFIXES, SkippedPart, Source, SourceError, SourceItem
from nds_client.errors import NDSError, ServiceUnavailableError

log = logging.getLogger(__name__)

HINT = "name a folder of .tar shards, a glob (shards/*.tar) or a brace pattern (shards/{00000..00099}.tar)"
SIDECARS = frozenset({"cls", "json", "txt"})
#: a member up to this size is taken from the stream; a larger one is left for the catalog's
#: ranged read (which checks NDS_MAX_FILE_BYTES first), so one huge member never sits in memory
INLINE_LIMIT = 64 << 20
_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's skip_meta: __key__, __index__ ...
_BLOCK = 512
_END = b"\0" * _BLOCK


def split_key(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member name, as WebDataset's ``base_plus_ext`` splits it
    (``a/b.seg.png`` -> ``("a/b", "seg.png")``); a name without a dot is its own key."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return "." in base and "." + base.rsplit(".", 1)[1].lower() in IMAGE_SUFFIXES


def is_tar(uri: str) -> bool:
    return uri.lower().endswith(".tar")


class _Tail:
    """A binary file read front to back, counting the bytes and keeping the last ones read,
    so the end of a tar stream can be checked (Python's tarfile stops quietly at a truncated
    or corrupt header past the first member)."""

    def __init__(self, fh: IO[bytes], keep: int = 1 << 16) -> None:
        self.fh = fh
        self.pos = 0
        self.keep = keep
        self.chunks: deque[tuple[int, bytes]] = deque()
        self.held = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        if data:
            self.chunks.append((self.pos, data))
            self.pos += len(data)
            self.held += len(data)
            while len(self.chunks) > 1 and self.held - len(self.chunks[0][1]) >= self.keep:
                self.held -= len(self.chunks.popleft()[1])
        return data

    def block(self, offset: int) -> bytes | None:
        """The (up to) 512 bytes read from ``offset`` on; None when they are no longer held."""
        if not self.chunks or offset < self.chunks[0][0]:
            return None if self.chunks else b""
        start = self.chunks[0][0]
        held = b"".join(c for _, c in self.chunks)
        return held[offset - start : offset - start + _BLOCK]


class _Broken(Exception):
    """The shard cannot be read to its end (the reason is the message)."""


@dataclass
class _Member:
    name: str
    ext: str
    offset: int
    size: int
    data: bytes | None


class WebDatasetSource(Source):
    name = "webdataset"
    description = "WebDataset tar shards (a folder, glob or brace pattern; local or s3://), img2dataset's layout included"
    options = {
        "label_field": "where the label is: a field of each sample's .json member (dotted for a nested one: meta.class) "
                       "or a member extension (cls2); default: the .cls member, else none",
    }

    def __init__(self, location: str, env, **options: str) -> None:  # noqa: ANN001 - SourceEnv
        super().__init__(location, env, **options)
        self.label_field = (options.get("label_field") or "").strip() or None
        self._shards: list[str] | None = None
        self._sidecar_meta: dict[str, dict[str, dict[str, str]]] = {}

    # ------------------------------------------------------------------ parts

    def parts(self) -> list[str]:
        if self._shards is None:
            self._shards = self._list_shards()
        return list(self._shards)

    def _list_shards(self) -> list[str]:
        return self.locate((".tar",), ".tar shards", HINT)

    # ------------------------------------------------------------------ items

    def items(self, parts: Sequence[str] | None = None) -> Iterator[SourceItem | SkippedPart]:
        wanted = set(parts) if parts is not None else None
        for shard in self.parts():
            if wanted is None or shard in wanted:
                yield from self._shard_items(shard)

    def _shard_items(self, shard: str) -> Iterator[SourceItem | SkippedPart]:
        """The samples of one shard, streamed; a SkippedPart after them if the shard is broken
        (the catalog then drops what was yielded of it)."""
        shown = shard.rsplit("/", 1)[-1]
        try:
            with self.env.open(shard) as fh:
                tail = _Tail(fh)
                try:
                    yield from self._read(shard, shown, tail)
                except _Broken as exc:
                    yield SkippedPart(shard, f"{shown}: {exc}")
                except (tarfile.TarError, EOFError) as exc:  # ReadError: truncated data, a bad first header, not a tar
                    first = tail.chunks[0][1][:2] if tail.chunks and tail.chunks[0][0] == 0 else b""
                    why = "a compressed (gzip) shard: the catalog reads members with ranged reads, write plain .tar shards" \
                        if first == b"\x1f\x8b" else f"unreadable tar ({exc or type(exc).__name__}) near byte {tail.pos:,}"
                    yield SkippedPart(shard, f"{shown}: {why}")
        except (ServiceUnavailableError, SourceError):
            raise  # the store is down or refuses the credentials, or a structural problem: the registration fails with the reason
        except NDSError as exc:  # the shard vanished or cannot be opened
            yield SkippedPart(shard, exc.message)

    def _read(self, shard: str, shown: str, tail: _Tail) -> Iterator[SourceItem]:
        stream = tarfile.open(fileobj=tail, mode="r|")  # noqa: SIM115 - a stream over the open shard, closed with it
        key: str | None = None
        group: list[_Member] = []
        has_image = False
        for info in stream:
            if not info.isreg() or _META.match(info.name):
                continue
            k, ext = split_key(info.name)
            if group and k != key:
                yield self._sample(shard, shown, key, group)
                group, has_image = [], False
            key = k
            take = ext in SIDECARS or ext == self.label_field or (not has_image and is_image(info.name))
            data = stream.extractfile(info).read() if take and info.size <= INLINE_LIMIT else None
            if data is not None and len(data) != info.size:
                raise _Broken(f"member {info.name} is cut short ({len(data)} of {info.size} bytes)")
            has_image = has_image or is_image(info.name)
            group.append(_Member(info.name, ext, info.offset_data, info.size, data))
            stream.members = []  # a stream of 10^4 members: keep none of them
        end = tail.block(stream.offset)
        if end != _END:
            what = "corrupt member header" if end is not None and len(end) == _BLOCK else "the shard is truncated (no end-of-archive block)"
            raise _Broken(f"{what} at byte {stream.offset:,}")
        if group:
            yield self._sample(shard, shown, key, group)

    def _sample(self, shard: str, shown: str, key: str | None, group: list[_Member]) -> SourceItem:
        image = next((m for m in group if is_image(m.name)), None)
        target = image or next((m for m in group if m.ext not in SIDECARS), group[0])
        texts = {m.ext: m.data for m in reversed(group) if m.data is not None and m is not target}  # the first of each wins
        record = _json(texts.get("json"))
        meta: dict[str, Any] = {"key": str(key)}
        if record is None and "json" not in texts:
            extra = self._sidecar_parquet(shard).get(str(key))
            if extra:
                meta.update(extra)
        if isinstance(record, dict):
            for field in ("url", "caption", "key"):
                value = record.get(field)
                if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
                    meta[field] = str(value)
        caption = _text(texts.get("txt"))
        if caption and "caption" not in meta:
            meta["caption"] = caption
        label = self._label(texts, record, shown, target.name)
        return SourceItem(
            uri=f"{shard}#{target.name}",
            label=label,
            origin=f"{shown}: {target.name}",
            data=target.data,
            shard=shard,
            offset=target.offset,
            size=target.size,
            meta=meta,
        )

    def _label(self, texts: dict[str, bytes | None], record: Any, shown: str, member: str) -> str | None:
        if self.label_field is None:
            return _text(texts.get("cls"))
        if isinstance(record, dict):
            value: Any = record
            for step in self.label_field.split("."):
                value = value.get(step) if isinstance(value, dict) else None
            if isinstance(value, dict | list):
                raise SourceError(f"{shown}: {member}: the JSON field {self.label_field!r} holds a {type(value).__name__}, not a label",
                                  field="label_field", hint="name a field holding a string or a number")
            if value is not None and str(value).strip():
                return str(value).strip()
        return _text(texts.get(self.label_field))

    def _sidecar_parquet(self, shard: str) -> dict[str, dict[str, str]]:
        """img2dataset's ``SHARD.parquet`` (key, url, caption of every sample of the shard), read once per shard."""
        if shard in self._sidecar_meta:
            return self._sidecar_meta[shard]
        found: dict[str, dict[str, str]] = {}
        self._sidecar_meta = {shard: found}  # only the shard being read is kept
        side = shard[: -len(".tar")] + ".parquet" if is_tar(shard) else None
        if side is None or not self.env.exists(side):
            return found
        import pyarrow.parquet as pq

        try:
            with self.env.open(side) as fh:
                pf = pq.ParquetFile(fh)
                columns = [c for c in ("key", "url", "caption") if c in pf.schema_arrow.names]
                if "key" not in columns:
                    return found
                for batch in pf.iter_batches(columns=columns):
                    for row in batch.to_pylist():
                        if row.get("key") is not None:
                            found[str(row["key"])] = {c: str(row[c]) for c in columns if c != "key" and row.get(c)}
        except ServiceUnavailableError:
            raise
        except (NDSError, OSError, ValueError) as exc:  # an unreadable sidecar: the samples keep what their members give
            log.warning("%s: cannot read img2dataset's sidecar %s: %s", shard, side, exc)
            found.clear()
        return found


def _text(data: bytes | None) -> str | None:
    if not data:
        return None
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None


def _json(data: bytes | None) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
