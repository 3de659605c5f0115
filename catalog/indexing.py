"""Indexing a registered dataset: the server's offline half of the Neural Data Server.

One job, run as a graph of tasks over the workers (:mod:`nds.catalog.task_graph`), for one dataset:

1. **backbone**: resolve (train or load) the backbone plugin once and publish it;
2. **embed:i**: embed one chunk of the samples (``NDS_INDEX_CHUNK_SIZE``, by position) with it;
3. **partition**: cluster the samples into K clusters (k-means with faiss, or by label) and
   upsert the vectors (point id = sample id; payload dataset_id, label: no cluster, which
   belongs to an index version and is read from the catalog) into the backbone's collection;
4. **expert:k**: train one rotation expert for cluster k (a narrow ResNet predicting
   0/90/180/270), with its held-out rotation accuracy on its own cluster, and export it to
   ONNX, checked against torch at batch sizes 1 and 7; **classifier**: the same for a label
   classifier, when the dataset has at least two labels (clients estimate their label priors
   with it). These K + 1 tasks run side by side on as many workers as there are;
5. **commit**: the index version's rows, in one transaction that also flips the dataset's
   active ``index_version`` and marks the job succeeded.

The embedded default runs the same tasks one after another in-process. Artifacts are keyed
by a hash of their inputs (the content hashes of the cluster's images and the training
configuration), written to a temp file and renamed, so a task that is run again (a
redelivered Celery task after a worker died) reuses what was finished and produces exactly
one artifact per expert. A reader sees the old version or the new one, never a mix; a run
that fails, dies or is cancelled leaves no point outside the active space
(``discard_uncommitted_points``) and the previous version served. Other datasets are never touched.

The request's options, defaults and limits are :mod:`nds.catalog.index_options`; the backbone
is a plugin (:mod:`nds.plugins.contract`), and its vectors go to the collection
``collection_name(backbone.version)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
from sqlalchemy import delete, update
from sqlmodel import Session, select

from nds.catalog.bulk import bulk_insert
from nds.catalog.context import CatalogContext
from nds.catalog.db import session_scope
from nds.catalog.index_options import INDEX_LIMITS, IndexRequest
from nds.catalog.jobs import GPU, JobFailed, JobKind, JobReporter, create_job, datasets_with_live_jobs, register_job_kind
from nds.catalog.paths import resolve_in_roots
from nds.catalog.retrieval.snapshot import write_snapshot
from nds.catalog.spaces import publish_backbone
from nds.catalog.tables import Assignment, Cluster, Dataset, DatasetStatus, Expert, ExpertKind, Group, Job, JobTask, Sample, utcnow
from nds.catalog.task_graph import Graph, TaskRun, TaskSpec, stage_of, task_views
from nds.catalog.vectors import collection_name
from nds.plugins.contract import Backbone, BackboneEnv
from nds_client.errors import ConflictError, InvalidInputError, NDSError, NotFoundError
from nds_client.images import load_images
from nds_client.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from nds_client.storage import Location, is_remote

log = logging.getLogger(__name__)

EXPERT_MEAN, EXPERT_STD = IMAGENET_MEAN, IMAGENET_STD
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- start


def split_backbone_spec(spec: str) -> tuple[str, str | None]:
    """'torchvision:resnet18' -> ('torchvision', 'resnet18'); 'default' -> ('default', None)."""
    name, sep, arg = spec.partition(":")
    return name, (arg if sep else None)


def check_backbone_name(ctx: CatalogContext, spec: str) -> None:
    name, _ = split_backbone_spec(spec)
    if name not in ctx.backbones.names():
        raise InvalidInputError(
            f"unknown backbone '{spec}'; known: {', '.join(ctx.backbones.names())}",
            field="backbone",
            hint="e.g. default, torchvision:resnet18, onnx:/path/to/encoder.onnx",
        )


def start_indexing(ctx: CatalogContext, dataset_id: int, request: IndexRequest) -> Job:
    """Validate, mark the dataset 'indexing' (atomically: a second request gets 409) and create the job."""
    request.validate()
    check_backbone_name(ctx, request.backbone)
    if request.weights is not None:
        resolve_in_roots(request.weights, ctx.data_roots, field="weights")
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise NotFoundError(f"no dataset with id {dataset_id}", hint="'nds datasets list' shows the registered ones")
        if dataset.status == DatasetStatus.registering:
            raise ConflictError(f"dataset {dataset.name!r} is still being registered", hint="wait for its registration job to finish")
        if dataset.status == DatasetStatus.indexing:
            raise ConflictError(f"dataset {dataset.name!r} is already being indexed", hint="wait for that job to finish")
        if request.clusters > dataset.num_samples:
            raise InvalidInputError(
                f"clusters ({request.clusters}) is larger than the number of samples ({dataset.num_samples})", field="clusters"
            )
        if request.partition == "labels" and dataset.num_labels < 1:
            raise InvalidInputError(f"dataset {dataset.name!r} has no labels to partition by", field="partition", hint="use --partition kmeans")
        # compare-and-set on the status, so two concurrent requests cannot both start
        claimed = session.exec(
            update(Dataset)
            .where(Dataset.id == dataset_id, Dataset.status.in_([DatasetStatus.ready, DatasetStatus.indexed, DatasetStatus.failed]))
            .values(status=DatasetStatus.indexing, updated_at=utcnow())
        )
        if claimed.rowcount != 1:
            raise ConflictError(f"dataset {dataset.name!r} is busy", hint="wait for its current job to finish")
        return create_job(session, kind="index", dataset_id=dataset_id, params=asdict(request))


# --------------------------------------------------------------------------- the graph
#
# backbone -> embed:0..C-1 -> partition -> expert:0..K-1 + classifier -> commit
#
# Each task takes ids and leaves a small JSON result; the arrays between them (vectors, the
# partition) are artifacts under jobs/<job id>/ (removed when the job ends). All run on the
# gpu queue: a deployment whose gpu workers index needs no other worker for it.

BACKBONE, EMBED, PARTITION, EXPERT, CLASSIFIER, COMMIT = "backbone", "embed", "partition", "expert", "classifier", "commit"


def plan_indexing(ctx: CatalogContext, job: Job) -> list[TaskSpec]:
    """The tasks of one index job: embedding in chunks of ``NDS_INDEX_CHUNK_SIZE`` samples, one
    partition, one task per cluster's expert (K of them; one left with an empty cluster does
    nothing), the label classifier when the dataset has two labels or more, and the commit."""
    request = IndexRequest(**job.params)
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, job.dataset_id)
        if dataset is None:
            raise JobFailed(f"dataset {job.dataset_id} no longer exists")
        num_samples, num_labels = dataset.num_samples, len(dataset.labels)
        unlabelled = session.exec(select(Sample.id).where(Sample.dataset_id == dataset.id, Sample.label.is_(None)).limit(1)).first() is not None
    clusters = (num_labels + int(unlabelled)) if request.partition == "labels" else request.clusters
    size = max(ctx.settings.index_chunk_size, 1)
    chunks = [(lo, min(lo + size, num_samples)) for lo in range(0, max(num_samples, 1), size)]
    embeds = [TaskSpec(f"{EMBED}:{i}", GPU, (BACKBONE,), {"start": lo, "stop": hi}, weight=0.25 * (hi - lo) / max(num_samples, 1) * 4)
              for i, (lo, hi) in enumerate(chunks)]
    experts = [TaskSpec(f"{EXPERT}:{k}", GPU, (PARTITION,), {"cluster": k}, weight=2.0) for k in range(clusters)]
    learners = experts + ([TaskSpec(CLASSIFIER, GPU, (PARTITION,), weight=2.0)] if num_labels >= 2 else [])
    return [
        TaskSpec(BACKBONE, GPU, weight=0.2),
        *embeds,
        TaskSpec(PARTITION, GPU, tuple(e.name for e in embeds), weight=0.3),
        *learners,
        TaskSpec(COMMIT, GPU, tuple(t.name for t in learners), weight=0.2),
    ]


def _request(job: Job) -> IndexRequest:
    return IndexRequest(**job.params)


def _dataset_name(ctx: CatalogContext, dataset_id: int | None) -> str:
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise JobFailed(f"dataset {dataset_id} no longer exists")
        return dataset.name


def _work_key(job: Job, name: str) -> str:
    return f"jobs/{job.id}/{name}.npy"


def _save_array(ctx: CatalogContext, key: str, array: np.ndarray) -> str:
    ctx.artifacts.write_with(key, lambda p: _write_npy(p, array), durable=False)
    return key


def _write_npy(path: Any, array: np.ndarray) -> None:  # noqa: ANN401 - a Path
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def _load_array(ctx: CatalogContext, key: str) -> np.ndarray:
    return np.load(ctx.artifacts.open_path(key), allow_pickle=False)


def task_backbone(ctx: CatalogContext, job: Job, task: TaskRun) -> dict[str, Any]:
    """Resolve (train or load) the backbone once and publish it, before any chunk embeds with it."""
    backbone = resolve_backbone(ctx, _request(job), task.report)
    publish_backbone(ctx, backbone)  # clients may embed their own images in this space
    return {"version": backbone.version, "dim": backbone.dim, "input_size": backbone.input_size, "describe": backbone.describe()}


def _rows_by_position(ctx: CatalogContext, dataset_id: int, start: int, stop: int) -> list[tuple[Any, ...]]:
    with session_scope(ctx.engine) as session:
        return list(session.execute(
            select(Sample.id, Sample.uri, Sample.label, Sample.sha256, Sample.shard, Sample.offset, Sample.byte_size)
            .where(Sample.dataset_id == dataset_id).order_by(Sample.position).offset(start).limit(stop - start)
        ).all())


def _rows_by_id(ctx: CatalogContext, ids: np.ndarray) -> list[tuple[Any, ...]]:
    """Sample rows for ``ids``, in that order."""
    found: dict[int, tuple[Any, ...]] = {}
    with session_scope(ctx.engine) as session:
        for lo in range(0, len(ids), 10_000):
            part = [int(i) for i in ids[lo : lo + 10_000]]
            for row in session.execute(
                select(Sample.id, Sample.uri, Sample.label, Sample.sha256, Sample.shard, Sample.offset, Sample.byte_size)
                .where(Sample.id.in_(part))
            ).all():
                found[int(row[0])] = tuple(row)
    missing = [int(i) for i in ids if int(i) not in found]
    if missing:
        raise JobFailed(f"{len(missing)} samples of the dataset were removed while it was being indexed (e.g. id {missing[0]})",
                        hint="index it again")
    return [found[int(i)] for i in ids]


def task_embed(ctx: CatalogContext, job: Job, task: TaskRun) -> dict[str, Any]:
    """Embed one chunk of the dataset's samples (by position) with the backbone the first task resolved."""
    request = _request(job)
    pinned = task.input(BACKBONE)
    backbone = resolve_backbone(ctx, request, None)
    if backbone.version != pinned["version"]:
        raise JobFailed(f"the backbone changed while the dataset was being indexed ({pinned['version']} -> {backbone.version})",
                        hint="index it again")
    rows = _rows_by_position(ctx, job.dataset_id, task.params["start"], task.params["stop"])
    loaded = load_images([sample_location(r[1], r[4], r[5], r[6]) for r in rows], backbone.input_size,
                         workers=ctx.settings.scan_workers, progress=lambda f: task.report.progress(0.5 * f),
                         max_pixels=ctx.settings.max_image_pixels)
    ids = np.array([rows[i][0] for i in loaded.index], dtype=np.int64)
    parts = []
    for lo in range(0, len(loaded.images), 1024):
        parts.append(backbone.embed(loaded.images[lo : lo + 1024]))
        task.report.progress(0.5 + 0.5 * min(lo + 1024, len(loaded.images)) / max(len(loaded.images), 1))
    vectors = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, backbone.dim), dtype=np.float32)
    return {
        "ids": _save_array(ctx, _work_key(job, f"{task.name.replace(':', '-')}-ids"), ids),
        "vectors": _save_array(ctx, _work_key(job, f"{task.name.replace(':', '-')}-vectors"), vectors),
        "backbone": backbone.version, "dim": backbone.dim,
        "count": len(ids), "samples": len(rows), "undecodable": len(loaded.failed),
        "first_error": loaded.failed[0][1] if loaded.failed else None,
    }


