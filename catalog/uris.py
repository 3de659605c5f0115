"""What a sample's or dataset's ``uri`` looks like to whoever asks.

The catalog stores absolute uris (resolved paths under ``NDS_DATA_ROOTS``): the server
reads them, and so do its operators. A **client key** is not told the server's
filesystem layout: it sees each uri relative to the data root that holds it
(``/srv/data/photos/cat/1.png`` under root ``/srv/data`` reads ``photos/cat/1.png``), or,
where the operator maps that root to a public base in ``NDS_PUBLIC_URIS``
(``/srv/data=s3://bucket/data``), under that base (``s3://bucket/data/photos/cat/1.png``),
which is what a client's loader can open. Admin keys and the operator (open mode, the
CLI) see the stored uri.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from nds.catalog.access import Principal
from nds_client.storage import is_remote


def _relative(uri: str, roots: Sequence[Path]) -> tuple[Path, str] | None:
    path = PurePosixPath(uri[len("file://"):] if uri.startswith("file://") else uri)
    best: tuple[Path, str] | None = None
    for root in roots:
        try:
            rel = path.relative_to(PurePosixPath(root))
        except ValueError:
            continue
        if best is None or len(str(root)) > len(str(best[0])):  # the innermost root wins
            best = (root, rel.as_posix())
    return best


def client_uri(uri: str, roots: Sequence[Path], public: Mapping[Path, str]) -> str:
    """``uri`` as a client key sees it (see the module docstring); a uri under no data root
    (never stored by registration) shows only its file name. Object-storage uris are
    addresses a loader opens with its own credentials: they are shown as they are."""
    if is_remote(uri):
        return uri
    found = _relative(uri, roots)
    if found is None:
        return PurePosixPath(uri).name
    root, rel = found
    base = public.get(root)
    if base is None:
        return rel if rel != "." else ""
    return base.rstrip("/") + ("/" + rel if rel != "." else "")


def uri_view(principal: Principal, roots: Sequence[Path], public: Mapping[Path, str]) -> Callable[[str], str]:
    """The function that shows uris to ``principal``."""
    if principal.is_admin:
        return lambda uri: uri
    return lambda uri: client_uri(uri, roots, public)
