"""``imagefolder``: PATH/<label>/<image>, the layout torchvision's ImageFolder reads, local or in object storage.

Files directly under PATH get no label. Hidden files and folders are ignored; files whose
suffix is not an image suffix are still yielded so the catalog can count them as skipped.
Its parts are its files: ``nds datasets sync`` registers the files added since and drops
the ones removed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from nds.plugins.contract import Source, SourceError, SourceItem


class ImageFolderSource(Source):
    name = "imagefolder"
    description = "a folder (local or s3://) with one sub-folder per label: PATH/<label>/<image>"

    def __init__(self, location: str, env, **options: str) -> None:  # noqa: ANN001 - SourceEnv
        super().__init__(location, env, **options)
        if not env.is_dir(location):
            raise SourceError(f"{location} is not a folder", field="path", hint="imagefolder sources are folders of PATH/<label>/<image>")
        self._files: list[str] | None = None

    def parts(self) -> list[str]:
        if self._files is None:
            self._files = self.env.list_files(self.location)
        return list(self._files)

    def items(self, parts: Sequence[str] | None = None) -> Iterator[SourceItem]:
        base = self.location.rstrip("/") + "/"
        wanted = set(parts) if parts is not None else None
        for uri in self.parts():
            if wanted is not None and uri not in wanted:
                continue
            rel = uri[len(base):] if uri.startswith(base) else uri.rsplit("/", 1)[-1]
            label, sep, _ = rel.partition("/")
            yield SourceItem(uri, label if sep else None, rel)
