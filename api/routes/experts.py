"""/v1/experts: the ONNX networks clients download and run on their own images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse

from nds.api.deps import MAX_ID, CtxDep, IdPath, LimitDep, OffsetDep, PrincipalDep, SessionDep
from nds.api.files import ONNX_RESPONSES, file_with_etag
from nds.catalog.experts import get_expert, list_experts
from nds.catalog.tables import ExpertKind, ExpertPublic, ExpertsPublic

router = APIRouter(prefix="/v1/experts", tags=["experts"])


@router.get("", response_model=ExpertsPublic)
def experts(
    session: SessionDep,
    principal: PrincipalDep,
    dataset: Annotated[int | None, Query(ge=0, le=MAX_ID, description="Only this dataset's experts.")] = None,
    kind: Annotated[ExpertKind | None, Query(description="rotation or classifier.")] = None,
    offset: OffsetDep = 0,
    limit: LimitDep = 1000,
) -> ExpertsPublic:
    """Experts of every dataset's active index version."""
    rows, count = list_experts(session=session, dataset_id=dataset, kind=kind, offset=offset, limit=limit, principal=principal)
    return ExpertsPublic(data=[ExpertPublic.model_validate(e) for e in rows], count=count)


@router.get("/{expert_id}", response_model=ExpertPublic)
def expert(expert_id: IdPath, session: SessionDep, principal: PrincipalDep) -> ExpertPublic:
    return ExpertPublic.model_validate(get_expert(session=session, expert_id=expert_id, principal=principal))


@router.get("/{expert_id}/model.onnx", response_class=FileResponse, responses=ONNX_RESPONSES)
def expert_model(
    expert_id: IdPath,
    session: SessionDep,
    ctx: CtxDep,
    principal: PrincipalDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The expert's ONNX file; the ETag is its sha256."""
    found = get_expert(session=session, expert_id=expert_id, principal=principal)
    return file_with_etag(ctx.artifacts.open_path(found.artifact), sha256=found.sha256, filename=f"expert-{found.id}.onnx",
                          if_none_match=if_none_match)
