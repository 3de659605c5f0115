"""/v1/backbones: the embedding spaces of the indexed datasets, and their ONNX files."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Response
from fastapi.responses import FileResponse

from api.deps import CtxDep, PrincipalDep, SessionDep
from catalog.spaces import list_spaces, space_model

router = APIRouter(prefix="/v1/backbones", tags=["backbones"])


@router.get("")
def backbones(session: SessionDep, ctx: CtxDep, principal: PrincipalDep) -> dict:
    """Each space: version, dim, input_size, mean, std, sha256, byte_size, downloadable, datasets."""
    spaces = list_spaces(ctx, session=session, principal=principal)
    return {"data": spaces, "count": len(spaces)}


@router.get(
    "/{version}/model.onnx",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {"description": "Not modified (If-None-Match)"}},
)
def backbone_model(
    version: Annotated[str, Path(max_length=200)],
    session: SessionDep,
    ctx: CtxDep,
    principal: PrincipalDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The backbone's ONNX file (embeds images into the space); the ETag is its sha256."""
    path, space = space_model(ctx, version, session=session, principal=principal)
    etag = f'"{space["sha256"]}"'
    if if_none_match and etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(path, media_type="application/octet-stream", filename=f"backbone-{version}.onnx",
                        headers={"ETag": etag, "X-Content-SHA256": space["sha256"]})
