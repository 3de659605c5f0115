"""Which Host (and Origin) headers the API answers to.

A browser sends the Host it was pointed at, so a page on ``rebind.attacker.example`` whose
name the attacker re-points at 127.0.0.1 (DNS rebinding) reaches a server on loopback
with its own name in ``Host`` and ``Origin``. Loopback names, and the names an operator
lists in ``NDS_ALLOWED_HOSTS``, are the only ones trusted:

- with ``NDS_ALLOWED_HOSTS`` set, every request must be addressed to one of them (400);
- in open mode (no key has ever existed) a request acts as the operator only when its
  ``Host`` is trusted and, for a state-changing method, its ``Origin`` (when sent) too;
  anything else needs a key (401).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from nds.api.errors import error_body

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_name(value: str) -> str:
    """The name of a ``Host`` header or URL authority, lower-cased, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :] if end > 0 else ""
        if end > 0 and (rest == "" or (rest.startswith(":") and rest[1:].isdigit())):
            return value[1:end]
        return value
    name, sep, port = value.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else value


def is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def trusted(name: str, allowed: Iterable[str]) -> bool:
    allowed = list(allowed)
    return bool(name) and (is_loopback(name) or "*" in allowed or name in allowed)


def origin_trusted(origin: str | None, allowed: Iterable[str]) -> bool:
    """No ``Origin`` (not a browser, or a same-origin GET) is trusted; ``null`` is not."""
    if origin is None:
        return True
    parts = urlsplit(origin.strip())
    return parts.scheme in ("http", "https") and trusted(host_name(parts.netloc), allowed)


class AllowedHosts:
    """ASGI middleware: 400 for a request whose Host is neither loopback nor listed (only
    when ``NDS_ALLOWED_HOSTS`` is set; without it, open mode's own check applies)."""

    def __init__(self, app: ASGIApp, *, allowed: list[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.allowed:
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if trusted(host_name(host), self.allowed):
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        response = JSONResponse(
            status_code=400,
            content=error_body(f"this server does not answer to host {host_name(host)!r}", field="Host",
                               hint="address it by a name listed in NDS_ALLOWED_HOSTS"),
        )
        await response(scope, receive, send)
