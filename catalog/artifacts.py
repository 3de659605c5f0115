"""The artifact store: a directory of files keyed by relative names.

Every write goes to a temporary file in the target folder and is renamed into place only
when complete, so a reader never sees half a file and a crashed writer leaves at most a
``.tmp-*`` file, which the garbage collection (:mod:`nds.catalog.artifact_gc`, ``nds artifacts
gc``) removes once it is older than its grace period, with the files no row references.
Keys derived from a hash of their inputs make a repeated task produce the same single
artifact.

Error messages name the artifact key, never the store's folder on the server: they reach
API clients. A full disk or quota is a :class:`StorageFullError` (503, retry later).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from nds_client.errors import ArtifactError, NotFoundError, StorageFullError

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


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._resolved_root = root.resolve()

    def path(self, key: str) -> Path:
        target = (self._resolved_root / key).resolve()
        if not target.is_relative_to(self._resolved_root):
            raise ArtifactError(f"artifact key {key!r} escapes the artifact store")
        return target

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

    def write_with(self, key: str, writer: Callable[[Path], None], *, durable: bool = True) -> Path:
        target = self.path(key)
        with self._writing(key, target, durable=durable) as tmp:
            writer(tmp)
        return target

    def write_bytes(self, key: str, data: bytes) -> Path:
        return self.write_with(key, lambda p: p.write_bytes(data))

    def copy_in(self, key: str, source: Path) -> Path:
        """Copy the file ``source`` into the store as ``key`` (temp file, fsync, rename)."""
        return self.write_with(key, lambda p: shutil.copyfile(source, p))

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
