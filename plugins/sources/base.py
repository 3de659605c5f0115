"""What a dataset source plugin is.

A source enumerates the items of a dataset (an absolute file path and an optional label)
without reading the images; the catalog reads, hashes and decodes them. Enumeration is
cheap and deterministic, so it runs once to validate a request and again in the job.
Structural problems (missing folder, missing columns, a malformed row) raise
:class:`~nds_client.errors.SourceError` naming the field and, for manifests, the line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


@dataclass(frozen=True)
class SourceItem:
    path: Path          # absolute, not yet resolved through symlinks
    label: str | None
    origin: str         # where it came from, for messages: a relative path or "line 12"


class Source(ABC):
    """One registered source: built from the user's path, yields items in a stable order."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def items(self) -> Iterator[SourceItem]:
        """Every candidate sample, in a stable order; raises SourceError on structural problems."""
