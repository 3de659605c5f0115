"""Map the project's exceptions to HTTP answers: always JSON, always naming what to do.

Body shape for every error: ``{"detail": message, "field": name|null, "hint": text|null}``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nds.catalog.db import unavailable_database
from nds_client.errors import (
    AuthenticationError,
    ConflictError,
    GoneError,
    InvalidInputError,
    NDSError,
    NotFoundError,
    PermissionDeniedError,
    PluginError,
    ServiceUnavailableError,
    StorageFullError,
    VectorStoreBusyError,
)

log = logging.getLogger("nds.api")

STATUS_BY_ERROR: list[tuple[type[NDSError], int]] = [
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (GoneError, 410),
    (InvalidInputError, 422),
    (PluginError, 422),
    (ServiceUnavailableError, 503),
    (VectorStoreBusyError, 503),
    (StorageFullError, 503),  # the server's disk or quota is full: retry later (Retry-After), no path in the body
]


def status_for(exc: NDSError) -> int:
    for cls, code in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return code
    return 500


def error_body(detail: str, *, field: str | None = None, hint: str | None = None) -> dict:
    return {"detail": detail, "field": field, "hint": hint}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NDSError)
    async def _nds_error(_: Request, exc: NDSError) -> JSONResponse:
        field = getattr(exc, "field", None)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers = {**(headers or {}), "Retry-After": str(retry_after)}
        return JSONResponse(status_code=status_for(exc), content=error_body(exc.message, field=field, hint=exc.hint), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg', 'invalid value')}" if field else first.get("msg", "invalid request")
        body = error_body(message, field=field, hint="see the OpenAPI docs at /docs")
        body["errors"] = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
        return JSONResponse(status_code=422, content=body)

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        unavailable = unavailable_database(exc)
        if unavailable is None:
            return await _unexpected(request, exc)
        return JSONResponse(status_code=503, content=error_body(unavailable.message, hint=unavailable.hint), headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(status_code=500, content=error_body(f"internal error ({type(exc).__name__})", hint="the server log has the details"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content=error_body(str(exc.detail)), headers=exc.headers)
