"""``imagefolder``: a directory tree DEST/<label>/<file> that torchvision's ImageFolder and
FiftyOne read, made of symlinks (default) or copies of the manifest's images; what
``nds-client query --format imagefolder`` writes. A sample inside a container (a tar
member, a Parquet row: the row has a ``shard``) has no file to link: its bytes are read
through :func:`nds_client.storage.read_location` (one ranged read, local or object
storage) and written, under the member's suffix (a Parquet image's from its bytes).

Folder names come from :func:`nds_client.folder_names.label_folder_names`: one folder per
distinct label, the label's Unicode kept, only what a file system cannot hold
percent-encoded, collisions (``Cat``/``cat`` on a case-insensitive disk, over-long labels)
told apart with ``~2``/a hash. Unlabelled samples go under ``_unlabelled``. ``labels.json``
beside the folders maps each folder name to its exact label (``null`` for unlabelled), in
the sorted order that ImageFolder gives class indices::

    ds = torchvision.datasets.ImageFolder(DEST)
    exact = json.loads((DEST / "labels.json").read_text(encoding="utf-8"))
    label_of_class = [exact[name] for name in ds.classes]

A sample drawn ``count`` times appears ``count`` times (``name``, ``name__1``, ...), so a
plain uniform pass over the tree honours the sampling; file names come from the row's key
(``dataset/id`` as ``dataset-id``) and are made distinct within a folder (``~2``, ...), so
no two rows overwrite each other. Built on the machine that trains, from a manifest file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from nds_client.errors import InvalidInputError
from nds_client.folder_names import UNLABELLED, UniqueNames, label_folder_names
from nds_client.manifests import Row, image_suffix
from nds_client.storage import Location, is_remote, read_location

__all__ = ["LABELS_FILE", "UNLABELLED", "JsonlRows", "build_tree", "label_folder_names"]

LABELS_FILE = "labels.json"

class JsonlRows:
    """The rows of a .jsonl manifest, read afresh on each pass (:func:`build_tree` makes two)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __iter__(self) -> Iterator[Row]:
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _shard(row: Row) -> str | None:
    shard = row.get("shard")
    return None if shard is None or shard == "" else str(shard)


def _int(value: Any) -> int | None:  # a CSV cell or an int
    return None if value is None or value == "" else int(value)


def _label(row: Row) -> object:
    label = row.get("label")
    return None if label is None or label == "" else label


def build_tree(rows: Iterable[Row], dest: Path, *, copy: bool = False, data_root: Path | None = None) -> int:
    """Write the tree and ``labels.json``; returns the number of image files. DEST must be empty or absent.

    A client key's manifest names files relative to the server's data roots
    (``nds.catalog.uris``): ``data_root`` is where this machine sees that root; without it
    such a manifest is refused before anything is written (remote uris always are).

    ``rows`` is read twice (labels first, so that folder names do not depend on row
    order); a one-pass iterator is held in memory, a list or :class:`JsonlRows` is not.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InvalidInputError(f"{dest} is not empty", field="output", hint="give a new or empty folder")
    if iter(rows) is rows:
        rows = list(rows)
    for row in rows:
        uri = str(row["uri"])
        if not _shard(row) and "://" in uri and not uri.startswith("file://"):
            raise InvalidInputError(f"the manifest names a remote file ({uri.split('://')[0]}://...)", field="format",
                                    hint="an imagefolder tree links local files: export csv/jsonl/parquet and read it with your loader")
        if not is_remote(uri) and not Path(_local(uri)).is_absolute() and data_root is None:
            raise InvalidInputError("the manifest names files relative to the server's data roots", field="data_root",
                                    hint="pass --data-root with the folder where this machine sees the server's data root")
    folders = label_folder_names({_label(row) for row in rows})
    dest.mkdir(parents=True, exist_ok=True)
    names: dict[str, UniqueNames] = {}
    made = 0
    for row in rows:
        uri = str(row["uri"])
        src = Path(_local(uri))
        if not src.is_absolute() and data_root is not None:  # relative uris without a data root were refused above
            src = Path(data_root) / src
        data: bytes | None = None
        suffix = src.suffix
        shard = _shard(row)
        if shard:  # a tar member or a Parquet row: no file to link, the bytes are written
            if not is_remote(shard) and not Path(_local(shard)).is_absolute() and data_root is not None:
                shard = str(Path(data_root) / _local(shard))
            data = read_location(Location(uri, shard, _int(row.get("offset")), _int(row.get("size"))))
            suffix = image_suffix(row, data)
        folder_name = folders[_label(row)]
        folder = dest / folder_name
        if folder_name not in names:
            folder.mkdir(exist_ok=True)
            names[folder_name] = UniqueNames()
        taken = names[folder_name]
        stem = str(row["key"]).replace("/", "-")
        for i in range(int(row.get("count", 1))):
            target = folder / taken.make(stem if i == 0 else f"{stem}__{i}", suffix)
            if data is not None:
                target.write_bytes(data)
            elif copy:
                shutil.copyfile(src, target)
            else:
                os.symlink(src, target)
            made += 1
    exact = {name: label for label, name in folders.items() if name in names}
    (dest / LABELS_FILE).write_text(json.dumps(dict(sorted(exact.items())), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return made
