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
user's path, already resolved and checked by the catalog to lie inside the data roots, and
enumerates :class:`SourceItem` s (an absolute file path, an optional label) without reading
the images: the catalog reads, hashes and decodes them. Enumeration is cheap and
deterministic, as it runs once to validate a request and again in the job. Structural
problems (missing folder, missing columns, a malformed row) raise :class:`SourceError`
naming the field and, for manifests, the line.

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
chunks of manifest rows (:data:`Row`, dicts with the keys :data:`MANIFEST_COLUMNS`) into
bytes, chunk by chunk, so a manifest of any size streams with bounded memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from nds_client.errors import ArtifactError, InvalidInputError, PluginError, SourceError
from nds_client.files import sha256_file  # the one file hash: a backbone's version, an artifact's digest
from nds_client.manifests import MANIFEST_COLUMNS, Row
from nds_client.preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalize_rows, to_nchw

__all__ = [
    # sources
    "Source", "SourceItem",
    # backbones
    "Backbone", "BackboneEnv", "ArtifactAccess", "IMAGENET_MEAN", "IMAGENET_STD", "to_nchw", "normalize_rows", "sha256_file",
    # exporters
    "Exporter", "Row", "MANIFEST_COLUMNS",
    # errors
    "PluginError", "SourceError", "InvalidInputError", "ArtifactError",
]


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceItem:
    path: Path          # absolute, not yet resolved through symlinks
    label: str | None
    origin: str         # where it came from, for messages: a relative path or "line 12"


class Source(ABC):
    """One registered source: built from the user's (checked) path, yields items in a stable order."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def items(self) -> Iterator[SourceItem]:
        """Every candidate sample, in a stable order; raises SourceError on structural problems."""


# --------------------------------------------------------------------------- backbones


@runtime_checkable
class ArtifactAccess(Protocol):
    """What a backbone may do with the catalog's artifact store: files under relative keys
    (``backbones/mynet.onnx``), one store shared by every process of the server."""

    def path(self, key: str) -> Path:
        """Where ``key`` lives (it may not exist yet); ArtifactError if the key leaves the store."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` is a file in the store."""

    def open_path(self, key: str) -> Path:
        """The path of an existing ``key``; NotFoundError if it is missing."""

    def write_bytes(self, key: str, data: bytes) -> Path:
        """Write ``key`` atomically (temporary file, fsync, rename) and return its path."""


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


class Exporter(ABC):
    name: ClassVar[str]
    media_type: ClassVar[str]
    suffix: ClassVar[str]

    @abstractmethod
    def stream(self, chunks: Iterable[list[Row]]) -> Iterator[bytes]:
        """Bytes of the file, produced chunk by chunk."""
