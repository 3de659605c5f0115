"""``webdataset``: the selected images themselves, as a tar in the WebDataset layout, streamed.

For each manifest row two members, sorted by name as WebDataset's ``TarWriter`` writes them::

    KEY.json   {"key", "dataset", "label", "cluster", "weight", "count", "uri"} (and "meta" when the sample has some)
    KEY.png    the image bytes as stored (the suffix of the source file or tar member, else sniffed from the bytes)

Each selected sample appears once, with its ``count`` (how many times it was drawn) in the
JSON. ``KEY`` is the manifest key ``dataset/123`` made tar- and WebDataset-safe
(``dataset-123``): WebDataset splits a member name at its first dot, so a key holds no dot
or slash; a dataset name with other characters is rewritten and given a hash of the
original, so two datasets never share a key. Written with :mod:`tarfile` in stream mode
(USTAR, the format ``TarWriter`` uses; read by ``webdataset.WebDataset``), member by member
into a buffer emptied after each sample: a selection of any size streams with the memory
of one image. The members' times are fixed, so the same query gives the same bytes.

One request gives one tar of the rows asked for (``offset``/``limit``);
``nds-client query --format webdataset --shard-size N`` asks shard by shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator

from nds.plugins.contract import Exporter, ImageReader, PluginError, Row
from nds.plugins.exporters.parquet import _Drain  # a sink emptied after each sample
from nds_client.manifests import MANIFEST_FORMATS, image_suffix  # the built-in formats: the client knows them by name

#: the members' modification time (2000-01-01): a fixed time keeps the export reproducible
MTIME = 946684800
_SAFE = re.compile(r"[A-Za-z0-9_-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _safe_name(name: str) -> str:
    """A dataset name as WebDataset keys may hold it: unchanged when it is made of letters, digits,
    ``_`` and ``-`` (and not long), else rewritten with ``~`` and a hash of the original (a ``~``
    never appears in an unchanged name, so rewritten and unchanged names never meet)."""
    if _SAFE.fullmatch(name) and len(name) <= 64:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:10]
    return f"{_UNSAFE.sub('_', name)[:48].strip('_') or 'dataset'}~{digest}"


def sample_key(key: str) -> str:
    """The member key of a manifest key: ``dataset/123`` -> ``dataset-123``."""
    dataset, _, sample = str(key).rpartition("/")
    if not dataset:
        dataset, sample = sample, ""
    sample = sample if _SAFE.fullmatch(sample) else _safe_name(sample)
    return f"{_safe_name(dataset)}-{sample}" if sample else _safe_name(dataset)


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME
    info.mode = 0o444
    return info, io.BytesIO(data)


class WebDatasetExporter(Exporter):
    name = "webdataset"
    media_type = "application/x-tar"
    suffix = MANIFEST_FORMATS["webdataset"]
    needs_images = True

    def stream(self, chunks: Iterable[list[Row]], *, read_image: ImageReader | None = None) -> Iterator[bytes]:
        if read_image is None:
            raise PluginError("the webdataset exporter writes the images: it needs read_image")
        return self._tar(chunks, read_image)

    @staticmethod
    def _tar(chunks: Iterable[list[Row]], read_image: ImageReader) -> Iterator[bytes]:
        sink = _Drain()
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for rows in chunks:
                for row in rows:
                    data = read_image(row)
                    key = sample_key(row["key"])
                    record = {c: row.get(c) for c in ("key", "dataset", "label", "cluster", "weight", "count", "uri")}
                    if row.get("meta"):
                        record["meta"] = row["meta"]
                    text = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
                    ext = image_suffix(row, data)[1:] or "bin"
                    for name, payload in sorted([(f"{key}.{ext}", data), (f"{key}.json", text)]):
                        tar.addfile(*_member(name, payload))
                    yield sink.take()
        yield sink.take()
