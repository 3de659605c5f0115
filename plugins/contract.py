"""The plugin contract: everything a plugin of the Neural Data Server imports, in one module.

Built-in and third-party plugins import this module (``nds.plugins.contract``), the model
package (``nds.catalog.model.*``, to train or export networks) and the client's shared
modules (``nds_client.*``), nothing else of the server: what is here stays stable, the
catalog's own modules may change at any release.

A plugin is an object registered under an entry-point group of its distribution's
``pyproject.toml``; ``nds plugins list`` shows the installed ones::

    [project.entry-points."nds.sources"]      # a Source subclass
    lines = "my_package.sources:LineSource"
    [project.entry-points."nds.backbones"]    # a callable load(arg, env) -> Backbone
    mynet = "my_package.backbones:load"
    [project.entry-points."nds.exporters"]    # an Exporter subclass
    tsv = "my_package.exporters:TsvExporter"

**Sources** (``nds datasets add --source NAME``): a :class:`Source` is built from the
user's location (a path, an ``s3://`` uri or a pattern, already normalised and checked by
the catalog to lie inside the data roots), its options and a :class:`SourceEnv` through
which it reads everything (local files and object storage alike, never outside the data
roots). It enumerates :class:`SourceItem` s (a uri, an optional label; for samples inside
a tar shard or a Parquet file the container, the offset and usually the bytes it streamed)
in a deterministic order: the catalog hashes and decodes them. ``parts()`` lists the files
or shards without reading them (``nds datasets sync`` compares them with what is
registered). Structural problems of the whole source (missing folder, missing columns, a
malformed row) raise :class:`SourceError` naming the field and, for manifests, the line; a
part that cannot be read (a truncated shard) is a :class:`SkippedPart`, and the rest registers.

**Backbones** (``nds index --backbone NAME[:ARG]``: ``default``, ``torchvision:resnet18``,
``onnx:/models/encoder.onnx``): ``load(arg, env)`` gets the text after the colon (or None)
and a :class:`BackboneEnv`, and returns a :class:`Backbone`, which embeds uint8 images
``(N, S, S, 3)`` at its ``input_size`` into L2-normalised float32 vectors ``(N, dim)``. Its
``version`` names its embedding space: one version is one vector collection (the catalog
names it), and changing the backbone of a dataset re-embeds it there. A backbone
normalises its inputs with :func:`to_nchw` (``(x / 255 - mean) / std``, ImageNet's
:data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` unless it says otherwise) and its outputs with
:func:`normalize_rows`. A file path in ``arg`` goes through ``env.resolve_path`` before it is
opened; a problem with the request or the model raises :class:`PluginError`.

**Exporters** (``GET /v1/queries/{id}/manifest?format=NAME``): an :class:`Exporter` turns
chunks of manifest rows (:data:`Row`, dicts with the keys :data:`MANIFEST_COLUMNS`, plus
``meta``, the sample's metadata) into bytes, chunk by chunk, so a manifest of any size
streams with bounded memory. One that sets ``needs_images`` gets ``read_image(row)``. The
server hands the others the manifest as pyarrow record batches
(:meth:`Exporter.stream_batches`: the columns :data:`MANIFEST_COLUMNS`, then ``meta`` as JSON
text); by default those become rows (:meth:`Exporter.rows_of`) for :meth:`Exporter.stream`,
so an exporter written for rows needs nothing more, and one that writes columns overrides
``stream_batches``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from nds_client.errors import ArtifactError, InvalidInputError, PluginError, SourceError, StorageError, StorageUnavailable
from nds_client.files import sha256_file
from nds_client.images import IMAGE_SUFFIXES  # the one file hash: a backbone's version, an artifact's digest
from nds_client.manifests import MANIFEST_COLUMNS, Row
from nds_client.preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalize_rows, to_nchw
from nds_client.storage import Location, image_value_bytes, parquet_row_uri, read_location

__all__ = [
    # sources
    "Source", "SourceItem", "SkippedPart", "SourceEnv", "parquet_row_uri", "image_value_bytes", "IMAGE_SUFFIXES",
    # backbones
    "Backbone", "BackboneEnv", "ArtifactAccess", "IMAGENET_MEAN", "IMAGENET_STD", "to_nchw", "normalize_rows", "sha256_file",
    # exporters
    "Exporter", "Row", "MANIFEST_COLUMNS", "ImageReader", "Location", "read_location",
    # errors
    "PluginError", "SourceError", "InvalidInputError", "ArtifactError", "StorageError", "StorageUnavailable",
]


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceItem:
    """One candidate sample.

    ``uri`` is where the sample is: a file (a local path or an object-storage uri), or, for
    a sample inside a container, an address naming it (``SHARD#MEMBER`` for a tar member,
    :func:`parquet_row_uri` for a Parquet row). A container's samples also give ``shard`` (the
    container's uri) and ``offset`` (a tar member's data offset, a Parquet row's number),
    and usually ``data``, the bytes the source read while streaming the container (so the
    catalog need not read them again); ``size`` is the member's length. ``meta`` is kept
    with the sample (img2dataset's url, caption and key; COCO's categories)."""

    uri: str
    label: str | None
    origin: str                     # where it came from, for messages: a relative path, "line 12", "000.tar: k.png"
    data: bytes | None = None
    shard: str | None = None
    offset: int | None = None
    size: int | None = None
    meta: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str):  # a Path from an older plugin
            object.__setattr__(self, "uri", os.fspath(self.uri))

    @property
    def path(self) -> Path:
        """The local file of a plain local sample."""
        return Path(self.uri)


@dataclass(frozen=True)
class SkippedPart:
    """A part of a source (a shard, a file) that cannot be read as a whole: nothing of it is
    registered, and the registration lists it with ``reason``. A source yields it in place
    of the part's items (or after some of them: those are dropped)."""

    part: str
    reason: str


