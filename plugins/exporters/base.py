"""What a manifest exporter is.

An exporter turns chunks of manifest rows (dicts with the columns key, uri, label,
dataset, cluster, weight, count) into bytes, chunk by chunk, so a manifest of any size
streams with bounded memory. Register one under the ``nds.exporters`` entry-point group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

COLUMNS = ("key", "uri", "label", "dataset", "cluster", "weight", "count")
Row = dict[str, Any]


class Exporter(ABC):
    name: ClassVar[str]
    media_type: ClassVar[str]
    suffix: ClassVar[str]

    @abstractmethod
    def stream(self, chunks: Iterable[list[Row]]) -> Iterator[bytes]:
        """Bytes of the file, produced chunk by chunk."""
