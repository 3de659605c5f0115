"""The artifact store: a directory of files keyed by relative names.

Every write goes to a temporary file in the target folder and is renamed into place only
when complete, so a reader never sees half a file and a crashed writer leaves at most a
``.tmp-*`` file, which the garbage collection (:mod:`nds.catalog.artifact_gc`, ``nds artifacts
gc``) removes once it is older than its grace period, with the files no row references.
Keys derived from a hash of their inputs make a repeated task produce the same single
artifact.

Error messages name the artifact key, never the store's folder on the server: they reach
API clients. A full disk or quota is a :class:`StorageFullError` (503, retry later).

With ``NDS_ARTIFACTS_DIR=s3://bucket/prefix`` the store is :class:`RemoteArtifactStore`:
the same interface over object storage (the I/O layer :mod:`nds_client.storage`, fsspec),
so workers on other machines share it without a shared filesystem. It keeps a local cache
(``NDS_HOME/artifact-cache``): ``open_path`` downloads an artifact there (temp file +
rename) unless the cached copy matches the object's size and time, and returns the local
path; ``write_with`` has the writer fill a local temp file, uploads it with one PUT (a
large file with a multipart upload, which also appears whole or not at all), then keeps it
in the cache. ``path(key)`` is the cache path: a file written there directly is *not* in
the store; writers go through ``write_with`` (or ``write_bytes``/``copy_in``). An object
store that does not answer or refuses the credentials is a :class:`StorageUnavailable`
(503); messages name the key, not the bucket or the endpoint.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat as stat_mod
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from nds_client import storage
from nds_client.errors import ArtifactError, NDSError, NotFoundError, StorageFullError, StorageUnavailable

TEMP_PREFIX = ".tmp-"
EXPORT_TEMP_SUFFIX = ".tmp"  # nds.catalog.model.export writes ".<name>.<random>.tmp" next to its target
FULL = (errno.ENOSPC, errno.EDQUOT)


def is_temp_name(name: str) -> bool:
    """Whether a file name is a writer's temporary file (the store's or the ONNX exporter's)."""
    return name.startswith(TEMP_PREFIX) or (name.startswith(".") and name.endswith(EXPORT_TEMP_SUFFIX))


