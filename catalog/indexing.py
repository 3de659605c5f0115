"""Indexing a registered dataset: the server's offline half of the Neural Data Server.

One job, five steps, for one dataset:

1. **embed** every sample with a backbone plugin and upsert the vectors (point id =
   sample id; payload dataset_id, label: no cluster, which belongs to an index version
   and is read from the catalog) into the backbone's collection;
2. **partition** the samples into K clusters (k-means with faiss, or by label);
3. **train one rotation expert per cluster** (a narrow ResNet predicting 0/90/180/270),
   recording its held-out rotation accuracy on its own cluster;
4. **train a label classifier** when the dataset has at least two labels (clients use it
   to estimate their label priors);
5. **export every network to ONNX**, checked against torch at batch sizes 1 and 7.

Artifacts are keyed by a hash of their inputs (the content hashes of the cluster's
images and the training configuration), written to a temp file and renamed, so a job
that is run again (a redelivered Celery task after a worker died) reuses what was
finished and produces exactly one artifact per expert. Catalog rows for the new index
version (clusters, assignments, experts) are written in one transaction that also flips
the dataset's active ``index_version``: a reader sees the old version or the new one,
never a mix; a run that fails or dies leaves no point outside the active space
(``discard_uncommitted_points``). Other datasets are never touched.

The request's options, defaults and limits are :mod:`nds.catalog.index_options`; the backbone
is a plugin (:mod:`nds.plugins.contract`), and its vectors go to the collection
``collection_name(backbone.version)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, update
from sqlmodel import select

from nds.catalog.context import CatalogContext
from nds.catalog.db import session_scope
from nds.catalog.index_options import INDEX_LIMITS, IndexRequest
from nds.catalog.jobs import GPU, JobFailed, JobKind, JobReporter, create_job, datasets_with_live_jobs, register_job_kind
from nds.catalog.paths import resolve_in_roots
from nds.catalog.spaces import publish_backbone
from nds.catalog.tables import Assignment, Cluster, Dataset, DatasetStatus, Expert, ExpertKind, Group, Job, Sample, utcnow
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


# --------------------------------------------------------------------------- run


def run_indexing(ctx: CatalogContext, job: Job, report: JobReporter) -> dict[str, Any]:
    """The job; when it fails, :func:`restore_status` (the undo of its job kind) puts the dataset back."""
    request = IndexRequest(**job.params)
    timings: dict[str, float] = {}
    return _index(ctx, job.dataset_id, request, report, timings)


def _index(ctx: CatalogContext, dataset_id: int, request: IndexRequest, report: JobReporter, timings: dict[str, float]) -> dict[str, Any]:
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise JobFailed(f"dataset {dataset_id} no longer exists")
        name, old_backbone = dataset.name, dataset.backbone
        rows = session.execute(
            select(Sample.id, Sample.uri, Sample.label, Sample.sha256, Sample.shard, Sample.offset, Sample.byte_size)
            .where(Sample.dataset_id == dataset_id).order_by(Sample.position)
        ).all()
    sample_ids = np.array([r[0] for r in rows], dtype=np.int64)
    uris = [sample_location(r[1], r[4], r[5], r[6]) for r in rows]
    labels_all = [r[2] for r in rows]
    hashes_all = [r[3] for r in rows]

    t = time.perf_counter()
    report.step("load images", start=0.0, end=0.08)
    loaded = load_images(uris, request.image_size, workers=ctx.settings.scan_workers, progress=report.progress,
                         max_pixels=ctx.settings.max_image_pixels)
    if len(loaded.index) == 0:
        first = loaded.failed[0][1] if loaded.failed else "no samples"
        raise JobFailed(f"none of the {len(uris)} images of {name!r} could be decoded (first error: {first})")
    if request.clusters > len(loaded.index):
        raise JobFailed(f"clusters ({request.clusters}) is larger than the number of decodable images ({len(loaded.index)})")
    images = loaded.images
    ids = sample_ids[loaded.index]
    labels = [labels_all[i] for i in loaded.index]
    hashes = [hashes_all[i] for i in loaded.index]
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    report.step("backbone", start=0.08, end=0.15)
    backbone = resolve_backbone(ctx, request, report)
    publish_backbone(ctx, backbone)  # clients may embed their own images in this space
    timings["backbone"] = time.perf_counter() - t

    t = time.perf_counter()
    report.step("embed", start=0.15, end=0.25)
    if backbone.input_size == request.image_size:
        backbone_images = images
    else:
        backbone_images = load_images([uris[i] for i in loaded.index], backbone.input_size, workers=ctx.settings.scan_workers,
                                      max_pixels=ctx.settings.max_image_pixels).images
    vectors = embed_in_batches(backbone, backbone_images, report)
    timings["embed"] = time.perf_counter() - t

    t = time.perf_counter()
    report.step("partition", start=0.25, end=0.3)
    clusters, centroids, cluster_labels = partition(vectors, labels, request)
    timings["partition"] = time.perf_counter() - t

    t = time.perf_counter()
    report.step("vectors", start=0.3, end=0.35)
    # Points carry no cluster: which cluster a sample is in belongs to an index version,
    # and the catalog's active version says which one reads see. With the same backbone the
    # points are the ones already there; a new backbone's points go to its own collection,
    # and the old space's points are dropped only once the new version is committed, so a
    # run that fails or dies half-way leaves every read as it was (discard_uncommitted_points).
    store = ctx.vectors
    collection = collection_name(backbone.version)
    store.ensure_collection(collection, backbone.dim)
    store.upsert(collection, ids.tolist(), vectors, [{"dataset_id": dataset_id, "label": lab} for lab in labels])
    timings["vectors"] = time.perf_counter() - t

    t = time.perf_counter()
    num_clusters = len(centroids)
    experts: list[dict[str, Any]] = []
    report.step("experts", start=0.35, end=0.9)
    for k in range(num_clusters):
        member = np.flatnonzero(clusters == k)
        sub = _SubProgress(report, k / num_clusters, (k + 1) / num_clusters)
        experts.append(
            train_and_export(
                ctx, kind=ExpertKind.rotation, dataset_id=dataset_id, dataset_name=name, cluster=k,
                images=images[member], labels=None, hashes=[hashes[i] for i in member],
                request=request, backbone=backbone, progress=sub,
            )
        )
    timings["experts"] = time.perf_counter() - t

    t = time.perf_counter()
    report.step("classifier", start=0.9, end=0.97)
    labelled = [i for i, lab in enumerate(labels) if lab is not None]
    label_names = sorted({labels[i] for i in labelled})
    classifier = None
    if len(label_names) >= 2:
        idx = np.array(labelled)
        classifier = train_and_export(
            ctx, kind=ExpertKind.classifier, dataset_id=dataset_id, dataset_name=name, cluster=None,
            images=images[idx], labels=[labels[i] for i in labelled], hashes=[hashes[i] for i in labelled],
            request=request, backbone=backbone, progress=report.progress, label_names=label_names,
        )
    timings["classifier"] = time.perf_counter() - t

    report.step("commit", start=0.97, end=1.0)
    version = commit_index(
        ctx, dataset_id=dataset_id, ids=ids, labels=labels, clusters=clusters, centroids=centroids,
        cluster_labels=cluster_labels, experts=experts + ([classifier] if classifier else []), backbone=backbone,
    )
    if old_backbone and old_backbone != backbone.version:
        store.delete_dataset(dataset_id, keep=collection)  # never two spaces for one dataset
    return {
        "dataset_id": dataset_id,
        "name": name,
        "index_version": version,
        "backbone": backbone.describe(),
        "partition": request.partition,
        "undecodable": len(loaded.failed),
        "clusters": [
            {"cluster": k, "size": int((clusters == k).sum()), "label": cluster_labels[k],
             "heldout_accuracy": experts[k]["metrics"]["heldout_accuracy"], "reused": experts[k]["reused"]}
            for k in range(num_clusters)
        ],
        "classifier": None if classifier is None else {"labels": label_names, "heldout_accuracy": classifier["metrics"]["heldout_accuracy"]},
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }


class _SubProgress:
    def __init__(self, report: JobReporter, lo: float, hi: float) -> None:
        self.report, self.lo, self.hi = report, lo, hi

    def __call__(self, fraction: float) -> None:
        self.report.progress(self.lo + (self.hi - self.lo) * fraction)


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


register_job_kind(JobKind("index", handler=run_indexing, queue_class=GPU, undo=restore_status))


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
    return load_images(uris, size, workers=ctx.settings.scan_workers, max_pixels=ctx.settings.max_image_pixels).images


def sample_location(uri: str, shard: str | None, offset: int | None, size: int | None) -> str | Location:
    """What :func:`nds_client.images.load_images` opens for a sample: its path, or where it is
    inside a shard or in object storage (read with one ranged read or request)."""
    if shard is None and not is_remote(uri):
        return uri
    return Location(uri, shard, offset, size)


def embed_in_batches(backbone: Backbone, images: np.ndarray, report: JobReporter, batch: int = 1024) -> np.ndarray:
    parts = []
    for start in range(0, len(images), batch):
        parts.append(backbone.embed(images[start : start + batch]))
        report.progress(min(start + batch, len(images)) / max(len(images), 1))
    return np.concatenate(parts).astype(np.float32)


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
    images: np.ndarray, labels: list[str] | None, hashes: list[str], request: IndexRequest, backbone: Backbone,
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
            meta["backbone_version"] = backbone.version  # experts do not depend on it; the index does
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
            "backbone_version": backbone.version,
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
        "kind": kind,
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
    centroids: np.ndarray, cluster_labels: list[str | None], experts: list[dict[str, Any]], backbone: Backbone,
) -> int:
    """Write the new index version's rows and make it the active one, in one transaction."""
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
        session.execute(
            insert(Cluster),
            [
                {"dataset_id": dataset_id, "index_version": version, "cluster": k, "size": int((clusters == k).sum()),
                 "label": cluster_labels[k], "centroid": centroids[k].astype(np.float32).tobytes(), "created_at": utcnow()}
                for k in range(len(centroids))
            ],
        )
        session.execute(
            insert(Assignment),
            [
                {"sample_id": int(sid), "index_version": version, "dataset_id": dataset_id, "cluster": int(c), "label": lab, "rank": int(r)}
                for sid, c, lab, r in zip(ids.tolist(), clusters.tolist(), labels, ranks.tolist())
            ],
        )
        session.execute(
            insert(Group),
            [
                {"dataset_id": dataset_id, "index_version": version, "cluster": c, "label": lab, "size": int(n)}
                for (c, lab), n in sorted(counters.items(), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or ""))
            ],
        )
        for e in experts:
            session.add(
                Expert(
                    dataset_id=dataset_id, index_version=version, kind=e["kind"], cluster=e["cluster"], artifact=e["artifact"],
                    sha256=e["sha256"], byte_size=e["byte_size"], input_size=e["input_size"], metrics=e["metrics"], meta=e["meta"],
                )
            )
        # keep the previous version (queries in flight may still read it); drop older ones
        for table in (Assignment, Cluster, Expert, Group):
            session.exec(delete(table).where(table.dataset_id == dataset_id, table.index_version < version - 1))
        dataset.index_version = version
        dataset.backbone = backbone.version
        dataset.status = DatasetStatus.indexed
        dataset.updated_at = utcnow()
    return version