def task_partition(ctx: CatalogContext, job: Job, task: TaskRun) -> dict[str, Any]:
    """Cluster every decodable sample, and upsert the vectors into the backbone's collection."""
    request = _request(job)
    name = _dataset_name(ctx, job.dataset_id)
    chunks = task.inputs_of(EMBED)
    samples = sum(c["samples"] for c in chunks)
    undecodable = sum(c["undecodable"] for c in chunks)
    ids = np.concatenate([_load_array(ctx, c["ids"]) for c in chunks]).astype(np.int64)
    if len(ids) == 0:
        first = next((c["first_error"] for c in chunks if c["first_error"]), "no samples")
        raise JobFailed(f"none of the {samples} images of {name!r} could be decoded (first error: {first})")
    if request.clusters > len(ids):
        raise JobFailed(f"clusters ({request.clusters}) is larger than the number of decodable images ({len(ids)})")
    vectors = np.concatenate([_load_array(ctx, c["vectors"]) for c in chunks]).astype(np.float32)
    labels = [r[2] for r in _rows_by_id(ctx, ids)]
    clusters, centroids, cluster_labels = partition(vectors, labels, request)
    # Points carry no cluster: which cluster a sample is in belongs to an index version, and the
    # catalog's active version says which one reads see. With the same backbone the points are
    # the ones already there; a new backbone's points go to its own collection, and the old
    # space's points are dropped only once the new version is committed, so a run that fails or
    # dies half-way leaves every read as it was (discard_uncommitted_points).
    collection = collection_name(chunks[0]["backbone"])
    ctx.vectors.ensure_collection(collection, int(chunks[0]["dim"]))
    ctx.vectors.upsert(collection, ids.tolist(), vectors, [{"dataset_id": job.dataset_id, "label": lab} for lab in labels])
    return {
        "ids": _save_array(ctx, _work_key(job, "partition-ids"), ids),
        "clusters": _save_array(ctx, _work_key(job, "partition-clusters"), clusters.astype(np.int64)),
        "centroids": _save_array(ctx, _work_key(job, "partition-centroids"), centroids.astype(np.float32)),
        "cluster_labels": cluster_labels, "num_clusters": len(centroids), "undecodable": undecodable,
        "backbone": chunks[0]["backbone"],
    }