def write_error(key: str, exc: OSError) -> ArtifactError:
    """The project's error for an OSError while writing ``key``: no path in the message."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in FULL:
        return StorageFullError(f"the server's storage is full: cannot write artifact {key} ({reason})",
                                hint="retry later; an operator can free space, e.g. with 'nds artifacts gc'")
    return ArtifactError(f"cannot write artifact {key}: {reason}", hint="the server log has the details")


def walk_files(root: os.PathLike[str] | str) -> Iterable[tuple[str, os.stat_result]]:
    """(key, lstat) of every regular file under the local folder ``root`` (temp files included;
    symlinks are neither followed nor listed)."""
    base = os.fspath(root)
    for folder, _dirs, files in os.walk(base):
        for name in files:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat_mod.S_ISREG(st.st_mode):
                yield PurePosixPath(os.path.relpath(path, base)).as_posix(), st


class _Files:
    """What both stores share: files under relative keys in a local folder (the store itself,
    or the cache of one in object storage), written through ``write_with``."""

    remote: bool
    uri: str

    def __init__(self, root: Path) -> None:
        self.root = root
        self._resolved_root = root.resolve()

    def path(self, key: str) -> Path:
        """Where ``key`` lives on this machine; ArtifactError when it leaves the store."""
        target = (self._resolved_root / key).resolve()
        if not target.is_relative_to(self._resolved_root) or target == self._resolved_root:
            raise ArtifactError(f"artifact key {key!r} escapes the artifact store")
        return target

    def write_with(self, key: str, writer: Callable[[Path], object], *, durable: bool = True) -> Path:
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> Path:
        return self.write_with(key, lambda p: p.write_bytes(data))

    def copy_in(self, key: str, source: Path) -> Path:
        """Store the file ``source`` as ``key`` (a temp copy, fsync, rename; uploaded when the store is remote)."""
        return self.write_with(key, lambda p: shutil.copyfile(source, p))


class ArtifactStore(_Files):
    """The artifact store in a local (or shared) folder."""

    remote = False

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.uri = str(root)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def open_path(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise NotFoundError(f"artifact {key} is missing from the artifact store")
        return path

    @contextmanager
    def _writing(self, key: str, target: Path, *, durable: bool) -> Iterator[Path]:
        """Yield a temp path beside ``target``; on success it is renamed to ``target``, on error removed.

        ``durable`` fsyncs the file before the rename (models, backbones); small derived
        files whose loss a crash may cost (query picks) skip it, like the embedded SQLite
        catalog's own commits do (WAL with synchronous=NORMAL).
        """
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=target.suffix, dir=target.parent)
            os.close(fd)
        except OSError as exc:
            raise write_error(key, exc) from exc
        tmp = Path(tmp_name)
        try:
            yield tmp
            if durable:
                with tmp.open("rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_error(key, exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_with(self, key: str, writer: Callable[[Path], object], *, durable: bool = True) -> Path:
        target = self.path(key)
        with self._writing(key, target, durable=durable) as tmp:
            writer(tmp)
        return target

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def list_objects(self, prefix: str = "") -> list[StoredObject]:
        """Every file under ``prefix`` (a key folder, '' for all), temp files left out, sorted by key."""
        folder = prefix.strip("/")
        where = self._resolved_root / folder if folder else self._resolved_root
        found = [(f"{folder}/{key}" if folder else key, st) for key, st in walk_files(where) if not is_temp_name(key.rsplit("/", 1)[-1])]
        return [StoredObject(key, st.st_size, st.st_mtime, None) for key, st in sorted(found)]

    def stat(self, key: str) -> StoredObject | None:
        path = self.path(key)
        if not path.is_file():
            return None
        st = path.stat()
        return StoredObject(key, st.st_size, st.st_mtime, None)


# --------------------------------------------------------------------------- object storage


@dataclass(frozen=True)
class StoredObject:
    """One artifact, as a store's listing shows it (the ETag only in object storage)."""

    key: str
    size: int
    mtime: float  # the object's LastModified, seconds since the epoch
    etag: str | None


def _mtime(info: dict) -> float | None:
    value = info.get("LastModified") or info.get("last_modified") or info.get("mtime")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


