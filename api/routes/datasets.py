"""/v1/datasets: register, list, show, page samples, index, sync, delete."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Response, status

from nds.api.deps import AdminDep, CtxDep, DispatcherDep, IdPath, LimitDep, OffsetDep, PrincipalDep, SessionDep
from nds.api.schemas import DatasetAccess, DatasetAccessBody, DatasetRegister, DatasetRegistered, IndexBody
from nds.catalog import access
from nds.catalog import datasets as repo
from nds.catalog.db import session_scope
from nds.catalog.indexing import IndexRequest, start_indexing
from nds.catalog.jobs import get_job, submit_or_undo
from nds.catalog.registration import RegistrationRequest, start_registration
from nds.catalog.sync import start_sync
from nds.catalog.tables import ClusterPublic, Dataset, DatasetPublic, DatasetsPublic, JobPublic, SamplePublic, SamplesPublic
from nds_client.errors import InvalidInputError

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetRegistered)
def register_dataset(body: DatasetRegister, ctx: CtxDep, dispatcher: DispatcherDep, _: AdminDep) -> DatasetRegistered:
    """Register a source dataset; the scan runs as a job whose id is in the answer."""
    if body.source not in ctx.sources.names():  # over HTTP, registered source names only (never a module path)
        raise InvalidInputError(f"unknown source '{body.source}'; known: {', '.join(ctx.sources.names())}", field="source",
                                hint="install a package that declares an 'nds.sources' entry point")
    dataset, job = start_registration(ctx, RegistrationRequest(**body.model_dump()))
    submit_or_undo(ctx, dispatcher, job)
    with session_scope(ctx.engine) as session:
        current = session.get(Dataset, dataset.id) or dataset  # the job may already have finished
        return DatasetRegistered(**DatasetPublic.model_validate(current).model_dump(), job_id=job.id)


@router.get("", response_model=DatasetsPublic)
def list_datasets(session: SessionDep, ctx: CtxDep, principal: PrincipalDep, offset: OffsetDep = 0, limit: LimitDep = 100) -> DatasetsPublic:
    rows, count = repo.list_datasets(session=session, offset=offset, limit=limit, principal=principal)
    show = ctx.shown_uri(principal)
    return DatasetsPublic(data=[_shown(DatasetPublic.model_validate(d), show) for d in rows], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: IdPath, session: SessionDep, ctx: CtxDep, principal: PrincipalDep) -> DatasetPublic:
    return _shown(DatasetPublic.model_validate(repo.get_dataset(session=session, dataset_id=dataset_id, principal=principal)), ctx.shown_uri(principal))


@router.get("/{dataset_id}/samples", response_model=SamplesPublic)
def list_samples(dataset_id: IdPath, session: SessionDep, ctx: CtxDep, principal: PrincipalDep, offset: OffsetDep = 0, limit: LimitDep = 100) -> SamplesPublic:
    rows, count = repo.list_samples(session=session, dataset_id=dataset_id, offset=offset, limit=limit, principal=principal)
    show = ctx.shown_uri(principal)
    return SamplesPublic(data=[_shown(SamplePublic.model_validate(s), show) for s in rows], count=count)


def _shown(row, show: Callable[[str], str]):  # noqa: ANN001, ANN202 - a public model with a uri
    row.uri = show(row.uri)
    return row


@router.post("/{dataset_id}/index", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic)
def index_dataset(dataset_id: IdPath, body: IndexBody, ctx: CtxDep, dispatcher: DispatcherDep, _: AdminDep) -> JobPublic:
    """Embed, cluster, train one rotation expert per cluster and a label classifier, export to ONNX."""
    job = start_indexing(ctx, dataset_id, IndexRequest(**body.model_dump()))
    submit_or_undo(ctx, dispatcher, job)
    with session_scope(ctx.engine) as session:
        return JobPublic.model_validate(get_job(session, job.id))


@router.post("/{dataset_id}/sync", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic)
def sync_dataset(dataset_id: IdPath, ctx: CtxDep, dispatcher: DispatcherDep, _: AdminDep) -> JobPublic:
    """Register what the source gained since, remove what it lost, and place the new samples in
    the nearest clusters of the active index (no expert is retrained); the summary is the job's result."""
    job = start_sync(ctx, dataset_id)
    submit_or_undo(ctx, dispatcher, job)
    with session_scope(ctx.engine) as session:
        return JobPublic.model_validate(get_job(session, job.id))


@router.get("/{dataset_id}/clusters", response_model=list[ClusterPublic])
def list_clusters(dataset_id: IdPath, session: SessionDep, principal: PrincipalDep) -> list[ClusterPublic]:
    """The clusters of the dataset's active index version."""
    return [ClusterPublic.model_validate(c) for c in repo.list_clusters(session=session, dataset_id=dataset_id, principal=principal)]


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(dataset_id: IdPath, ctx: CtxDep, _: AdminDep) -> Response:
    repo.delete_dataset(ctx=ctx, dataset_id=dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{dataset_id}/access", response_model=DatasetAccess)
def get_access(dataset_id: IdPath, session: SessionDep, _: AdminDep) -> DatasetAccess:
    """Whether the dataset is restricted, and the keys that may see it."""
    dataset = repo.get_dataset(session=session, dataset_id=dataset_id)
    return DatasetAccess(dataset_id=dataset.id, restricted=dataset.restricted, keys=[k.name for k in access.granted_keys(session=session, dataset_id=dataset.id)])


@router.put("/{dataset_id}/access", response_model=DatasetAccess)
def set_access(dataset_id: IdPath, body: DatasetAccessBody, ctx: CtxDep, _: AdminDep) -> DatasetAccess:
    """Restrict the dataset to the named keys (admins always see it), or open it to every key."""
    with session_scope(ctx.engine) as session:
        dataset, keys = access.set_access(session=session, dataset_id=dataset_id, restricted=body.restricted, keys=body.keys)
        return DatasetAccess(dataset_id=dataset.id, restricted=dataset.restricted, keys=[k.name for k in keys])
