"""What every ``nds`` and ``nds-client`` command shares: the two consoles, how errors reach
the user, and how text the CLI did not write itself is printed.

Names, labels, descriptions, file names, job errors and whatever a server sends are
untrusted: printed as they are, rich would render their ``[markup]`` (a ``[link=...]``
among them) and the terminal would obey their escape sequences. :func:`safe` makes such
text inert, :class:`SafeTable` applies it to every title, header and cell, and
:func:`fail` to every error message and hint.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from nds_client.errors import NDSError

out = Console()
err = Console(stderr=True)

# C0 controls, DEL, C1 controls (0x9b is a one-byte CSI) and the bidirectional overrides;
# whitespace controls become a space, the rest are dropped
_WHITESPACE = re.compile(r"[\t\n\v\f\r\u0085\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(value: object) -> str:
    """``value`` as text with no character a terminal would interpret: control characters
    (ESC, BEL, CSI, OSC, backspace, ...) and bidirectional overrides removed, tabs and
    line breaks turned into spaces."""
    return _CONTROL.sub("", _WHITESPACE.sub(" ", str(value)))


def safe(value: object) -> str:
    """Untrusted ``value``, ready to go into a rich string: :func:`clean`, then its markup
    escaped so that ``[bold]`` or ``[link=...]`` shows as written."""
    return escape(clean(value))


class SafeTable(Table):
    """A rich table for text from elsewhere: its title, caption, headers and string cells go
    through :func:`safe` (pass a rich ``Text`` for a styled cell, built from :func:`clean`)."""

    def __init__(self, *headers: Any, title: Any = None, caption: Any = None, **kwargs: Any) -> None:
        super().__init__(*headers, title=_safe_str(title), caption=_safe_str(caption), **kwargs)

    def add_column(self, header: Any = "", *args: Any, **kwargs: Any) -> None:
        super().add_column(_safe_str(header), *args, **kwargs)

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        super().add_row(*(_safe_str(r) for r in renderables), **kwargs)


def _safe_str(value: Any) -> Any:
    return safe(value) if isinstance(value, str) else value


def fail(message: str, hint: str | None = None, code: int = 1) -> typer.Exit:
    """Print an error (and what to do) on stderr; raise the returned Exit. Both texts are
    printed through :func:`safe`: they often quote names and what a server answered."""
    err.print(f"[bold red]error:[/] {safe(message)}", highlight=False)
    if hint:
        err.print(f"[yellow]hint:[/] {safe(hint)}", highlight=False)
    return typer.Exit(code)


#: turns an exception the project did not raise on purpose into (message, hint), or None
Translator = Callable[[Exception], "tuple[str, str | None] | None"]


def error_handler(*translators: Translator) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator for commands: the project's errors (the client's included) become a message
    on stderr and exit status 1, and so does any exception one of ``translators`` recognises
    (the server's CLI adds its own: invalid settings, an unreachable catalog database)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except NDSError as exc:
                raise fail(exc.message, exc.hint) from None
            except Exception as exc:
                for translate in translators:
                    translated = translate(exc)
                    if translated is not None:
                        raise fail(*translated) from None
                raise

        return wrapper

    return decorate


#: the client's commands: only the project's own errors are expected
handles_errors = error_handler()
