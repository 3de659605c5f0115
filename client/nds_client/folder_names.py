"""Labels and keys as file and folder names: injective, Unicode kept, portable.

The rule (:func:`label_folder_names`):

* the name is the label in Unicode NFC, letters of any script kept as they are;
* only what a file system cannot hold, or holds badly, is percent-encoded (the UTF-8 bytes
  of the character as ``%XX``): ``%`` itself, ``/ \\ < > : " | ? *``, control characters
  (``\\0``, tabs, newlines, DEL, ...), lone surrogates, leading and trailing spaces and
  dots (so ``.`` and ``..`` become ``%2E`` and ``%2E%2E``, and no label makes a hidden
  folder), and the first character of a Windows reserved name (``CON``, ``NUL.txt``,
  ``com1``, ...). Decoding the percent escapes gives the NFC label back;
* a name over 255 bytes of UTF-8 is cut and ends in ``~`` and 8 hex digits of the label's
  SHA-256;
* labels whose names would still be equal on some file system (equal once case-folded and
  Unicode-normalised: ``Cat`` and ``cat``, NFC and NFD spellings): the first of them (a
  label already in NFC before one that is not, then by code points) keeps the name, the
  next ones get ``~2``, ``~3``, ... whatever the order the labels come in;
* the unlabelled bucket is always ``_unlabelled``; a real label spelled so gets
  ``_unlabelled~2``.

Names are thus distinct for distinct labels, on case-sensitive and case-insensitive file
systems alike. Exporters that write folders also write the exact mapping (see
:mod:`nds_client.imagefolder`).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Hashable, Iterable

UNLABELLED = "_unlabelled"
MAX_BYTES = 255
_ESCAPED = frozenset('%/\\<>:"|?*')
_EDGE = " ."
_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{p}{d}" for p in ("COM", "LPT") for d in "0123456789\u00b9\u00b2\u00b3"]
)


def _quote(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))


def _needs_escape(ch: str) -> bool:
    return ch in _ESCAPED or unicodedata.category(ch) in ("Cc", "Cs")  # controls; lone surrogates


def encode_name(text: str, *, lead: bool = True, trail: bool = True) -> str:
    """``text`` (NFC) with what a file system cannot hold percent-encoded; see the module doc.

    ``lead``/``trail``: encode leading/trailing spaces and dots (off for the inner parts of
    a name that is put together from several).
    """
    text = unicodedata.normalize("NFC", text)
    parts = [_quote(c) if _needs_escape(c) else c for c in text]
    if lead:
        for i, c in enumerate(text):
            if c not in _EDGE:
                break
            parts[i] = _quote(c)
    if trail:
        for i in range(len(text) - 1, -1, -1):
            if text[i] not in _EDGE:
                break
            parts[i] = _quote(text[i])
    if lead and parts and text.split(".", 1)[0].rstrip(" ").upper() in _RESERVED:
        parts[0] = _quote(text[0])
    return "".join(parts)


def _cut(name: str, limit: int) -> str:
    """The longest prefix of ``name`` within ``limit`` bytes of UTF-8, no escape split."""
    out, size = [], 0
    for c in name:
        size += len(c.encode("utf-8"))
        if size > limit:
            break
        out.append(c)
    cut = "".join(out)
    if cut.endswith("%"):
        cut = cut[:-1]
    elif cut[-2:-1] == "%":
        cut = cut[:-2]
    return cut


def fit(name: str, tail: str = "", *, tag: str, limit: int = MAX_BYTES) -> str:
    """``name + tail`` within ``limit`` bytes; a longer one is cut and gets ``~`` + a hash of ``tag``."""
    if len((name + tail).encode("utf-8")) <= limit:
        return name + tail
    mark = "~" + hashlib.sha256(tag.encode("utf-8", "surrogatepass")).hexdigest()[:8] + tail
    return _cut(name, limit - len(mark.encode("utf-8"))) + mark


def fold(name: str) -> str:
    """The key under which two names are the same file on a case-insensitive, normalising file system."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def _text(label: Hashable) -> str:
    return label if isinstance(label, str) else str(label)


def label_folder_names(labels: Iterable[Hashable | None]) -> dict[Hashable | None, str]:
    """``{label: folder name}`` for the distinct labels given, injective (module doc).

    ``None`` and ``""`` both stand for "no label" (a CSV manifest cannot tell them apart)
    and map to :data:`UNLABELLED`.
    """
    real: set[Hashable] = set()
    out: dict[Hashable | None, str] = {}
    for label in labels:
        if label is None or label == "":
            out[label] = UNLABELLED
        else:
            real.add(label)
    taken = {fold(UNLABELLED)}
    base = {label: encode_name(_text(label)) for label in real}

    def rank(label: Hashable) -> tuple:
        text = _text(label)
        return (unicodedata.normalize("NFC", text) != text, text, type(label).__name__)

    groups: dict[str, list[Hashable]] = {}
    for label in real:
        groups.setdefault(fold(fit(base[label], tag=_text(label))), []).append(label)
    rest: list[Hashable] = []
    for key in sorted(groups):
        first, *others = sorted(groups[key], key=rank)
        if key in taken:
            rest.append(first)
        else:
            out[first] = fit(base[first], tag=_text(first))
            taken.add(key)
        rest.extend(others)
    for label in sorted(rest, key=lambda lab: (fold(base[lab]), *rank(lab))):
        n = 2
        while fold(name := fit(base[label], f"~{n}", tag=_text(label))) in taken:
            n += 1
        out[label] = name
        taken.add(fold(name))
    return out


class UniqueNames:
    """File names inside one folder, made distinct (also case-insensitively) with ``~2``, ``~3``, ..."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def make(self, stem: str, suffix: str = "") -> str:
        """A free name for ``stem + suffix``, both raw text (encoded here)."""
        head = encode_name(stem, trail=not suffix)
        tail = encode_name(suffix, lead=False) if suffix else ""
        if not stem:
            head = "_"
        name = fit(head, tail, tag=stem + suffix)
        n = 2
        while fold(name) in self.taken:
            name = fit(head, f"~{n}{tail}", tag=stem + suffix)
            n += 1
        self.taken.add(fold(name))
        return name