def _partition_arrays(ctx: CatalogContext, part: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return _load_array(ctx, part["ids"]), _load_array(ctx, part["clusters"])


def task_expert(ctx: CatalogContext, job: Job, task: TaskRun) -> dict[str, Any]:
    """Train (or reuse) and export the rotation expert of one cluster."""
    request = _request(job)
    part = task.input(PARTITION)
    k = int(task.params["cluster"])
    if k >= part["num_clusters"]:
        return {"cluster": k, "empty": True}  # k-means left this cluster empty
    ids, clusters = _partition_arrays(ctx, part)
    member_ids = ids[clusters == k]
    rows = _rows_by_id(ctx, member_ids)
    images = _load_members(ctx, rows, request.image_size, task)
    trained = train_and_export(
        ctx, kind=ExpertKind.rotation, dataset_id=job.dataset_id, dataset_name=_dataset_name(ctx, job.dataset_id), cluster=k,
        images=images, labels=None, hashes=[r[3] for r in rows], request=request, backbone_version=_space(task),
        progress=lambda f: task.report.progress(0.1 + 0.9 * f),
    )
    return trained


def task_classifier(ctx: CatalogContext, job: Job, task: TaskRun) -> dict[str, Any]:
    """Train (or reuse) and export the label classifier (clients estimate their label priors with it)."""
    request = _request(job)
    ids, _ = _partition_arrays(ctx, task.input(PARTITION))
    rows = [r for r in _rows_by_id(ctx, ids) if r[2] is not None]
    label_names = sorted({r[2] for r in rows})
    if len(label_names) < 2:
        return {"skipped": True, "labels": label_names}
    images = _load_members(ctx, rows, request.image_size, task)
    trained = train_and_export(
        ctx, kind=ExpertKind.classifier, dataset_id=job.dataset_id, dataset_name=_dataset_name(ctx, job.dataset_id), cluster=None,
        images=images, labels=[r[2] for r in rows], hashes=[r[3] for r in rows], request=request, backbone_version=_space(task),
        progress=lambda f: task.report.progress(0.1 + 0.9 * f), label_names=label_names,
    )
    return {**trained, "labels": label_names}


def _space(task: TaskRun) -> str:
    return str(task.input(PARTITION)["backbone"])


def _load_members(ctx: CatalogContext, rows: list[tuple[Any, ...]], size: int, task: TaskRun) -> np.ndarray:
    loaded = load_images([sample_location(r[1], r[4], r[5], r[6]) for r in rows], size, workers=ctx.settings.scan_workers,
                         progress=lambda f: task.report.progress(0.1 * f), max_pixels=ctx.settings.max_image_pixels)
    if loaded.failed:  # it decoded when it was embedded: its file changed or went away since
        raise JobFailed(f"{len(loaded.failed)} images could no longer be read while the dataset was being indexed "
                        f"(first: {loaded.failed[0][1]})", hint="index it again once its files are stable")
    return loaded.images


def task_commit(ctx: CatalogContext, job: Job, task: TaskRun) -> dict[str, Any]:
    """Write the new index version and make it the active one, and finish the job, in one transaction."""
    request = _request(job)
    part = _graph_result(ctx, job.id, PARTITION)
    learners = task.inputs_of(EXPERT)
    ids, clusters = _partition_arrays(ctx, part)
    centroids = _load_array(ctx, part["centroids"])
    labels = [r[2] for r in _rows_by_id(ctx, ids)]
    experts = [e for e in learners if not e.get("empty")]
    classifier = task.inputs.get(CLASSIFIER)
    if classifier is not None and classifier.get("skipped"):
        classifier = None
    backbone = _graph_result(ctx, job.id, BACKBONE)
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, job.dataset_id)
        old_backbone = dataset.backbone if dataset is not None else None
    by_cluster = {e["cluster"]: e for e in experts}
    result: dict[str, Any] = {
        "dataset_id": job.dataset_id,
        "name": _dataset_name(ctx, job.dataset_id),
        "backbone": backbone["describe"],
        "partition": request.partition,
        "undecodable": part["undecodable"],
        "clusters": [
            {"cluster": k, "size": int((clusters == k).sum()), "label": part["cluster_labels"][k],
             "heldout_accuracy": by_cluster[k]["metrics"]["heldout_accuracy"], "reused": by_cluster[k]["reused"]}
            for k in range(part["num_clusters"])
        ],
        "classifier": None if classifier is None else {"labels": classifier["labels"], "heldout_accuracy": classifier["metrics"]["heldout_accuracy"]},
        "seconds": _stage_seconds(ctx, job.id),
    }

    def finish(session: Session, version: int) -> None:
        task.complete_in(session, {**result, "index_version": version})

    version = commit_index(
        ctx, dataset_id=job.dataset_id, ids=ids, labels=labels, clusters=clusters, centroids=centroids,
        cluster_labels=part["cluster_labels"], experts=[*experts, *([classifier] if classifier else [])],
        backbone_version=backbone["version"], finish=finish,
    )
    if old_backbone and old_backbone != backbone["version"]:
        ctx.vectors.delete_dataset(job.dataset_id, keep=collection_name(backbone["version"]))  # never two spaces for one dataset
    remove_work_files(ctx, job.id)
    write_snapshot(ctx, job.dataset_id, version)  # what manifests read (rebuilt from SQL if it is ever missing)
    with session_scope(ctx.engine) as session:
        return dict(session.get(Job, job.id).result or result)


