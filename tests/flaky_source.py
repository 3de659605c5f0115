"""A source plugin for server-mode tests: an image folder whose storage is down once.

While the folder holds a ``.unavailable`` file, listing it removes that file and raises
:class:`ServiceUnavailableError` (what a source on a network share that is briefly gone
raises); the next listing works. Passed as ``tests.flaky_source:FlakySource``.
"""

from __future__ import annotations

from collections.abc import Iterator

from nds.plugins.contract import SourceItem
from nds.plugins.sources.imagefolder import ImageFolderSource
from nds_client.errors import ServiceUnavailableError

MARKER = ".unavailable"


class FlakySource(ImageFolderSource):
    name = "flaky"
    description = "an image folder whose storage is unavailable once after a .unavailable file appears"

    def items(self) -> Iterator[SourceItem]:
        try:
            (self.path / MARKER).unlink()
        except FileNotFoundError:
            return super().items()
        raise ServiceUnavailableError(f"the storage of {self.path} cannot be reached", hint="retry in a moment")
