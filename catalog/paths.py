"""Keep registered paths inside the configured data roots (``NDS_DATA_ROOTS``).

Paths are resolved through symlinks before the check, so neither ``..`` nor a symlink can
lead outside a root.
"""

from __future__ import annotations

import os
from pathlib import Path

from nds_client.errors import InvalidInputError


def within(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_in_roots(raw: str | os.PathLike[str], roots: list[Path], *, field: str = "path") -> Path:
    """The real absolute path of ``raw``; InvalidInputError if missing, unreadable or outside the roots."""
    text = os.fspath(raw)
    if not text or "\x00" in text:
        raise InvalidInputError("the path is empty or contains a NUL byte", field=field)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError as exc:
        raise InvalidInputError(f"{text} does not exist", field=field, hint="check the path") from exc
    except (OSError, RuntimeError) as exc:
        raise InvalidInputError(f"{text} cannot be resolved: {exc}", field=field) from exc
    if not within(real, roots):
        raise InvalidInputError(
            f"{text} is outside the data roots ({', '.join(map(str, roots))})",
            field=field,
            hint="move the data under a root or add its folder to NDS_DATA_ROOTS",
        )
    if not os.access(real, os.R_OK):
        raise InvalidInputError(f"{text} is not readable", field=field, hint="check its permissions")
    return real
