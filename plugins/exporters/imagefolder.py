"""``imagefolder``: a directory tree DEST/<label>/<file> that torchvision's ImageFolder and
FiftyOne read, made of symlinks (default) or copies of the manifest's images.

A sample drawn ``count`` times appears ``count`` times (``name``, ``name__1``, ...), so a
plain uniform pass over the tree honours the sampling. Unlabelled samples go under
``_unlabelled``. Built on the machine that trains, from a manifest file.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from catalog.errors import InvalidInputError
from plugins.exporters.base import Row

UNLABELLED = "_unlabelled"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(text: str) -> str:
    cleaned = _SAFE.sub("_", text).strip("._")
    return cleaned or "_"


def build_tree(rows: Iterable[Row], dest: Path, *, copy: bool = False) -> int:
    """Write the tree; returns the number of files. DEST must be empty or absent."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InvalidInputError(f"{dest} is not empty", field="output", hint="give a new or empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    made = 0
    for row in rows:
        src = Path(row["uri"])
        folder = dest / (_safe(str(row["label"])) if row.get("label") else UNLABELLED)
        folder.mkdir(exist_ok=True)
        stem = _safe(str(row["key"]).replace("/", "-"))
        for i in range(int(row.get("count", 1))):
            target = folder / (f"{stem}{src.suffix}" if i == 0 else f"{stem}__{i}{src.suffix}")
            if copy:
                shutil.copyfile(src, target)
            else:
                os.symlink(src, target)
            made += 1
    return made
