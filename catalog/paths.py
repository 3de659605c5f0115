"""Keep registered paths and uris inside the configured data roots (``NDS_DATA_ROOTS``).

Local paths are resolved through symlinks before the check, so neither ``..`` nor a
symlink can lead outside a root; object-storage uris must start with a prefix root.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nds_client import storage
from nds_client.errors import InvalidInputError, SourceError
from nds_client.storage import is_remote, local_path, normalize


def within(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_in_roots(raw: str | os.PathLike[str], roots: list[Path], *, field: str = "path") -> Path:
    """The real absolute path of ``raw``; InvalidInputError if missing, unreadable or outside the roots."""
    text = os.fspath(raw)
    if not text or "\x00" in text:
        raise InvalidInputError("the path is empty or contains a NUL byte", field=field)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError as exc:
        raise InvalidInputError(f"{text} does not exist", field=field, hint="check the path") from exc
    except (OSError, RuntimeError) as exc:
        raise InvalidInputError(f"{text} cannot be resolved: {exc}", field=field) from exc
    if not within(real, roots):
        raise InvalidInputError(
            f"{text} is outside the data roots ({', '.join(map(str, roots))})",
            field=field,
            hint="move the data under a root or add its folder to NDS_DATA_ROOTS",
        )
    if not os.access(real, os.R_OK):
        raise InvalidInputError(f"{text} is not readable", field=field, hint="check its permissions")
    return real


# --------------------------------------------------------------------------- uris: folders and object storage

_WILDCARDS = "*?[{"


@dataclass(frozen=True)
class DataRoots:
    """``NDS_DATA_ROOTS``: local folders (resolved) and object-storage prefixes (``s3://bucket/prefix``).

    Every uri the catalog reads for a source goes through :meth:`check`: a local path is
    resolved through symlinks and must lie in a folder root, an object-storage uri must
    start with a prefix root (whole path segments; no ``..``)."""

    local: tuple[Path, ...]
    remote: tuple[str, ...] = ()

    def describe(self) -> str:
        return ", ".join([*map(str, self.local), *self.remote]) or "none"

    def contains(self, uri: str) -> bool:
        if is_remote(uri):
            if any(seg in ("..", ".") for seg in uri.split("://", 1)[1].split("/")):
                return False
            return any(uri == root or uri.startswith(root + "/") for root in self.remote)
        return within(local_path(uri), list(self.local))

    def check(self, raw: str, *, field: str = "path", must_exist: bool = True) -> str:
        """``raw`` normalised (a resolved absolute path, or the object-storage uri) after
        checking that it lies inside the roots (and exists, unless ``must_exist`` is False)."""
        if not raw or "\x00" in raw:
            raise InvalidInputError("the path is empty or contains a NUL byte", field=field)
        if not is_remote(raw):
            if must_exist:
                return str(resolve_in_roots(local_path(raw), list(self.local), field=field))
            path = local_path(raw).expanduser()
            path = path if path.is_absolute() else Path.cwd() / path
            real = path.resolve()
            if not within(real, list(self.local)):
                raise self._outside(raw, field)
            return str(real)
        uri = normalize(raw)
        if not self.contains(uri):
            raise self._outside(raw, field)
        if must_exist and not storage.exists(uri):
            raise InvalidInputError(f"{raw} does not exist", field=field, hint="check the uri")
        return uri

    def check_pattern(self, raw: str, *, field: str = "path") -> str:
        """A location that may hold wildcards or brace ranges: its literal part (up to the
        folder before the first wildcard) is checked like :meth:`check`; every file it
        names is checked again when it is expanded."""
        cut = min((raw.index(c) for c in _WILDCARDS if c in raw), default=-1)
        if cut < 0:
            return self.check(raw, field=field)
        head, _, _ = raw[:cut].rpartition("/")
        if not head:
            head = "." if not is_remote(raw) else raw[:cut]
        base = self.check(head if head else raw[:cut], field=field)
        rest = raw[len(head):] if head else raw[cut:]
        return base + (rest if rest.startswith("/") else "/" + rest)

    def _outside(self, raw: str, field: str) -> InvalidInputError:
        return InvalidInputError(
            f"{raw} is outside the data roots ({self.describe()})",
            field=field,
            hint="move the data under a root or add its folder or s3:// prefix to NDS_DATA_ROOTS",
        )


class RootedStorage:
    """The :class:`nds.plugins.contract.SourceEnv` the catalog gives sources: the I/O layer
    (:mod:`nds_client.storage`), every uri checked against the data roots first."""

    def __init__(self, roots: DataRoots) -> None:
        self.roots = roots

    def check(self, uri: str) -> str:
        if is_remote(uri):
            uri = normalize(uri)
            if not self.roots.contains(uri):
                raise SourceError(f"{uri} is outside the data roots ({self.roots.describe()})", field="path")
            return uri
        try:
            real = local_path(uri).resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise SourceError(f"{uri} does not exist or cannot be resolved", field="path") from exc
        if not within(real, list(self.roots.local)):
            raise SourceError(f"{uri} is outside the data roots ({self.roots.describe()})", field="path")
        return str(real)

    def expand(self, pattern: str) -> list[str]:
        found = storage.expand(pattern)
        return [self.check(u) for u in found]

    def list_files(self, folder: str) -> list[str]:
        """The files under ``folder`` (checked); each listed file is checked again when it is read
        (a symlink out of the roots is skipped and counted by the registration scan)."""
        return storage.list_files(self.check(folder))

    def is_dir(self, uri: str) -> bool:
        return storage.is_dir(self.check(uri))

    def exists(self, uri: str) -> bool:
        try:
            return storage.exists(self.check(uri))
        except SourceError:
            return False

    def open(self, uri: str) -> AbstractContextManager[IO[bytes]]:
        return storage.open_input(self.check(uri))

    def read_bytes(self, uri: str) -> bytes:
        return storage.read_bytes(self.check(uri))
