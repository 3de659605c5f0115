"""/v1/queries and /v1/search: weighted retrieval, manifests, similarity search."""

from __future__ import annotations

import itertools
from typing import Annotated

from fastapi import APIRouter, status
from fastapi import Query as Q
from fastapi.responses import Response, StreamingResponse

from nds.api.deps import CtxDep, LimitDep, OffsetDep, PrincipalDep, ReadSessionDep
from nds.api.schemas import QueryBody, QueryPublic, SearchBody, SearchResult
from nds.catalog.retrieval.manifest import ImageReader, iter_manifest, iter_manifest_batches
from nds.catalog.retrieval.queries import get_query, run_query
from nds.catalog.retrieval.request import QueryRequest
from nds.catalog.retrieval.search import search
from nds.plugins.contract import Exporter
from nds_client.errors import InvalidInputError, PluginError

router = APIRouter(tags=["queries"])

#: a manifest of at most this many rows is written whole in the request's thread and sent as one
#: body (a few MB at most); larger ones stream chunk by chunk with bounded memory
WHOLE_BODY_ROWS = 20_000


@router.post("/v1/queries", status_code=status.HTTP_201_CREATED, response_model=QueryPublic)
def create_query(body: QueryBody, ctx: CtxDep, principal: PrincipalDep) -> QueryPublic:
    """Turn expert scores and label priors into weights and sample a budget (see README: the weights)."""
    query = run_query(ctx, QueryRequest(**body.model_dump()), principal=principal)
    return QueryPublic.model_validate(query, from_attributes=True)


@router.get("/v1/queries/{query_id}", response_model=QueryPublic)
def show_query(query_id: str, session: ReadSessionDep, principal: PrincipalDep) -> QueryPublic:
    return QueryPublic.model_validate(get_query(session=session, query_id=query_id, principal=principal), from_attributes=True)


@router.get("/v1/queries/{query_id}/samples")
def query_samples(query_id: str, session: ReadSessionDep, ctx: CtxDep, principal: PrincipalDep, offset: OffsetDep = 0, limit: LimitDep = 100) -> dict:
    """A page of the selected samples (the manifest's rows)."""
    query = get_query(session=session, query_id=query_id, principal=principal)
    session.close()  # hand its connection back: the rows take their own, and a request holds one at a time
    rows = [r for batch in iter_manifest_batches(ctx, query, offset=offset, limit=limit, principal=principal) for r in Exporter.rows_of(batch)]
    return {"data": rows, "count": query.summary["unique_samples"]}


@router.get(
    "/v1/queries/{query_id}/manifest",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}, "application/vnd.apache.parquet": {}}}},
)
def query_manifest(
    query_id: str,
    session: ReadSessionDep,
    ctx: CtxDep,
    principal: PrincipalDep,
    format: Annotated[str, Q(max_length=100, description="csv, jsonl, parquet, webdataset, img2dataset or another installed exporter.")] = "csv",
    offset: Annotated[int, Q(ge=0, description="The first row (e.g. shard i of size n: offset i*n, limit n).")] = 0,
    limit: Annotated[int | None, Q(ge=1, description="At most this many rows (unset: all).")] = None,
) -> StreamingResponse:
    """The manifest, streamed: columns key, uri, label, dataset, cluster, weight, count, shard, offset, size;
    or, with an exporter that writes images (webdataset), the selected images themselves."""
    try:
        exporter = ctx.exporters.get(format, allow_path=False)()
    except PluginError as exc:
        raise InvalidInputError(exc.message, field="format", hint=exc.hint) from exc
    query = get_query(session=session, query_id=query_id, principal=principal)
    if exporter.needs_images:  # rows, which remember where their images are
        session.close()  # hand its connection back: the rows take their own, and a request holds one at a time
        chunks = iter_manifest(ctx, query, principal=principal, offset=offset, limit=limit)
        first = next(chunks, [])  # fail before the response starts if the index version is gone
        reader = ImageReader(itertools.chain([first], chunks))
        stream = exporter.stream(reader.rows(), read_image=reader)
    else:  # columns: record batches taken from the index version's snapshot (rows for exporters that want rows)
        batches = iter_manifest_batches(ctx, query, principal=principal, offset=offset, limit=limit, session=session)
        head = next(batches, None)  # fail before the response starts if the index version is gone
        session.close()  # its lookups are done (the batches need no more SQL): hand the connection back
        batches = batches if head is None else itertools.chain([head], batches)
        if hasattr(exporter, "stream_batches"):
            stream = exporter.stream_batches(batches)
        else:  # an exporter that does not derive from the contract's Exporter
            stream = exporter.stream(Exporter.rows_of(batch) for batch in batches)
    headers = {"Content-Disposition": f'attachment; filename="manifest-{query.id}{exporter.suffix}"'}
    rows = int(query.summary.get("unique_samples", WHOLE_BODY_ROWS + 1)) - offset
    if not exporter.needs_images and min(rows, limit or rows) <= WHOLE_BODY_ROWS:  # small: one body, written here
        return Response(b"".join(stream), media_type=exporter.media_type, headers=headers)  # type: ignore[return-value]
    return StreamingResponse(stream, media_type=exporter.media_type, headers=headers)


@router.post("/v1/search", response_model=SearchResult, tags=["search"])
def similar_samples(body: SearchBody, ctx: CtxDep, principal: PrincipalDep) -> SearchResult:
    """k nearest source samples to each vector, optionally only in some datasets."""
    return SearchResult.model_validate(search(ctx, vectors=body.vectors, k=body.k, datasets=body.datasets, backbone=body.backbone, principal=principal))
