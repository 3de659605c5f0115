"""/v1/keys: API keys (admin only). The secret is in the creation answer and nowhere else."""

from __future__ import annotations

from fastapi import APIRouter, status

from nds.api.deps import AdminDep, CtxDep, IdPath, SessionDep
from nds.api.schemas import KeyCreate
from nds.catalog import access
from nds.catalog.db import session_scope
from nds.catalog.tables import ApiKeyCreated, ApiKeyPublic, ApiKeysPublic

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated)
def create_key(body: KeyCreate, ctx: CtxDep, _: AdminDep) -> ApiKeyCreated:
    """Create a key; the answer holds the secret, shown this once."""
    with session_scope(ctx.engine) as session:
        key, secret = access.create_key(session=session, name=body.name, role=body.role)
        return ApiKeyCreated(**ApiKeyPublic.model_validate(key).model_dump(), key=secret)


@router.get("", response_model=ApiKeysPublic)
def list_keys(session: SessionDep, _: AdminDep, include_revoked: bool = False) -> ApiKeysPublic:
    keys = access.list_keys(session=session, include_revoked=include_revoked)
    return ApiKeysPublic(data=[ApiKeyPublic.model_validate(k) for k in keys], count=len(keys))


@router.delete("/{key_id}", response_model=ApiKeyPublic)
def revoke_key(key_id: IdPath, ctx: CtxDep, _: AdminDep) -> ApiKeyPublic:
    """Revoke a key: it stops working at once and loses its dataset grants."""
    with session_scope(ctx.engine) as session:
        return ApiKeyPublic.model_validate(access.revoke_key(session=session, ref=key_id))