def _graph_result(ctx: CatalogContext, job_id: str, name: str) -> dict[str, Any]:
    with session_scope(ctx.engine) as session:
        row = session.get(JobTask, (job_id, name))
        if row is None or row.result is None:
            raise JobFailed(f"task {name} of job {job_id} left no result")
        return dict(row.result)


def _stage_seconds(ctx: CatalogContext, job_id: str) -> dict[str, float]:
    """Seconds each stage's tasks ran, summed over its tasks (work, not wall time: tasks of a stage run side by side)."""
    with session_scope(ctx.engine) as session:
        rows = session.exec(select(JobTask).where(JobTask.job_id == job_id)).all()
        views = task_views(rows)
    seconds: dict[str, float] = {}
    for view in views:
        if view.seconds is not None:
            seconds[stage_of(view.name)] = round(seconds.get(stage_of(view.name), 0.0) + view.seconds, 2)
    return seconds


def remove_work_files(ctx: CatalogContext, job_id: str) -> int:
    """Delete what a job's tasks handed each other (jobs/<job id>/): once it committed, failed or was cancelled."""
    found = ctx.artifacts.list_objects(f"jobs/{job_id}")
    for item in found:
        ctx.artifacts.delete(item.key)
    return len(found)


def abandon_indexing(ctx: CatalogContext, job: Job) -> None:
    """After a task of a job that has ended (failed, cancelled) finishes anyway: its work files
    go, and points it wrote outside the dataset's active space are dropped, unless another
    index job holds the dataset by now."""
    remove_work_files(ctx, job.id)
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, job.dataset_id)
        if dataset is None or dataset.status == DatasetStatus.indexing:
            return
        backbone = dataset.backbone if dataset.index_version > 0 else None
    discard_uncommitted_points(ctx, job.dataset_id, backbone)


