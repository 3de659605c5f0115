"""The local cache of downloaded networks: experts and backbones, by sha256.

A network the server lists with sha256 ``H`` lives at ``DIR/H.onnx`` (default
``~/.cache/nds/experts``, under ``$XDG_CACHE_HOME`` when set). A cached file is used only
when its bytes hash to ``H``; otherwise it is downloaded again, streamed to a temp file
beside it, checked against ``H`` (one retry, then :class:`~nds_client.errors.IntegrityError`)
and renamed into place, so the cache never holds a file under the wrong name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from nds_client.errors import IntegrityError
from nds_client.files import atomic_write, sha256_file
from nds_client.scores import LocalExpert, ProgressFn
from nds_client.transport import Connection

SHA256 = re.compile(r"[0-9a-f]{64}")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/nds/experts``, or ``~/.cache/nds/experts``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nds" / "experts"


class NetworkCache:
    """The networks of one server in ``folder``, downloaded through ``connection`` when missing."""

    def __init__(self, connection: Connection, folder: Path) -> None:
        self.connection, self.folder = connection, folder

    def path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.onnx"

    def holds(self, path: Path, sha256: str) -> bool:
        """Whether ``path`` is a file whose bytes hash to ``sha256``."""
        return path.is_file() and sha256_file(path) == sha256

    def file(self, url_path: str, sha256: str, *, what: str) -> tuple[Path, bool]:
        """``folder/<sha256>.onnx``, downloaded from ``url_path`` unless a file with that hash is
        already there; (path, downloaded now)."""
        if not SHA256.fullmatch(sha256 or ""):
            raise IntegrityError(f"the server lists {what} with an invalid sha256 {sha256!r}")
        path = self.path(sha256)
        if self.holds(path, sha256):
            return path, False
        self.download(url_path, sha256, path, what=what)
        return path, True

    def fetch(self, experts: Sequence[LocalExpert], progress: ProgressFn | None) -> list[LocalExpert]:
        """Download each expert's file unless the cache holds one with its sha256."""
        local: list[LocalExpert] = []
        if progress is not None:
            progress("download", 0, len(experts))
        for done, e in enumerate(experts, start=1):
            downloaded = False
            if not self.holds(e.path, e.sha256):
                self.download(f"/v1/experts/{e.id}/model.onnx", e.sha256, e.path, what=f"expert {e.id}")
                downloaded = True
            local.append(dataclasses.replace(e, downloaded=downloaded))
            if progress is not None:
                progress("download", done, len(experts))
        return local

    def download(self, url_path: str, sha256: str, path: Path, *, what: str) -> None:
        """Stream ``url_path`` to ``path`` via a temp file, checking its sha256 (one retry)."""
        for attempt in (1, 2):
            try:
                atomic_write(path, lambda fh: self._stream_checked(url_path, sha256, fh, what=what))
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    def _stream_checked(self, url_path: str, sha256: str, fh: IO[bytes], *, what: str) -> None:
        digest = hashlib.sha256()
        with self.connection.exchange("GET", url_path, stream=True) as response:
            for chunk in response.iter_bytes(1 << 16):
                digest.update(chunk)
                fh.write(chunk)
        if digest.hexdigest() != sha256:
            raise IntegrityError(
                f"{what} downloaded from {self.connection.base_url}{url_path} has sha256 "
                f"{digest.hexdigest()[:16]}..., the server lists {sha256[:16]}...",
                hint="the file changed on the server or in transit; re-index the dataset or retry later",
            )
