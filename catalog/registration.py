"""Registering a source dataset: validate the request, then scan the source as a job.

Validation runs before anything is stored (bad name, unknown source plugin, missing or
unreadable path, a path outside the data roots, an empty source) so a bad request
changes nothing. The job reads, hashes and decodes every image on a thread pool,
skipping and counting unreadable ones, and stores all samples in one transaction; if it
fails, the dataset row is removed, so a registration is either complete or absent.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
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
    """The job: scan, decode and store every sample of the job's dataset."""
    dataset_id = job.dataset_id
    try:
        with session_scope(ctx.engine) as session:
            dataset = session.get(Dataset, dataset_id)
            if dataset is None:
                raise JobFailed(f"dataset {dataset_id} no longer exists")
            name, uri, source_name = dataset.name, dataset.uri, dataset.source
        report.step("scan", start=0.0, end=0.95)
        items = list(open_source(ctx, source_name, Path(uri)).items())
        scanned = scan_items(items, ctx.data_roots, workers=ctx.settings.scan_workers, progress=report.progress)
        good = [s for s in scanned if s.skipped is None]
        skipped = [s for s in scanned if s.skipped is not None]
        reasons = Counter(s.skipped for s in skipped)
        if not good:
            detail = ", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "no files"
            raise JobFailed(f"no readable images in {uri} ({detail})")
        report.step("store", start=0.95, end=1.0)
        labels = sorted({s.label for s in good if s.label is not None})
        with session_scope(ctx.engine) as session:
            session.exec(delete(Sample).where(Sample.dataset_id == dataset_id))  # a redelivered job starts clean
            session.execute(
                insert(Sample),
                [
                    {
                        "dataset_id": dataset_id,
                        "position": i,
                        "uri": s.uri,
                        "label": s.label,
                        "width": s.width,
                        "height": s.height,
                        "byte_size": s.byte_size,
                        "sha256": s.sha256,
                    }
                    for i, s in enumerate(good)
                ],
            )
            dataset = session.get(Dataset, dataset_id)
            dataset.num_samples = len(good)
            dataset.num_labels = len(labels)
            dataset.labels = labels
            dataset.skipped = len(skipped)
            dataset.status = DatasetStatus.ready
            dataset.updated_at = utcnow()
    except BaseException:
        remove_partial_dataset(ctx, dataset_id)
        raise
    return {
        "dataset_id": dataset_id,
        "name": name,
        "num_samples": len(good),
        "num_labels": len(labels),
        "skipped": len(skipped),
        "skipped_reasons": dict(reasons),
        "skipped_files": [{"uri": s.uri, "reason": s.skipped} for s in skipped[:MAX_LISTED_SKIPS]],
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


def scan_items(items: list[SourceItem], roots: list[Path], *, workers: int, progress=None) -> list[ScannedImage]:  # noqa: ANN001
    """Read, hash and decode every item on a thread pool, in order."""
    total = max(len(items), 1)
    out: list[ScannedImage] = []
    with ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="nds-scan") as pool:
        for i, scanned in enumerate(pool.map(lambda a: scan_one(*a, roots), enumerate(items), chunksize=64)):
            out.append(scanned)
            if progress is not None and (i % 256 == 0 or i + 1 == total):
                progress((i + 1) / total)
    return out


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
