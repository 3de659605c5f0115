"""What every ``nds`` command shares: the two consoles and how errors reach the user."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from rich.console import Console

from catalog.errors import NDSError, ServiceUnavailableError

out = Console()
err = Console(stderr=True)


def fail(message: str, hint: str | None = None, code: int = 1) -> typer.Exit:
    """Print an error (and what to do) on stderr; raise the returned Exit."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    if hint:
        err.print(f"[yellow]hint:[/] {hint}", highlight=False)
    return typer.Exit(code)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The project's errors (the client's included) become a message on stderr and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NDSError as exc:
            raise fail(exc.message, exc.hint) from None
        except Exception as exc:
            unavailable = _database_unavailable(exc)
            if unavailable is None:
                raise
            raise fail(unavailable.message, unavailable.hint) from None

    return wrapper


def _database_unavailable(exc: Exception) -> ServiceUnavailableError | None:
    """The catalog database's connection errors, translated; the client commands never load
    SQLAlchemy, so nothing is imported for them."""
    if "sqlalchemy" not in sys.modules:
        return None
    from catalog.db import unavailable_database

    return unavailable_database(exc)