INDEX_GRAPH = Graph(
    plan=plan_indexing,
    handlers={BACKBONE: task_backbone, EMBED: task_embed, PARTITION: task_partition, EXPERT: task_expert,
              CLASSIFIER: task_classifier, COMMIT: task_commit},
    abandon=abandon_indexing,
)


def restore_status(ctx: CatalogContext, dataset_id: int | None) -> None:
    """After a failed index job: back to 'indexed' if an older index exists, else 'ready',
    without the points the failed run wrote outside the dataset's active embedding space."""
    if dataset_id is None:
        return
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != DatasetStatus.indexing:
            return
        dataset.settle()
        backbone = dataset.backbone if dataset.index_version > 0 else None
    discard_uncommitted_points(ctx, dataset_id, backbone)


register_job_kind(JobKind("index", handler=None, queue_class=GPU, undo=restore_status, graph=INDEX_GRAPH))


def discard_uncommitted_points(ctx: CatalogContext, dataset_id: int, backbone: str | None) -> int:
    """Delete a dataset's points from every collection but its active space's (all of them
    when it has no index): what an index run that did not commit wrote there."""
    return ctx.vectors.delete_dataset(dataset_id, keep=collection_name(backbone) if backbone else None)


def restore_interrupted_indexing(ctx: CatalogContext) -> list[str]:
    """Datasets left 'indexing' with no live index job (its process died) go back to their
    previous status, and what the abandoned run wrote to the vector store is removed. Run
    after :func:`nds.catalog.jobs.mark_interrupted`: an index job of a live process is left alone."""
    with session_scope(ctx.engine) as session:
        live = datasets_with_live_jobs(session, "index") | datasets_with_live_jobs(session, "sync")  # a sync marks it indexing too
        stuck = [d for d in session.exec(select(Dataset).where(Dataset.status == DatasetStatus.indexing)).all() if d.id not in live]
        for dataset in stuck:
            dataset.settle()
        spaces = [(d.id, d.backbone if d.index_version > 0 else None) for d in stuck]
    for dataset_id, backbone in spaces:
        discard_uncommitted_points(ctx, dataset_id, backbone)
    return [d.name for d in stuck]


