"""Registering a source dataset: validate the request, then scan the source as a job.

Validation runs before anything is stored (bad name, unknown source plugin, missing or
unreadable path, a path outside the data roots, an empty source) so a bad request
changes nothing. The job reads, hashes and decodes every image on a thread pool,
skipping and counting unreadable ones and those above NDS_MAX_FILE_BYTES or
NDS_MAX_IMAGE_PIXELS (checked before reading or decoding them), and stores the samples batch by batch while the
dataset is 'registering'; if it fails (or its process dies) the dataset and its rows are
removed, so a registration is either complete or absent.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError
from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from nds.catalog.context import CatalogContext
from nds.catalog.datasets import check_name, purge_rows
from nds.catalog.db import session_scope
from nds.catalog.jobs import CPU, JobFailed, JobKind, JobReporter, create_job, datasets_with_live_jobs, register_job_kind
from nds.catalog.paths import resolve_in_roots, within
from nds.catalog.settings import Settings
from nds.catalog.tables import Dataset, DatasetStatus, Job, Sample, utcnow
from nds.plugins.contract import Source, SourceItem
from nds_client.errors import ConflictError, InvalidInputError, PluginError, SourceError
from nds_client.images import DEFAULT_MAX_IMAGE_PIXELS, TooManyPixels, open_image

log = logging.getLogger(__name__)

MAX_LISTED_SKIPS = 1000
BATCH = 4096  # source items read, scanned and stored at a time
HASH_CHUNK = 1 << 20  # a larger file is hashed in reads of this size, never held whole; a smaller one is read once
DEFAULT_MAX_FILE_BYTES = Settings.model_fields["max_file_bytes"].default  # NDS_MAX_FILE_BYTES
TOO_LARGE = "larger than NDS_MAX_FILE_BYTES"
TOO_MANY_PIXELS = "too many pixels for NDS_MAX_IMAGE_PIXELS"


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
    detail: str | None = None   # this file's numbers for the reason (the reason itself is one per kind, for counting)


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
    process dies, its rows are removed (by :func:`remove_partial_dataset`, the undo of its
    job kind, or by the next process that starts), so a registration is either complete
    or absent."""
    dataset_id = job.dataset_id
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
            scanned = scan_batch(pool, batch, seen, ctx.data_roots, max_file_bytes=ctx.settings.max_file_bytes,
                                 max_pixels=ctx.settings.max_image_pixels)
            seen += len(batch)
            rows = []
            for s in scanned:
                if s.skipped is not None:
                    reasons[s.skipped] += 1
                    if len(listed) < MAX_LISTED_SKIPS:
                        listed.append({"uri": s.uri, "reason": f"{s.skipped}: {s.detail}" if s.detail else s.skipped})
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


register_job_kind(JobKind("register", handler=run_registration, queue_class=CPU, undo=remove_partial_dataset))


def remove_interrupted_registrations(ctx: CatalogContext) -> list[str]:
    """Remove datasets left 'registering' with no live registration job (its process died);
    returns their names. Run after :func:`nds.catalog.jobs.mark_interrupted`, so a registration
    that a live process (a CLI beside the server) is running is left alone."""
    with session_scope(ctx.engine) as session:
        live = datasets_with_live_jobs(session, "register")
        stale = [d for d in session.exec(select(Dataset).where(Dataset.status == DatasetStatus.registering)).all() if d.id not in live]
        names = [d.name for d in stale]
        for dataset in stale:
            purge_rows(session, dataset.id)
            session.delete(dataset)
    return names


def scan_batch(pool: ThreadPoolExecutor, items: list[SourceItem], first: int, roots: list[Path], chunk: int = 64, *,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[ScannedImage]:
    """``scan_one`` over ``items`` (positions from ``first``), in order, ``chunk`` items per
    thread-pool task: a task per item costs more than the whole check of a missing file."""
    def run(start: int) -> list[ScannedImage]:
        return [scan_one(first + start + i, item, roots, max_file_bytes=max_file_bytes, max_pixels=max_pixels)
                for i, item in enumerate(items[start : start + chunk])]

    return [s for part in pool.map(run, range(0, len(items), chunk)) for s in part]


def scan_one(position: int, item: SourceItem, roots: list[Path], *,
             max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ScannedImage:
    """Check, decode and hash one item, in bounded memory: the file's size is checked
    before any byte is read (``max_file_bytes``), its header before any pixel is decoded
    (``max_pixels``); a file up to :data:`HASH_CHUNK` is read once, a larger one is decoded
    from the file and hashed in :data:`HASH_CHUNK` reads, never held whole (JPEGs decode at
    1/8 scale: enough to find a truncated or corrupt one)."""
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
        with real.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return _skip(base, "empty file")
            if size > max_file_bytes:
                return _skip(base, TOO_LARGE, f"{size:,} > {max_file_bytes:,} bytes")
            data = fh.read(size + 1) if size <= HASH_CHUNK else None  # nearly every image: one read (+1: to see it grew)
            if data is not None:  # (the file may have changed since the fstat)
                if not data:
                    return _skip(base, "empty file")
                if len(data) > size:  # it grew: stream it like a large one
                    data = None
                    fh.seek(0)
            try:
                with open_image(fh if data is None else data, max_pixels) as im:
                    width, height = im.size
                    im.draft(None, (max(width // 8, 1), max(height // 8, 1)))  # JPEG: decode at 1/8 scale; others ignore it
                    im.load()
            except TooManyPixels as exc:
                return _skip(base, TOO_MANY_PIXELS, f"{exc.size[0]}x{exc.size[1]} = {exc.pixels:,} > {max_pixels:,}"
                             if exc.size else f"{exc.pixels:,} > {max_pixels:,}")
            except UnidentifiedImageError:
                return _skip(base, "not an image")
            except (OSError, ValueError, SyntaxError, EOFError):
                return _skip(base, "corrupt image")
            if data is not None:
                hashed = hashlib.sha256(data).hexdigest(), len(data)
            else:
                fh.seek(0)
                hashed = _sha256(fh, max_file_bytes)
    except OSError:
        return _skip(base, "unreadable")
    if hashed is None:  # it grew past the cap after the size check
        return _skip(base, TOO_LARGE, f"more than {max_file_bytes:,} bytes")
    digest, byte_size = hashed
    return ScannedImage(
        position=position,
        uri=str(real),
        label=item.label,
        width=width,
        height=height,
        byte_size=byte_size,
        sha256=digest,
    )


def _sha256(fh: Any, limit: int) -> tuple[str, int] | None:
    """sha256 and length of the rest of ``fh``, read in :data:`HASH_CHUNK` pieces; None past ``limit`` bytes."""
    digest, total = hashlib.sha256(), 0
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    while n := fh.readinto(buf):
        total += n
        if total > limit:
            return None
        digest.update(view[:n])
    return digest.hexdigest(), total


def _skip(base: ScannedImage, reason: str, detail: str | None = None) -> ScannedImage:
    label = base.label.encode("utf-8", "backslashreplace").decode("utf-8") if base.label else None
    return ScannedImage(position=base.position, uri=base.uri, label=label, skipped=reason, detail=detail)
