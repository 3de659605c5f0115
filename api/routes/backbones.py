"""/v1/backbones: the embedding spaces of the indexed datasets, and their ONNX files."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Response
from fastapi.responses import FileResponse

from nds.api.deps import CtxDep, PrincipalDep, SessionDep
from nds.api.files import ONNX_RESPONSES, file_with_etag
from nds.catalog.spaces import list_spaces, space_model

router = APIRouter(prefix="/v1/backbones", tags=["backbones"])


@router.get("")
def backbones(session: SessionDep, ctx: CtxDep, principal: PrincipalDep) -> dict:
    """Each space: version, dim, input_size, mean, std, sha256, byte_size, downloadable, datasets."""
    spaces = list_spaces(ctx, session=session, principal=principal)
    return {"data": spaces, "count": len(spaces)}


@router.get("/{version}/model.onnx", response_class=FileResponse, responses=ONNX_RESPONSES)
def backbone_model(
    version: Annotated[str, Path(max_length=200)],
    session: SessionDep,
    ctx: CtxDep,
    principal: PrincipalDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The backbone's ONNX file (embeds images into the space); the ETag is its sha256."""
    path, space = space_model(ctx, version, session=session, principal=principal)
    return file_with_etag(path, sha256=space["sha256"], filename=f"backbone-{version}.onnx", if_none_match=if_none_match)
