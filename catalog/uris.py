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
from typing import Any

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


# --------------------------------------------------------------------------- columns of uris (manifests)

#: an object-storage uri: a scheme of two or more characters other than ``file`` (what is_remote says)
_REMOTE = r"^[A-Za-z][A-Za-z0-9+.\-]+://"


def uri_column_view(principal: Principal, roots: Sequence[Path], public: Mapping[Path, str]) -> Callable[[Any], Any]:
    """:func:`uri_view` over a pyarrow string array (nulls stay null): the same text as the
    function applied to each value, computed with pyarrow's string kernels. Object-storage uris
    and plain absolute paths under a data root (no empty or ``.`` component, no trailing slash:
    paths PurePosixPath leaves as they are), under a root or under none (the file name), are
    decided column-wise; any other value (``file://``, unusual paths) goes through
    :func:`client_uri` one by one."""
    if principal.is_admin:
        return lambda column: column
    import pyarrow as pa
    import pyarrow.compute as pc

    # innermost root first: the one _relative picks (the longest str(root); ties: the first listed)
    ordered = sorted(enumerate(roots), key=lambda item: (-len(str(item[1])), item[0]))
    rules = [(str(PurePosixPath(root)), public.get(root)) for _, root in ordered]

    def view(column: Any) -> Any:  # noqa: ANN401 - a pyarrow StringArray in, one out
        if len(column) == column.null_count:  # empty, or all null (the shard column of files)
            return column
        text = pc.fill_null(column, "")
        done = pc.or_(pc.is_null(column), pc.and_(pc.match_substring_regex(text, _REMOTE), pc.invert(pc.starts_with(text, "file://"))))
        plain = pc.and_(pc.starts_with(text, "/"), pc.invert(pc.or_(
            pc.or_(pc.match_substring(text, "//"), pc.match_substring(text, "/./")),
            pc.or_(pc.ends_with(text, "/"), pc.ends_with(text, "/.")))))
        out = column  # nulls and object-storage uris as they are; every other value is replaced below
        for root, base in rules:
            if root == "/":
                inside = plain
            else:
                inside = pc.and_(plain, pc.or_(pc.equal(text, root), pc.starts_with(text, root + "/")))
            inside = pc.and_(inside, pc.invert(done))
            if not pc.any(inside).as_py():
                continue
            rel = pc.utf8_slice_codeunits(text, 1 if root == "/" else len(root) + 1)  # '' for the root itself ('.')
            if base is None:
                shown = rel
            else:
                prefix = base.rstrip("/")
                shown = pc.if_else(pc.equal(rel, ""), pa.scalar(prefix), pc.binary_join_element_wise(prefix, rel, "/"))
            out = pc.if_else(inside, shown, out)
            done = pc.or_(done, inside)
        outside = pc.and_(plain, pc.invert(done))  # under no root: the file name alone, as client_uri shows it
        if pc.any(outside).as_py():
            out = pc.if_else(outside, pc.replace_substring_regex(text, "^.*/", ""), out)
            done = pc.or_(done, outside)
        rest = pc.invert(done)
        if pc.any(rest).as_py():
            values = pc.filter(column, rest).to_pylist()
            out = pc.replace_with_mask(out, rest, pa.array([client_uri(v, roots, public) for v in values], pa.string()))
        return out

    return view
