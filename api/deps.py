"""Request dependencies, as ``Annotated`` aliases so route signatures read like prose."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlmodel import Session

from catalog.context import CatalogContext
from catalog.jobs import Dispatcher


def get_ctx(request: Request) -> CatalogContext:
    return request.app.state.ctx


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


def get_session(ctx: Annotated[CatalogContext, Depends(get_ctx)]) -> Iterator[Session]:
    with Session(ctx.engine, expire_on_commit=False) as session:
        yield session


CtxDep = Annotated[CatalogContext, Depends(get_ctx)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
SessionDep = Annotated[Session, Depends(get_session)]
OffsetDep = Annotated[int, Query(ge=0, le=2**62, description="Rows to skip.")]
LimitDep = Annotated[int, Query(ge=1, le=1000, description="Rows to return (at most 1000).")]
