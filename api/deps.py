"""Request dependencies, as ``Annotated`` aliases so route signatures read like prose."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session

from nds.api.hosts import SAFE_METHODS, host_name, origin_trusted, trusted
from nds.catalog.access import LOCAL, MAX_ID, Principal, api_is_open, authenticate, require_admin
from nds.catalog.context import CatalogContext
from nds.catalog.jobs import Dispatcher
from nds_client.errors import AuthenticationError

log = logging.getLogger("nds.api")


# dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` one in the
# thread pool, a hop between threads per request for what is an attribute read

async def get_ctx(request: Request) -> CatalogContext:
    return request.app.state.ctx


async def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


def _request_session(engine: Engine) -> Iterator[Session]:
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
    finally:
        try:
            session.close()
        except DBAPIError:
            # the connection died under the request (the database restarted): the pool
            # discards it; failing here, after the answer was made, would drop the answer
            log.info("discarded a catalog connection that died during a request", exc_info=True)


def get_session(ctx: Annotated[CatalogContext, Depends(get_ctx)]) -> Iterator[Session]:
    yield from _request_session(ctx.engine)


def get_read_session(ctx: Annotated[CatalogContext, Depends(get_ctx)]) -> Iterator[Session]:
    """A session for routes that only read (autocommit: no transaction round trips)."""
    yield from _request_session(ctx.autocommit_engine)


CtxDep = Annotated[CatalogContext, Depends(get_ctx)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
SessionDep = Annotated[Session, Depends(get_session)]
IdPath = Annotated[int, Path(ge=0, le=MAX_ID, description="A catalog id.")]
OffsetDep = Annotated[int, Query(ge=0, le=2**62, description="Rows to skip.")]
LimitDep = Annotated[int, Query(ge=1, le=1000, description="Rows to return (at most 1000).")]


# --------------------------------------------------------------------------- who is asking

bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer nds_...` (`nds keys create`).")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same API key, in a header of its own.")


KEY_HINT = "send it as 'Authorization: Bearer <key>' (nds: --token or NDS_TOKEN); an admin creates keys with 'nds keys create'"


def get_principal(
    request: Request,
    ctx: CtxDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    api_key: Annotated[str | None, Depends(api_key_scheme)],
) -> Principal:
    """The key's principal; without a key, LOCAL while the API runs open (the catalog has
    never had a key), and only for requests addressed to a trusted host (nds.api.hosts).

    Once this process has seen the API closed it never opens again, whatever the rows say."""
    secret = bearer.credentials if bearer is not None else api_key
    state = request.app.state
    with Session(ctx.autocommit_engine) as session:
        if secret:
            return authenticate(session=session, secret=secret, admin_key=ctx.settings.admin_key_value)
        if getattr(state, "closed", False) or not api_is_open(session=session, auth=ctx.settings.auth, admin_key=ctx.settings.admin_key):
            state.closed = True
            raise AuthenticationError("an API key is required", hint=KEY_HINT)
    allowed = [h for h in ctx.settings.allowed_hosts if h != "*"]  # open mode trusts only named hosts, never "any"
    host = host_name(request.headers.get("host", ""))
    if not trusted(host, allowed):
        raise AuthenticationError(f"an API key is required for requests addressed to {host!r}",
                                  hint="the open API serves only loopback hosts and NDS_ALLOWED_HOSTS; " + KEY_HINT)
    if request.method not in SAFE_METHODS and not origin_trusted(request.headers.get("origin"), allowed):
        raise AuthenticationError("an API key is required for requests from another site's page",
                                  hint="the open API accepts changes only from loopback origins and NDS_ALLOWED_HOSTS; " + KEY_HINT)
    return LOCAL


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_admin(request: Request, principal: PrincipalDep) -> Principal:
    require_admin(principal, f"{request.method} {request.url.path}")
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]
