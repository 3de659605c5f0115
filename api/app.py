"""The FastAPI application, built by :func:`create_app` from settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlmodel import Session

from nds.api.dispatch import make_dispatcher
from nds.api.errors import install_error_handlers
from nds.api.hosts import AllowedHosts
from nds.api.limits import BodySizeLimit
from nds.api.routes import backbones, datasets, experts, jobs, keys, queries
from nds.api.schemas import Health
from nds.catalog.access import api_is_open
from nds.catalog.context import CatalogContext
from nds.catalog.db import current_revision
from nds.catalog.indexing import restore_interrupted_indexing
from nds.catalog.jobs import mark_interrupted
from nds.catalog.registration import remove_interrupted_registrations
from nds.catalog.settings import Settings, load_settings

log = logging.getLogger("nds.api")


def warn_if_open(ctx: CatalogContext) -> bool:
    """Log loudly when the API runs open (the catalog has never had a key); returns whether it does."""
    with Session(ctx.engine) as session:
        if not api_is_open(session=session, auth=ctx.settings.auth, admin_key=ctx.settings.admin_key):
            return False
    log.warning("the API is OPEN: no API key exists, so anyone who reaches it acts as an admin; "
                "create one with 'nds keys create --role admin --name NAME' to require keys")
    return True


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = CatalogContext.open(settings)
        if not settings.broker_url:
            # Embedded default: this process is the only job runner, so whatever was
            # running when it last stopped was interrupted; never leave half a dataset.
            stale = mark_interrupted(ctx, reason="interrupted: the server stopped while the job ran")
            removed = remove_interrupted_registrations(ctx)
            restored = restore_interrupted_indexing(ctx)
            if stale or removed or restored:
                log.warning("marked %d interrupted jobs failed; removed partial datasets %s; index jobs interrupted on %s",
                            len(stale), removed, restored)
        app.state.closed = not warn_if_open(ctx)
        app.state.ctx = ctx
        app.state.dispatcher = make_dispatcher(ctx)
        try:
            yield
        finally:
            app.state.dispatcher.close()
            ctx.close()

    app = FastAPI(
        title="Neural Data Server",
        version="0.1.0",
        summary="Which part of large source image collections should you pre-train on?",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AllowedHosts, allowed=settings.allowed_hosts)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(experts.router)
    app.include_router(backbones.router)
    app.include_router(queries.router)
    app.include_router(keys.router)

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        ctx: CatalogContext = app.state.ctx
        return Health(
            status="ok",
            mode="server" if settings.broker_url else "embedded",
            schema_revision=current_revision(ctx.engine),
        )

    return app