class RemoteArtifactStore(_Files):
    """The artifact store in object storage, with a local cache (see the module docstring):
    :meth:`path` is a key's cache path, what :meth:`open_path` downloads to (writing it
    directly stores nothing)."""

    remote = True

    def __init__(self, uri: str, cache: Path) -> None:
        super().__init__(cache)  # the local cache: where path(key) points
        self.uri = storage.normalize(uri)

    def _fs(self) -> tuple[Any, str]:
        fs, base = storage.filesystem(self.uri)
        return fs, base.rstrip("/")

    def _object(self, key: str) -> str:
        target = self.path(key)
        return self._fs()[1] + "/" + target.relative_to(self._resolved_root).as_posix()

    def _error(self, key: str, action: str, exc: BaseException) -> NDSError:
        """The project's error for a failed call to the object store; the key named, not the bucket or endpoint."""
        shown = f"artifact {key}"
        try:
            with storage.translated(shown):
                raise exc
        except NDSError as translated:
            err = translated
        reason = err.message[len(shown) + 2:] if err.message.startswith(shown + ": ") else err.message
        reason = reason.split(" (", 1)[0]
        if isinstance(err, StorageUnavailable):
            return StorageUnavailable(f"cannot {action} artifact {key}: {reason}", hint=err.hint)
        if isinstance(exc, FileNotFoundError):
            return NotFoundError(f"artifact {key} is missing from the artifact store")
        return ArtifactError(f"cannot {action} artifact {key}: {reason}", hint="the server log has the details")

    def _info(self, key: str) -> dict | None:
        fs, _ = self._fs()
        try:
            return fs.info(self._object(key))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - filesystems raise many types
            raise self._error(key, "read", exc) from exc

    def exists(self, key: str) -> bool:
        info = self._info(key)
        return info is not None and info.get("type", "file") == "file"

    def open_path(self, key: str) -> Path:
        """The local path of ``key``: the cached copy when it matches the object (size and time), else downloaded."""
        target = self.path(key)
        info = self._info(key)
        if info is None or info.get("type", "file") != "file":
            target.unlink(missing_ok=True)  # a copy of an object that is gone is not served
            raise NotFoundError(f"artifact {key} is missing from the artifact store")
        size, mtime = int(info.get("size") or 0), _mtime(info)
        try:
            st = target.stat()
            if st.st_size == size and mtime is not None and abs(st.st_mtime - mtime) < 1e-3:
                return target
        except FileNotFoundError:
            pass
        fs, _ = self._fs()
        with self._temp(key, target) as tmp:
            try:
                fs.get_file(self._object(key), str(tmp))
            except FileNotFoundError as exc:  # deleted since the info
                raise NotFoundError(f"artifact {key} is missing from the artifact store") from exc
            except OSError as exc:
                if exc.errno in FULL:  # the cache's disk
                    raise write_error(key, exc) from exc
                raise self._error(key, "read", exc) from exc
            except Exception as exc:  # noqa: BLE001 - filesystems raise many types
                raise self._error(key, "read", exc) from exc
            if mtime is not None:
                os.utime(tmp, (mtime, mtime))
            os.replace(tmp, target)
        return target

    @contextmanager
    def _temp(self, key: str, target: Path) -> Iterator[Path]:
        """A temp file in the cache beside ``target``, removed unless the block moved it into place."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=target.suffix, dir=target.parent)
            os.close(fd)
        except OSError as exc:
            raise write_error(key, exc) from exc
        tmp = Path(tmp_name)
        try:
            yield tmp
        except OSError as exc:  # the writer's, or the cache's disk
            raise write_error(key, exc) from exc
        finally:
            tmp.unlink(missing_ok=True)

    def write_with(self, key: str, writer: Callable[[Path], object], *, durable: bool = True) -> Path:
        """``writer`` fills a local temp file; it is uploaded with one PUT (all or nothing) and kept in the cache.
        ``durable`` is the object store's business (a PUT that succeeded is stored)."""
        target = self.path(key)
        fs, _ = self._fs()
        with self._temp(key, target) as tmp:
            writer(tmp)
            try:
                fs.put_file(str(tmp), self._object(key))
                info = fs.info(self._object(key))
            except Exception as exc:  # noqa: BLE001 - filesystems raise many types
                raise self._error(key, "write", exc) from exc
            mtime = _mtime(info)
            if mtime is not None:
                os.utime(tmp, (mtime, mtime))
            os.replace(tmp, target)
        return target

    def delete(self, key: str) -> None:
        fs, _ = self._fs()
        try:
            fs.rm_file(self._object(key))
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._error(key, "delete", exc) from exc
        finally:
            self.path(key).unlink(missing_ok=True)

    # ------------------------------------------------------------------ for the garbage collection

    def list_objects(self, prefix: str = "") -> list[StoredObject]:
        """Every object under ``prefix`` (a key folder, '' for all), with size, time and ETag."""
        fs, base = self._fs()
        where = base + ("/" + prefix.strip("/") if prefix.strip("/") else "")
        try:
            found = fs.find(where, detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._error(prefix or "listing", "list", exc) from exc
        out = []
        for path, info in sorted(found.items()):
            if info.get("type", "file") != "file" or not path.startswith(base + "/"):
                continue
            out.append(StoredObject(path[len(base) + 1:], int(info.get("size") or 0), _mtime(info) or 0.0, info.get("ETag")))
        return out

    def stat(self, key: str) -> StoredObject | None:
        info = self._info(key)
        if info is None or info.get("type", "file") != "file":
            return None
        return StoredObject(key, int(info.get("size") or 0), _mtime(info) or 0.0, info.get("ETag"))
