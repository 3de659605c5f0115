"""The artifact store: a directory of files keyed by relative names.

Every write goes to a temporary file in the target folder and is renamed into place only
when complete, so a reader never sees half a file and a crashed writer leaves at most a
``.tmp-*`` file that :meth:`ArtifactStore.clean_temp` removes. Keys derived from a hash
of their inputs make a repeated task produce the same single artifact.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from catalog.errors import ArtifactError, NotFoundError

TEMP_PREFIX = ".tmp-"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
            raise NotFoundError(f"artifact {key} is missing from {self.root}")
        return path

    @contextmanager
    def writing(self, key: str, *, durable: bool = True) -> Iterator[Path]:
        """Yield a temp path to write; on success it is renamed to ``key``, on error removed.

        ``durable`` fsyncs the file before the rename (models, backbones); small derived
        files whose loss a crash may cost (query picks) skip it, like the embedded SQLite
        catalog's own commits do (WAL with synchronous=NORMAL).
        """
        with self._writing(key, self.path(key), durable=durable) as tmp:
            yield tmp

    @contextmanager
    def _writing(self, key: str, target: Path, *, durable: bool) -> Iterator[Path]:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=target.suffix, dir=target.parent)
            os.close(fd)
        except OSError as exc:
            raise ArtifactError(f"cannot write artifact {key} under {self.root}: {exc.strerror or exc}") from exc
        tmp = Path(tmp_name)
        try:
            yield tmp
            if durable:
                with tmp.open("rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ArtifactError(f"cannot write artifact {key} under {self.root}: {exc.strerror or exc}") from exc
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

    def clean_temp(self) -> int:
        """Remove temp files left by writers that died; returns how many."""
        if not self.root.exists():
            return 0
        removed = 0
        for tmp in self.root.rglob(f"{TEMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed
