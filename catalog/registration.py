"""Registering a source dataset: validate the request, then scan the source as a job.

Validation runs before anything is stored (bad name, unknown source plugin, missing or
unreadable path, a path outside the data roots, an empty source) so a bad request
changes nothing. The job reads, hashes and decodes every image on a thread pool,
skipping and counting unreadable ones, and stores the samples batch by batch while the
dataset is 'registering'; if it fails (or its process dies) the dataset and its rows are
removed, so a registration is either complete or absent.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from catalog.context import CatalogContext
from catalog.datasets import check_name, purge_rows
from catalog.db import session_scope
from catalog.errors import ConflictError, InvalidInputError, PluginError, SourceError
from catalog.jobs import JobFailed, JobReporter, create_job
from catalog.models import Dataset, DatasetStatus, Job, Sample, utcnow
from catalog.paths import resolve_in_roots, within
from plugins.sources.base import Source, SourceItem

log = logging.getLogger(__name__)

MAX_LISTED_SKIPS = 1000
BATCH = 4096  # source items read, scanned and stored at a time
MAX_IMAGE_PIXELS = 1 << 28  # refuse decompression bombs well above any real photo


@dataclass(frozen=True)
class RegistrationRequest:
    name: str
    path: str
    source: str = "imagefolder"
    description: str | None = None
    license: str | None = None


@dataclass(frozen=True)
class ScannedImage:
    position: int
    uri: str
    label: str | None
    width: int = 0
    height: int = 0
    byte_size: int = 0
    sha256: str = ""
    skipped: str | None = None  # the reason, when the item is not a usable image


def open_source(ctx: CatalogContext, source_name: str, path: Path) -> Source:
    try:
        source_cls = ctx.sources.get(source_name)
    except PluginError as exc:
        raise InvalidInputError(exc.message, field="source", hint=exc.hint) from exc
    return source_cls(path)


def prepare_registration(ctx: CatalogContext, request: RegistrationRequest) -> tuple[Path, int]:
    """Check a request without storing anything; returns the resolved path and item count."""
    check_name(request.name)
    real = resolve_in_roots(request.path, ctx.data_roots, field="path")
    source = open_source(ctx, request.source, real)
    count = sum(1 for _ in source.items())
    if count == 0:
        raise SourceError(f"{request.path} holds no files to register", field="path", hint="point at a folder or manifest with images")
    return real, count


def start_registration(ctx: CatalogContext, request: RegistrationRequest) -> tuple[Dataset, Job]:
    """Validate, then store the dataset (status 'registering') and its job; the caller dispatches the job."""
    real, count = prepare_registration(ctx, request)
    try:
        with session_scope(ctx.engine) as session:
            if session.exec(select(Dataset.id).where(Dataset.name == request.name)).first() is not None:
                raise ConflictError(f"a dataset named {request.name!r} already exists", hint="pick another name or delete it first")
            dataset = Dataset(
                name=request.name,
                source=request.source,
                uri=str(real),
                description=request.description,
                license=request.license,
                status=DatasetStatus.registering,
            )
            session.add(dataset)
            session.flush()
            job = create_job(session, kind="register", dataset_id=dataset.id, params={"candidates": count})
    except IntegrityError as exc:  # a concurrent request won the race for the name
        raise ConflictError(f"a dataset named {request.name!r} already exists") from exc
    return dataset, job


def run_registration(ctx: CatalogContext, job: Job, report: JobReporter) -> dict[str, Any]:
    """The job: scan, decode and store every sample of the job's dataset.

    Streams: the source is read, scanned and stored :data:`BATCH` items at a time, so a
    manifest of millions of rows needs bounded memory, and each batch is committed so the
    catalog is never locked for the whole scan. The dataset stays ``registering`` (not
    ready for indexing or queries) until the last batch is in; if the job fails, or its
    process dies, its rows are removed (here, or by the next process that starts), so a
    registration is either complete or absent."""
    dataset_id = job.dataset_id
    try:
        with session_scope(ctx.engine) as session:
            dataset = session.get(Dataset, dataset_id)
            if dataset is None:
                raise JobFailed(f"dataset {dataset_id} no longer exists")
            name, uri, source_name = dataset.name, dataset.uri, dataset.source
            session.exec(delete(Sample).where(Sample.dataset_id == dataset_id))  # a redelivered job starts clean
        report.step("scan", start=0.0, end=1.0)
        total = max(int((job.params or {}).get("candidates") or 0), 1)
        stored, seen = 0, 0
        labels: set[str] = set()
        reasons: Counter[str] = Counter()
        listed: list[dict[str, str]] = []
        items = open_source(ctx, source_name, Path(uri)).items()
        with ThreadPoolExecutor(max_workers=max(ctx.settings.scan_workers, 1), thread_name_prefix="nds-scan") as pool:
            while batch := list(islice(items, BATCH)):
                scanned = scan_batch(pool, batch, seen, ctx.data_roots)
                seen += len(batch)
                rows = []
                for s in scanned:
                    if s.skipped is not None:
                        reasons[s.skipped] += 1
                        if len(listed) < MAX_LISTED_SKIPS:
                            listed.append({"uri": s.uri, "reason": s.skipped})
                        continue
                    if s.label is not None:
                        labels.add(s.label)
                    rows.append({"dataset_id": dataset_id, "position": stored + len(rows), "uri": s.uri, "label": s.label,
                                 "width": s.width, "height": s.height, "byte_size": s.byte_size, "sha256": s.sha256})
                if rows:
                    with session_scope(ctx.engine) as session:
                        session.execute(insert(Sample), rows)
                    stored += len(rows)
                report.progress(min(seen / total, 1.0))
        skipped = sum(reasons.values())
        if stored == 0:
            detail = ", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "no files"
            raise JobFailed(f"no readable images in {uri} ({detail})")
        with session_scope(ctx.engine) as session:
            dataset = session.get(Dataset, dataset_id)
            dataset.num_samples = stored
            dataset.num_labels = len(labels)
            dataset.labels = sorted(labels)
            dataset.skipped = skipped
            dataset.status = DatasetStatus.ready
            dataset.updated_at = utcnow()
    except BaseException:
        remove_partial_dataset(ctx, dataset_id)
        raise
    return {
        "dataset_id": dataset_id,
        "name": name,
        "num_samples": stored,
        "num_labels": len(labels),
        "skipped": skipped,
        "skipped_reasons": dict(reasons),
        "skipped_files": listed,
    }


def remove_partial_dataset(ctx: CatalogContext, dataset_id: int | None) -> None:
    """Delete a dataset whose registration did not complete (never one that is ready)."""
    if dataset_id is None:
        return
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is not None and dataset.status == DatasetStatus.registering:
            purge_rows(session, dataset_id)
            session.delete(dataset)


def remove_interrupted_registrations(ctx: CatalogContext) -> list[str]:
    """Remove datasets left 'registering' by a process that died; returns their names."""
    with session_scope(ctx.engine) as session:
        stale = session.exec(select(Dataset).where(Dataset.status == DatasetStatus.registering)).all()
        names = [d.name for d in stale]
        for dataset in stale:
            purge_rows(session, dataset.id)
            session.delete(dataset)
    return names


def scan_batch(pool: ThreadPoolExecutor, items: list[SourceItem], first: int, roots: list[Path], chunk: int = 64) -> list[ScannedImage]:
    """``scan_one`` over ``items`` (positions from ``first``), in order, ``chunk`` items per
    thread-pool task: a task per item costs more than the whole check of a missing file."""
    def run(start: int) -> list[ScannedImage]:
        return [scan_one(first + start + i, item, roots) for i, item in enumerate(items[start : start + chunk])]

    return [s for part in pool.map(run, range(0, len(items), chunk)) for s in part]


def scan_one(position: int, item: SourceItem, roots: list[Path]) -> ScannedImage:
    shown = os.fsdecode(item.path).encode("utf-8", "backslashreplace").decode("utf-8")
    base = ScannedImage(position=position, uri=shown, label=item.label)
    try:
        real = item.path.resolve(strict=True)
    except (OSError, RuntimeError):
        return _skip(base, "missing or unresolvable")
    if not within(real, roots):
        return _skip(base, "outside the data roots")
    try:
        str(real).encode("utf-8")
        (item.label or "").encode("utf-8")
    except UnicodeEncodeError:
        return _skip(base, "file name is not UTF-8")
    if not real.is_file():
        return _skip(base, "not a file")
    try:
        data = real.read_bytes()
    except OSError:
        return _skip(base, "unreadable")
    if not data:
        return _skip(base, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                return _skip(base, "too many pixels")
            im.load()
            width, height = im.size
    except UnidentifiedImageError:
        return _skip(base, "not an image")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return _skip(base, "corrupt image")
    return ScannedImage(
        position=position,
        uri=str(real),
        label=item.label,
        width=width,
        height=height,
        byte_size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _skip(base: ScannedImage, reason: str) -> ScannedImage:
    label = base.label.encode("utf-8", "backslashreplace").decode("utf-8") if base.label else None
    return ScannedImage(position=base.position, uri=base.uri, label=label, skipped=reason)
