"""``imagefolder``: PATH/<label>/<image>, the layout torchvision's ImageFolder reads.

Files directly under PATH get no label. Hidden files and folders are ignored; files whose
suffix is not an image suffix are still yielded so the catalog can count them as skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from nds.plugins.contract import Source, SourceError, SourceItem


class ImageFolderSource(Source):
    name = "imagefolder"
    description = "a folder with one sub-folder per label: PATH/<label>/<image>"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        if not path.is_dir():
            raise SourceError(f"{path} is not a folder", field="path", hint="imagefolder sources are folders of PATH/<label>/<image>")

    def items(self) -> Iterator[SourceItem]:
        try:
            entries = [e for e in os.scandir(self.path) if not e.name.startswith(".")]
        except OSError as exc:
            raise SourceError(f"cannot read {self.path}: {exc.strerror}", field="path") from exc
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_dir():
                yield from self._walk(Path(entry.path), label=entry.name, rel=entry.name)
            elif entry.is_file():
                yield SourceItem(Path(entry.path), None, entry.name)

    def _walk(self, folder: Path, *, label: str, rel: str) -> Iterator[SourceItem]:
        try:
            entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as exc:
            raise SourceError(f"cannot read {folder}: {exc.strerror}", field="path") from exc
        for entry in entries:
            if entry.is_dir():
                yield from self._walk(Path(entry.path), label=label, rel=f"{rel}/{entry.name}")
            else:
                yield SourceItem(Path(entry.path), label, f"{rel}/{entry.name}")