class SourceEnv(Protocol):
    """How a source reads its data: through the catalog, which refuses anything outside the
    data roots (``NDS_DATA_ROOTS``: folders and object-storage prefixes). Each call takes
    and returns uris (absolute local paths or ``s3://...``) and raises :class:`SourceError`
    (or ``StorageUnavailable``) with the uri in the message."""

    def expand(self, pattern: str) -> list[str]:
        """The files a path, folder-less glob or brace pattern names, sorted (a missing named file is an error)."""

    def list_files(self, folder: str) -> list[str]:
        """Every file under ``folder``, recursively, sorted; hidden names left out."""

    def is_dir(self, uri: str) -> bool: ...

    def exists(self, uri: str) -> bool: ...

    def open(self, uri: str) -> AbstractContextManager[IO[bytes]]:
        """A binary file, read front to back (object storage: a few large sequential reads)."""

    def read_bytes(self, uri: str) -> bytes: ...

    def check(self, uri: str) -> str:
        """``uri`` normalised, after checking it lies inside the data roots (no read)."""


class Source(ABC):
    """One registered source: built from the user's location (a checked path, uri or
    pattern), its options (``--label-field``, ``-O key=value``) and a :class:`SourceEnv`;
    yields items in a stable order.

    ``parts()`` lists the units it is made of (files, shards) without reading them, and
    ``items(parts)`` reads only those: what ``nds datasets sync`` uses to register what was
    added since. A source made of one unit (a manifest) returns it alone."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: option name -> what it means; the catalog refuses any other name (field ``options``)
    options: ClassVar[dict[str, str]] = {}
    #: whether a registration may scan chunks of ``parts()`` side by side (one task per chunk):
    #: true for parts that are files or shards, read independently; a source whose parts are
    #: the rows of one file (a manifest) sets it false and is scanned by one task streaming
    #: ``items()``, so its rows are never all held at once
    chunked: ClassVar[bool] = True

    def __init__(self, location: str, env: SourceEnv, **options: str) -> None:
        self.location = location
        self.env = env
        self.opts = options

    @property
    def path(self) -> Path:
        return Path(self.location)

    def parts(self) -> list[str]:
        return [self.location]

    def count_parts(self) -> int:
        """How many parts there are: what a registration checks (non-zero) before it stores
        anything. Override when counting is cheaper than listing (a manifest of 10^6 rows)."""
        return len(self.parts())

    def locate(self, suffixes: tuple[str, ...], what: str, hint: str, *,
               folder: Callable[[str], list[str]] | None = None) -> list[str]:
        """The files the location names, sorted: every match of a glob (those ending in one of
        ``suffixes``, compared lower-case), every name of a brace pattern (each must exist), the
        files of a folder with those suffixes (or what ``folder`` lists for it), or the one file.
        SourceError (field ``path``, with ``hint``) when it names none of ``what``."""
        loc = self.location
        globbed = any(c in loc for c in "*?[")
        if globbed or "{" in loc:
            try:
                found = self.env.expand(loc)
            except SourceError:
                raise
            except StorageError as exc:  # a brace pattern naming a missing file
                raise SourceError(exc.message, field="path", hint=exc.hint or hint) from exc
            if globbed:
                found = [u for u in found if u.lower().endswith(suffixes)]
            if not found:
                raise SourceError(f"{loc} matches no {what}", field="path", hint=hint)
            return found
        if self.env.is_dir(loc):
            found = folder(loc) if folder is not None else [u for u in self.env.list_files(loc) if u.lower().endswith(suffixes)]
            if not found:
                raise SourceError(f"{loc} holds no {what}", field="path", hint=hint)
            return found
        if not self.env.exists(loc):
            raise SourceError(f"{loc} does not exist", field="path", hint=hint)
        return [self.env.check(loc)]

    @abstractmethod
    def items(self, parts: Sequence[str] | None = None) -> Iterator[SourceItem | SkippedPart]:
        """Every candidate sample of ``parts`` (all when None), in a stable order; raises
        SourceError on structural problems of the whole source, yields SkippedPart for a bad part."""


# --------------------------------------------------------------------------- backbones


@runtime_checkable
class ArtifactAccess(Protocol):
    """What a backbone may do with the catalog's artifact store: files under relative keys
    (``backbones/mynet.onnx``), one store shared by every process of the server."""

    def path(self, key: str) -> Path:
        """Where ``key`` lives on this machine (it may not exist yet; for a store in object storage,
        its cache); ArtifactError if the key leaves the store. Read through :meth:`open_path`,
        write through :meth:`write_with` or :meth:`write_bytes`."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` is a file in the store."""

    def open_path(self, key: str) -> Path:
        """The path of an existing ``key``; NotFoundError if it is missing."""

    def write_bytes(self, key: str, data: bytes) -> Path:
        """Write ``key`` atomically (temporary file, fsync, rename) and return its path."""

    def write_with(self, key: str, writer: Callable[[Path], None]) -> Path:
        """Have ``writer`` fill a temporary file, then publish it as ``key`` atomically; its path.
        A file written to :meth:`path` directly is not published (a store in object storage
        keeps only a cache there)."""