# --------------------------------------------------------------------------- steps


def resolve_backbone(ctx: CatalogContext, request: IndexRequest, report: JobReporter | None = None) -> Backbone:
    name, arg = split_backbone_spec(request.backbone)
    weights = resolve_in_roots(request.weights, ctx.data_roots, field="weights") if request.weights else None
    env = BackboneEnv(
        artifacts=ctx.artifacts,
        resolve_path=lambda raw: resolve_in_roots(raw, ctx.data_roots, field="backbone"),
        weights=weights,
        training_images=lambda n, size: sample_registered_images(ctx, n, size, seed=request.seed),
        progress=report.progress if report else None,
    )
    try:
        loader = ctx.backbones.get(name)
        return loader(arg, env)
    except NDSError as exc:
        raise JobFailed(f"backbone {request.backbone!r}: {exc.message}", hint=exc.hint) from exc


def sample_registered_images(ctx: CatalogContext, n: int, size: int, *, seed: int = 0) -> np.ndarray:
    """Up to ``n`` images drawn evenly from every registered dataset, decoded at ``size``:
    what the shared default backbone trains on. Every key may download that backbone, so
    restricted datasets are left out unless ``NDS_BACKBONE_INCLUDE_RESTRICTED`` is set."""
    with session_scope(ctx.engine) as session:
        registered = select(Dataset.id).where(Dataset.status.in_([DatasetStatus.ready, DatasetStatus.indexed, DatasetStatus.indexing]))
        if ctx.settings.backbone_include_restricted:
            datasets = session.exec(registered).all()
        else:
            datasets = session.exec(registered.where(Dataset.restricted.is_(False))).all()
            if not datasets and session.exec(registered.limit(1)).first() is not None:
                raise JobFailed(
                    "the shared default backbone trains only on unrestricted datasets, and every registered dataset is restricted",
                    hint="register an unrestricted dataset first, set NDS_BACKBONE_INCLUDE_RESTRICTED=true, or index with "
                         "--backbone torchvision:<arch> or onnx:<file>",
                )
        per = max(n // max(len(datasets), 1), 1)
        rng = np.random.default_rng(seed)
        uris: list[str | Location] = []
        for did in datasets:
            all_uris = [sample_location(*r) for r in session.execute(
                select(Sample.uri, Sample.shard, Sample.offset, Sample.byte_size).where(Sample.dataset_id == did).order_by(Sample.position)).all()]
            take = rng.choice(len(all_uris), size=min(per, len(all_uris)), replace=False) if all_uris else []
            uris.extend(all_uris[i] for i in sorted(take))
    loaded = load_images(uris, size, workers=ctx.settings.scan_workers, max_pixels=ctx.settings.max_image_pixels)
    if uris and len(loaded.index) == 0:
        raise JobFailed(f"none of the {len(uris)} registered images sampled to train the shared backbone could be decoded "
                        f"(first error: {loaded.failed[0][1]})", hint="register images the server can decode (NDS_MAX_IMAGE_PIXELS)")
    return loaded.images


def sample_location(uri: str, shard: str | None, offset: int | None, size: int | None) -> str | Location:
    """What :func:`nds_client.images.load_images` opens for a sample: its path, or where it is
    inside a shard or in object storage (read with one ranged read or request)."""
    if shard is None and not is_remote(uri):
        return uri
    return Location(uri, shard, offset, size)


def partition(vectors: np.ndarray, labels: list[str | None], request: IndexRequest) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Cluster id per sample (0..K'-1, no empty clusters), centroids (K', dim), label per cluster."""
    if request.partition == "labels":
        names = sorted({lab for lab in labels if lab is not None})
        has_unlabelled = any(lab is None for lab in labels)
        order: list[str | None] = [*names, *([None] if has_unlabelled else [])]
        lookup = {lab: i for i, lab in enumerate(order)}
        assign = np.array([lookup[lab] for lab in labels], dtype=np.int64)
    else:
        import faiss

        k = min(request.clusters, len(vectors))
        km = faiss.Kmeans(vectors.shape[1], k, niter=25, seed=request.seed + 1, spherical=True, min_points_per_centroid=1, verbose=False)
        km.train(np.ascontiguousarray(vectors, dtype=np.float32))
        _, nearest = km.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        assign = nearest[:, 0].astype(np.int64)
        order = [None] * k
    used = np.unique(assign)  # drop empty clusters, renumber densely
    remap = np.full(assign.max() + 1, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    assign = remap[assign]
    cluster_labels = [order[u] for u in used]
    centroids = np.stack([vectors[assign == k].mean(axis=0) for k in range(len(used))]).astype(np.float32)
    return assign, centroids, cluster_labels


def _content_key(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def epochs_for(num_images: int, request: IndexRequest) -> int:
    """``request.epochs``, raised so that a network sees at least ``request.min_steps`` optimizer steps.

    A cluster of 100 images makes 2 steps an epoch at batch 64: a handful of epochs leaves
    its expert at chance, so small clusters train for more epochs (up to the epochs limit).
    """
    from nds.catalog.model.training import TrainConfig

    defaults = TrainConfig()
    train_images = max(1, round(num_images * (1 - defaults.holdout_fraction)))
    steps_per_epoch = max(1, -(-train_images // defaults.batch_size))
    return int(min(INDEX_LIMITS["epochs"].high, max(request.epochs, -(-request.min_steps // steps_per_epoch))))


def train_and_export(
    ctx: CatalogContext, *, kind: ExpertKind, dataset_id: int, dataset_name: str, cluster: int | None,
    images: np.ndarray, labels: list[str] | None, hashes: list[str], request: IndexRequest, backbone_version: str,
    progress, label_names: list[str] | None = None,  # noqa: ANN001 - callable
) -> dict[str, Any]:
    """Train (or reuse, when the same inputs were trained before) one network and export it."""
    from nds.catalog.model.export import export_onnx
    from nds.catalog.model.nets import NetConfig
    from nds.catalog.model.training import TrainConfig, train_classifier, train_rotation
    from nds_client.files import sha256_file
    from nds_client.runtime import read_metadata

    num_outputs = 4 if kind == ExpertKind.rotation else len(label_names or [])
    net = NetConfig(width=request.width, blocks=(1, 1, 1), feature_dim=128, num_outputs=num_outputs, input_size=request.image_size)
    train = TrainConfig(epochs=epochs_for(len(images), request), seed=request.seed)
    key_hash = _content_key(FORMAT_VERSION, kind.value, sorted(hashes), labels, net.to_dict(), train.to_dict(), EXPERT_MEAN, EXPERT_STD)
    key = f"experts/{dataset_id}/{kind.value}-{key_hash[:24]}.onnx"
    reused = False
    if ctx.artifacts.exists(key):  # a store in object storage: asked there, and downloaded to its cache
        try:
            path = ctx.artifacts.open_path(key)
            meta = {k: json.loads(v) for k, v in read_metadata(path).items()}
            meta["backbone_version"] = backbone_version  # experts do not depend on it; the index does
            reused = True
        except Exception:  # noqa: BLE001 - an unreadable leftover is retrained and replaced
            reused = False
    if not reused:
        norm = (EXPERT_MEAN, EXPERT_STD)
        if kind == ExpertKind.rotation:
            result = train_rotation(images, net, train, normalization=norm, progress=progress)
        else:
            lookup = {lab: i for i, lab in enumerate(label_names or [])}
            y = np.array([lookup[lab] for lab in labels or []], dtype=np.int64)
            result = train_classifier(images, y, len(lookup), net, train, normalization=norm, progress=progress)
        meta = {
            "task": kind.value,
            "format_version": FORMAT_VERSION,
            "input_size": request.image_size,
            "mean": list(EXPERT_MEAN),
            "std": list(EXPERT_STD),
            "label_names": label_names or [],
            "dataset": dataset_name,
            "dataset_id": dataset_id,
            "cluster": cluster,
            "backbone_version": backbone_version,
            "net_config": net.to_dict(),
            "training_config": train.to_dict(),
            "heldout_accuracy": round(float(result.heldout_accuracy), 4),
            "train_accuracy": round(float(result.train_accuracy), 4),
            "num_train": result.num_train,
            "num_heldout": result.num_heldout,
            "heldout_is_train": result.heldout_is_train,
            "device": result.device,
            "precision": result.precision,
            "train_seconds": round(result.seconds, 2),
            "outputs": ["logits", "features"],
        }
        # every value JSON-encoded, so readers decode all of them the same way; the store publishes the file
        # (temp + rename, or one upload to object storage) once export_onnx has written and checked it
        metadata = {k: json.dumps(v) for k, v in meta.items()}
        path = ctx.artifacts.write_with(key, lambda p: export_onnx(result.model, net, metadata=metadata, path=p))
    return {
        "kind": kind.value,
        "cluster": cluster,
        "artifact": key,
        "sha256": sha256_file(path),
        "byte_size": path.stat().st_size,
        "input_size": request.image_size,
        "metrics": {k: meta[k] for k in ("heldout_accuracy", "train_accuracy", "num_train", "num_heldout", "heldout_is_train", "train_seconds")},
        "meta": meta,
        "reused": reused,
    }


def commit_index(
    ctx: CatalogContext, *, dataset_id: int, ids: np.ndarray, labels: list[str | None], clusters: np.ndarray,
    centroids: np.ndarray, cluster_labels: list[str | None], experts: list[dict[str, Any]], backbone_version: str,
    finish: Callable[[Session, int], None] | None = None,
) -> int:
    """Write the new index version's rows and make it the active one, in one transaction
    (``finish(session, version)`` runs in it too: the job is marked succeeded with its commit)."""
    # rank inside each (cluster, label) group, in sample order: the sampler picks by rank
    ranks = np.zeros(len(ids), dtype=np.int64)
    counters: dict[tuple[int, str | None], int] = {}
    for i, (c, lab) in enumerate(zip(clusters.tolist(), labels)):
        ranks[i] = counters.get((c, lab), 0)
        counters[(c, lab)] = ranks[i] + 1
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        version = dataset.index_version + 1
        # a retried job may have left rows of this version behind: start clean
        for table in (Assignment, Cluster, Expert, Group):
            session.exec(delete(table).where(table.dataset_id == dataset_id, table.index_version == version))
        # COPY on PostgreSQL, executemany on SQLite, all in this transaction
        bulk_insert(session, Cluster, [
            {"dataset_id": dataset_id, "index_version": version, "cluster": k, "size": int((clusters == k).sum()),
             "label": cluster_labels[k], "centroid": centroids[k].astype(np.float32).tobytes(), "created_at": utcnow()}
            for k in range(len(centroids))
        ])
        rows = len(ids)
        bulk_insert(session, Assignment, {
            "sample_id": np.asarray(ids, dtype=np.int64), "index_version": np.full(rows, version, dtype=np.int64),
            "dataset_id": np.full(rows, dataset_id, dtype=np.int64), "cluster": np.asarray(clusters, dtype=np.int64), "label": list(labels),
            "rank": ranks,
        })
        bulk_insert(session, Group, [
            {"dataset_id": dataset_id, "index_version": version, "cluster": c, "label": lab, "size": int(n)}
            for (c, lab), n in sorted(counters.items(), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or ""))
        ])
        for e in experts:
            session.add(
                Expert(
                    dataset_id=dataset_id, index_version=version, kind=ExpertKind(e["kind"]), cluster=e["cluster"], artifact=e["artifact"],
                    sha256=e["sha256"], byte_size=e["byte_size"], input_size=e["input_size"], metrics=e["metrics"], meta=e["meta"],
                )
            )
        # keep the previous version (queries in flight may still read it); drop older ones
        for table in (Assignment, Cluster, Expert, Group):
            session.exec(delete(table).where(table.dataset_id == dataset_id, table.index_version < version - 1))
        dataset.index_version = version
        dataset.backbone = backbone_version
        dataset.status = DatasetStatus.indexed
        dataset.updated_at = utcnow()
        if finish is not None:
            finish(session, version)
    return version
