"""Talking to an NDS server over HTTP: requests, paged listings and the rows they hold.

:class:`Connection` is the one place where httpx's errors and the server's error bodies
become the client's errors: an error status is a :class:`~nds_client.errors.ServerError`
carrying the JSON body's ``detail``, ``field`` and ``hint``; no answer (refused, unknown
host, timeout, a dropped connection) is a :class:`~nds_client.errors.ServerUnreachable`
naming the URL that failed and why.

A server's listings are not trusted to end or to hold what they should: paging stops at
the first short or empty page (never on the claimed ``count`` alone), a listing longer
than :data:`_MAX_ROWS` is an error, and every row is checked for the fields the client
relies on, with their JSON types, before anything reads it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from nds_client.errors import ClientInputError, NDSClientError, ServerError, ServerUnreachable

_PAGE = 1000  # rows asked for per page
_MAX_ROWS = 1_000_000  # a listing longer than this is taken for a server that never stops paging

#: a row's required fields: name -> its JSON type(s)
Fields = Mapping[str, type | tuple[type, ...]]

#: the fields of a GET /v1/experts row the client relies on, and their JSON types
EXPERT_FIELDS: Fields = {
    "id": int, "kind": str, "dataset_id": int, "cluster": (int, type(None)), "sha256": str, "input_size": int,
}
_TYPE_NAMES = {int: "an integer", str: "a string", type(None): "null"}


def _short(value: Any, limit: int = 60) -> str:
    """A JSON value for an error message, cut to ``limit`` characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_server_url(base_url: str) -> str:
    """``base_url`` without trailing slashes; ClientInputError unless it is an http(s) URL."""
    base_url = str(base_url).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", base_url):
        raise ClientInputError(f"server URL must start with http:// or https://, got {base_url!r}", field="server",
                               hint="e.g. http://127.0.0.1:8000")
    return base_url


class Connection:
    """An httpx client for one server: ``token`` is sent as ``Authorization: Bearer <token>``;
    ``transport`` is handed to httpx (tests, proxies)."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = check_server_url(base_url)
        self.timeout = timeout
        headers = {"User-Agent": "nds-client/0.1", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport, follow_redirects=True)

    def close(self) -> None:
        self._http.close()

    @contextmanager
    def exchange(self, method: str, path: str, *, params: dict | None = None, json_body: Any = None, stream: bool = False) -> Iterator[httpx.Response]:
        """Send one request and yield its successful response. The one place where httpx errors
        become client errors, with the URL that failed and why (also for errors raised while a
        streamed body is read inside the ``with`` block)."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        request = self._http.build_request(method, path, params=params, json=json_body)
        url = str(request.url)
        answered = False  # the status and headers came: a later transport error broke off the body
        try:
            response = self._http.send(request, stream=stream)
            try:
                if response.status_code >= 400:
                    response.read()
                    raise self._server_error(method, url, response)
                answered = True
                yield response
            finally:
                response.close()
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(
                f"{method} {url} failed: no answer within {self.timeout:g} s ({type(exc).__name__})",
                url=url, reason="timeout", hint="the server is slow or unreachable; retry, or raise the timeout",
            ) from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            reason = str(exc) or type(exc).__name__
            if answered and isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
                raise ServerError(
                    f"{method} {url}: the server broke off its answer part-way ({reason})", url=url, status_code=response.status_code,
                    detail=reason, hint="the server's log says why (for an export of images: a selected sample that could not be read); "
                                        "nothing was written; retry, or report it to the server's operator",
                ) from None
            raise ServerUnreachable(
                f"cannot reach the server: {method} {url} failed: {reason}",
                url=url, reason=reason, hint="check that `nds serve` is running there and that the URL (--server) is right",
            ) from None
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise NDSClientError(f"{method} {url} failed: {reason}", hint=None) from None

    @staticmethod
    def _server_error(method: str, url: str, response: httpx.Response) -> ServerError:
        detail, field_name, hint = None, None, None
        try:
            body = response.json()
            if isinstance(body, dict):
                detail, field_name, hint = body.get("detail"), body.get("field"), body.get("hint")
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            pass
        if not isinstance(detail, str):
            detail = json.dumps(detail) if detail is not None else (response.text.strip()[:300] or response.reason_phrase)
        if hint is None and response.status_code in (401, 403):
            hint = "the server needs a valid token: --token or NDS_TOKEN"
        return ServerError(
            f"{method} {url} answered {response.status_code} {response.reason_phrase}: {detail}",
            url=url, status_code=response.status_code, detail=detail, field=field_name, hint=hint,
        )

    def json(self, method: str, path: str, *, params: dict | None = None, json_body: Any = None) -> Any:
        """One request; its JSON body (ServerError when the body is not JSON)."""
        with self.exchange(method, path, params=params, json_body=json_body) as response:
            try:
                return response.json()
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                raise ServerError(
                    f"{method} {response.request.url} answered {response.status_code} with a body that is not JSON",
                    url=str(response.request.url), status_code=response.status_code, detail=response.text[:300],
                    hint="is this URL an NDS server?",
                ) from None

    def bad_listing(self, path: str, why: str) -> ServerError:
        """The error for a 200 answer whose body is not what an NDS server sends."""
        url = f"{self.base_url}{path}"
        return ServerError(f"GET {url} answered an unexpected body: {why}", url=url, status_code=200, detail=why,
                           hint="is this URL an NDS server, of a version this client speaks?")

    def pages(self, path: str, params: dict | None = None, *, fields: Fields | None = None) -> list[dict]:
        """Every row of a paged listing. Paging is bounded by what the server returns, never by
        its ``count`` alone: it stops at an empty page or one shorter than asked for, and a
        listing past :data:`_MAX_ROWS` rows is an error. Each row must be a JSON object whose
        ``fields`` (name -> type) are present with that type (ServerError naming the field)."""
        rows: list[dict] = []
        while True:
            page = self.json("GET", path, params={**(params or {}), "offset": len(rows), "limit": _PAGE})
            data = page.get("data") if isinstance(page, dict) else None
            if not isinstance(data, list):
                raise self.bad_listing(path, "no 'data' list")
            count = page.get("count", len(rows) + len(data))
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise self.bad_listing(path, f"'count' is {count!r}, not a row count")
            for i, row in enumerate(data, start=len(rows)):
                self.check_row(path, i, row, fields or {})
            rows.extend(data)
            if len(rows) > _MAX_ROWS:
                raise self.bad_listing(path, f"the listing did not end after {_MAX_ROWS:,} rows (it claims {count:,})")
            if len(data) < _PAGE or len(rows) >= count:
                return rows

    def listing(self, path: str, *, fields: Fields) -> list[dict]:
        """The ``data`` rows of an unpaged listing, each checked like those of :meth:`pages`."""
        body = self.json("GET", path)
        data = body.get("data", []) if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise self.bad_listing(path, "no 'data' list")
        for i, row in enumerate(data):
            self.check_row(path, i, row, fields)
        return data

    def check_row(self, path: str, i: int, row: Any, fields: Fields) -> None:
        """ServerError unless row ``i`` of ``path`` is an object with ``fields``, of their types."""
        if not isinstance(row, dict):
            raise self.bad_listing(path, f"row {i} is {type(row).__name__}, not an object")
        for name, kind in fields.items():
            if name not in row:
                raise self.bad_listing(path, f"row {i} has no {name!r}")
            kinds = kind if isinstance(kind, tuple) else (kind,)
            value = row[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON true is no id
                raise self.bad_listing(path, f"row {i} has {name!r} = {_short(value)}, not {' or '.join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)}")