def _no_paths(raw: str) -> Path:
    raise InvalidInputError(f"{raw}: this server takes no file paths for backbones", field="backbone")


@dataclass
class BackboneEnv:
    """What a backbone may use while loading."""

    artifacts: ArtifactAccess
    #: a user-given path -> its real path, checked to exist, be readable and lie inside the
    #: server's data roots (symlinks resolved); raises InvalidInputError otherwise
    resolve_path: Callable[[str], Path] = _no_paths
    weights: Path | None = None  # a local weights file (``--weights``), already checked like resolve_path does
    #: (max_images, size) -> uint8 (N, size, size, 3): a sample of the registered sources
    training_images: Callable[[int, int], np.ndarray] | None = None
    progress: Callable[[float], None] | None = None  # fraction done, 0..1, while loading or training
    extra: dict = field(default_factory=dict)


class Backbone(ABC):
    version: str  # names the embedding space: the same version must give the same vectors
    dim: int
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: a self-contained ONNX file of the network (input NCHW float32 at input_size, normalised
    #: with mean/std); when there is one, indexing publishes it so that clients can embed their
    #: own images in this space (the ``embedding`` scoring method)
    onnx_path: Path | None = None

    @abstractmethod
    def embed(self, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, input_size, input_size, 3) -> float32 (N, dim), rows of unit length."""

    def describe(self) -> dict:
        return {"version": self.version, "dim": self.dim, "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}


# --------------------------------------------------------------------------- exporters


#: the image bytes of a manifest row, read by the catalog from wherever the sample lives
ImageReader = Callable[[Row], bytes]


class Exporter(ABC):
    name: ClassVar[str]
    media_type: ClassVar[str]
    suffix: ClassVar[str]
    #: an exporter that writes the images themselves (webdataset) gets ``read_image``
    needs_images: ClassVar[bool] = False

    @abstractmethod
    def stream(self, chunks: Iterable[list[Row]], *, read_image: ImageReader | None = None) -> Iterator[bytes]:
        """Bytes of the file, produced chunk by chunk."""

    def stream_batches(self, batches: Iterable[Any]) -> Iterator[bytes]:
        """Bytes of the file from the manifest as pyarrow ``RecordBatch`` es, batch by batch: the
        columns :data:`MANIFEST_COLUMNS` (``cluster``, ``count``, ``offset``, ``size`` int64,
        ``weight`` float64, the others strings) and ``meta`` (the sample's metadata as JSON text,
        or null). What the server calls for exporters that do not need images; this default makes
        each batch into rows and calls :meth:`stream`. Override it to write the columns directly."""
        return self.stream(self.rows_of(batch) for batch in batches)

    @staticmethod
    def schema() -> Any:  # noqa: ANN401 - a pyarrow Schema
        """The manifest columns as a pyarrow schema: the types of :meth:`stream_batches`' batches
        (less ``meta``) and of the parquet exporter's file."""
        import pyarrow as pa

        types = {"cluster": pa.int64(), "weight": pa.float64(), "count": pa.int64(), "offset": pa.int64(), "size": pa.int64()}
        return pa.schema([(c, types.get(c, pa.string())) for c in MANIFEST_COLUMNS])

    @staticmethod
    def rows_of(batch: Any) -> list[Row]:  # noqa: ANN401 - a pyarrow RecordBatch
        """A manifest batch as rows: dicts of :data:`MANIFEST_COLUMNS` and ``meta`` (decoded)."""
        import json

        columns = [batch.column(c).to_pylist() for c in MANIFEST_COLUMNS]
        names = batch.schema.names
        meta = batch.column("meta").to_pylist() if "meta" in names else [None] * batch.num_rows
        return [{**dict(zip(MANIFEST_COLUMNS, values)), "meta": None if m is None else json.loads(m)} for *values, m in zip(*columns, meta)]
