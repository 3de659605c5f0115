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
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from nds.catalog.bulk import bulk_insert
from nds.catalog.context import CatalogContext
from nds.catalog.datasets import check_name, purge_rows
from nds.catalog.db import session_scope
from nds.catalog.jobs import CPU, JobFailed, JobKind, create_job, datasets_with_live_jobs, register_job_kind
from nds.catalog.paths import DataRoots, within
from nds.catalog.settings import Settings
from nds.catalog.tables import Dataset, DatasetStatus, Job, Sample, utcnow
from nds.catalog.task_graph import Graph, TaskRun, TaskSpec
from nds.plugins.contract import SkippedPart, Source, SourceItem
from nds_client import storage
from nds_client.errors import ConflictError, InvalidInputError, NDSError, PluginError, ServiceUnavailableError, SourceError, StorageMissing, StorageTooLarge
from nds_client.images import DEFAULT_MAX_IMAGE_PIXELS, TooManyPixels, open_image

log = logging.getLogger(__name__)

MAX_LISTED_SKIPS = 1000
BATCH = 4096  # source items read, scanned and stored at a time
BATCH_BYTES = 64 << 20  # ... or fewer, when the source streamed this many bytes of images with them
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
    options: dict[str, str] = field(default_factory=dict)


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
    shard: str | None = None
    offset: int | None = None
    meta: Mapping[str, Any] | None = None


def open_source(ctx: CatalogContext, source_name: str, location: str, options: Mapping[str, str] | None = None) -> Source:
    """The source plugin ``source_name`` on ``location`` (already checked against the data roots), reading through the roots' storage."""
    try:
        source_cls = ctx.sources.get(source_name)
    except PluginError as exc:
        raise InvalidInputError(exc.message, field="source", hint=exc.hint) from exc
    options = dict(options or {})
    known = getattr(source_cls, "options", {}) or {}
    unknown = sorted(set(options) - set(known))
    if unknown:
        offered = ", ".join(f"{k} ({v})" for k, v in known.items()) or "none"
        raise InvalidInputError(f"the {source_name} source takes no option {', '.join(unknown)}; its options: {offered}", field="options")
    return source_cls(location, ctx.source_storage, **options)


def count_source_parts(source: Source, shown: str) -> int:
    """The number of the source's parts (files or shards), refusing an empty source."""
    parts = source.count_parts() if hasattr(source, "count_parts") else len(source.parts())
    if not parts:
        raise SourceError(f"{shown} holds no files to register", field="path", hint="point at a folder, file, pattern or manifest with images")
    return parts


def prepare_registration(ctx: CatalogContext, request: RegistrationRequest) -> tuple[str, int]:
    """Check a request without storing anything; returns the checked location and its number of parts."""
    check_name(request.name)
    location = ctx.roots.check_pattern(request.path, field="path")
    source = open_source(ctx, request.source, location, request.options)
    return location, count_source_parts(source, request.path)


def start_registration(ctx: CatalogContext, request: RegistrationRequest) -> tuple[Dataset, Job]:
    """Validate, then store the dataset (status 'registering') and its job; the caller dispatches the job."""
    location, count = prepare_registration(ctx, request)
    try:
        with session_scope(ctx.engine) as session:
            if session.exec(select(Dataset.id).where(Dataset.name == request.name)).first() is not None:
                raise ConflictError(f"a dataset named {request.name!r} already exists", hint="pick another name or delete it first")
            dataset = Dataset(
                name=request.name,
                source=request.source,
                uri=location,
                description=request.description,
                license=request.license,
                options=dict(request.options),
                status=DatasetStatus.registering,
            )
            session.add(dataset)
            session.flush()
            job = create_job(session, kind="register", dataset_id=dataset.id, params={"parts": count})
    except IntegrityError as exc:  # a concurrent request won the race for the name
        raise ConflictError(f"a dataset named {request.name!r} already exists") from exc
    return dataset, job


# --------------------------------------------------------------------------- the graph
#
# scan:0..C-1 (cpu queue, side by side) -> commit. Each scan task reads one chunk of the
# source's sorted parts (shards, files) and stores its samples at positions from
# chunk << POSITION_BITS, so the chunks keep the source's order without knowing each other's
# sizes; the commit adds their counts up and makes the dataset ready, once.

SCAN, COMMIT = "scan", "commit"
#: at most this many scanning tasks per registration (a folder of 10^6 files is 256 chunks, not 62,500)
MAX_SCAN_TASKS = 256
#: a chunk's samples take positions [chunk << 32, (chunk + 1) << 32): order keys, not counts
POSITION_BITS = 32


def _parts_digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()  # names not UTF-8 are skipped later


def plan_registration(ctx: CatalogContext, job: Job) -> list[TaskSpec]:
    """One scanning task per chunk of ``NDS_REGISTER_CHUNK_PARTS`` parts (at most
    :data:`MAX_SCAN_TASKS`), then one commit."""
    name, uri, source_name, options = _dataset_source(ctx, job.dataset_id)
    source = open_source(ctx, source_name, uri, options)
    if not source.chunked:  # one task streams every item; nothing is listed up front
        return [TaskSpec(f"{SCAN}:0", CPU, (), {"lo": 0, "hi": None, "parts": None, "digest": None}, weight=10),
                TaskSpec(COMMIT, CPU, (f"{SCAN}:0",), weight=0.1)]
    parts = source.parts()
    if not parts:
        raise JobFailed(f"no readable images in {uri} (no files)")
    size = max(ctx.settings.register_chunk_parts, -(-len(parts) // MAX_SCAN_TASKS))
    digest = _parts_digest(parts)
    scans = [TaskSpec(f"{SCAN}:{c}", CPU, (), {"lo": lo, "hi": min(lo + size, len(parts)), "parts": len(parts), "digest": digest},
                      weight=(min(lo + size, len(parts)) - lo) / len(parts) * 10)
             for c, lo in enumerate(range(0, len(parts), size))]
    return [*scans, TaskSpec(COMMIT, CPU, tuple(t.name for t in scans), weight=0.1)]


def _dataset_source(ctx: CatalogContext, dataset_id: int | None) -> tuple[str, str, str, dict[str, str]]:
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise JobFailed(f"dataset {dataset_id} no longer exists")
        return dataset.name, dataset.uri, dataset.source, dict(dataset.options or {})


def task_scan(ctx: CatalogContext, job: Job, task: TaskRun) -> dict[str, Any]:
    """Scan, decode and store one chunk of the source's parts. A redelivered task starts its
    chunk clean; a source whose parts changed since the job was planned fails the job."""
    _, uri, source_name, options = _dataset_source(ctx, job.dataset_id)
    chunk = int(task.name.partition(":")[2])
    source = open_source(ctx, source_name, uri, options)
    if task.params["digest"] is None:  # a source scanned whole (not chunked): stream it
        items, total = source.items(), int((job.params or {}).get("parts") or 1)  # counted when the job was started
    else:
        lo, hi = int(task.params["lo"]), int(task.params["hi"])
        parts = source.parts()
        if len(parts) != task.params["parts"] or _parts_digest(parts) != task.params["digest"]:
            raise JobFailed(f"the files of {uri} changed while it was being registered ({task.params['parts']} parts, now {len(parts)})",
                            hint="register it again once it is complete")
        items = source.items() if (lo, hi) == (0, len(parts)) else source.items(parts[lo:hi])  # one chunk: any source's items()
        total = hi - lo
    first = chunk << POSITION_BITS
    with session_scope(ctx.engine) as session:
        session.exec(delete(Sample).where(Sample.dataset_id == job.dataset_id, Sample.position >= first,
                                          Sample.position < first + (1 << POSITION_BITS)))
    scan = store_items(ctx, job.dataset_id, items, first_position=first, total_parts=total,
                       progress=task.report.progress)
    return {"stored": scan.stored, "labels": sorted(scan.labels), "reasons": dict(scan.reasons), "listed": scan.listed,
            "skipped_parts": scan.skipped_parts}


def task_commit(ctx: CatalogContext, job: Job, task: TaskRun) -> dict[str, Any]:
    """Add the chunks up and make the dataset ready (the job succeeds in the same transaction)."""
    name, uri, _, _ = _dataset_source(ctx, job.dataset_id)
    scan = StoredScan()
    for part in task.inputs_of(SCAN):
        scan.stored += part["stored"]
        scan.labels.update(part["labels"])
        scan.reasons.update(part["reasons"])
        scan.listed.extend(part["listed"][: MAX_LISTED_SKIPS - len(scan.listed)])
        scan.skipped_parts.extend(part["skipped_parts"][: MAX_LISTED_SKIPS - len(scan.skipped_parts)])
    if scan.stored == 0:
        detail = ", ".join(f"{n} {r}" for r, n in scan.reasons.most_common()) or "no files"
        bad = f"; {len(scan.skipped_parts)} unreadable part(s), e.g. {scan.skipped_parts[0]['part']}: {scan.skipped_parts[0]['reason']}" \
            if scan.skipped_parts else ""
        raise JobFailed(f"no readable images in {uri} ({detail}{bad})")
    result = {"dataset_id": job.dataset_id, "name": name, **scan.summary()}
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, job.dataset_id)
        dataset.num_samples = scan.stored
        dataset.num_labels = len(scan.labels)
        dataset.labels = sorted(scan.labels)
        dataset.skipped = scan.skipped
        dataset.status = DatasetStatus.ready
        dataset.updated_at = utcnow()
        task.complete_in(session, result)
    return result


REGISTER_GRAPH = Graph(plan=plan_registration, handlers={SCAN: task_scan, COMMIT: task_commit})


@dataclass
class StoredScan:
    """What :func:`store_items` stored and skipped."""

    stored: int = 0
    labels: set[str] = field(default_factory=set)
    reasons: Counter[str] = field(default_factory=Counter)
    listed: list[dict[str, str]] = field(default_factory=list)
    skipped_parts: list[dict[str, str]] = field(default_factory=list)
    sample_ids: list[int] = field(default_factory=list)  # when asked for: the ids of the stored samples, in order

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> dict[str, Any]:
        return {
            "num_samples": self.stored,
            "num_labels": len(self.labels),
            "skipped": self.skipped,
            "skipped_reasons": dict(self.reasons),
            "skipped_files": self.listed,
            "skipped_parts": self.skipped_parts,
        }


def _part_of(item: SourceItem) -> str:
    return item.shard or item.uri


def store_items(
    ctx: CatalogContext, dataset_id: int, items: Iterator[SourceItem | SkippedPart], *, first_position: int, total_parts: int,
    progress: Callable[[float], None] | None = None, keep_ids: bool = False,
) -> StoredScan:
    """Scan ``items`` and store the usable ones as samples of ``dataset_id`` from position ``first_position``.

    Streams: items are read, scanned and stored a batch at a time (:data:`BATCH` items or
    :data:`BATCH_BYTES` of streamed image bytes, whichever comes first), so a source of
    millions of samples needs bounded memory, and each batch is committed so the catalog is
    never locked for the whole scan. A part (shard) is stored only once it ended well: the
    scanned rows of the part being read wait for its end, and a :class:`SkippedPart` drops
    them, so a truncated shard leaves nothing behind, and the part is listed with its reason."""
    out = StoredScan()
    pending: list[dict[str, Any]] = []  # scanned rows of parts not yet known to be complete
    current: str | None = None          # the part the last item belongs to
    dropped: set[str] = set()           # parts given up (a SkippedPart arrived)
    parts_done = 0

    def flush(keep_last_part: bool) -> None:
        nonlocal pending
        if keep_last_part and current is not None:
            ready = [r for r in pending if r["_part"] != current]
            pending = [r for r in pending if r["_part"] == current]
        else:
            ready, pending = pending, []
        if not ready:
            return
        rows = []
        for r in ready:
            r.pop("_part")
            r["position"] = first_position + out.stored + len(rows)
            if r["label"] is not None:
                out.labels.add(r["label"])
            rows.append(r)
        with session_scope(ctx.engine) as session:
            bulk_insert(session, Sample, rows)  # COPY on PostgreSQL, executemany on SQLite; ids from the database
            if keep_ids:  # the batch's positions are its own (unique per dataset): its ids, in position order
                lo, hi = rows[0]["position"], rows[-1]["position"]
                out.sample_ids.extend(session.exec(
                    select(Sample.id).where(Sample.dataset_id == dataset_id, Sample.position >= lo, Sample.position <= hi)
                    .order_by(Sample.position)).all())
        out.stored += len(rows)

    settings = ctx.settings
    with ThreadPoolExecutor(max_workers=max(settings.scan_workers, 1), thread_name_prefix="nds-scan") as pool:
        for batch in _batches(items):
            entries = [e for e in batch if isinstance(e, SourceItem)]
            scanned = iter(scan_batch(pool, entries, 0, ctx.roots, max_file_bytes=settings.max_file_bytes, max_pixels=settings.max_image_pixels))
            for entry in batch:
                if isinstance(entry, SkippedPart):
                    dropped.add(entry.part)
                    pending = [r for r in pending if r["_part"] != entry.part]
                    if len(out.skipped_parts) < MAX_LISTED_SKIPS:
                        out.skipped_parts.append({"part": entry.part, "reason": entry.reason})
                    log.warning("skipped %s: %s", entry.part, entry.reason)
                    if entry.part != current:
                        parts_done += 1
                    current = None
                    continue
                s = next(scanned)
                part = _part_of(entry)
                if part != current:
                    current, parts_done = part, parts_done + 1
                if part in dropped:
                    continue
                if s.skipped is not None:
                    out.reasons[s.skipped] += 1
                    if len(out.listed) < MAX_LISTED_SKIPS:
                        out.listed.append({"uri": s.uri, "reason": f"{s.skipped}: {s.detail}" if s.detail else s.skipped})
                    continue
                pending.append({"_part": part, "dataset_id": dataset_id, "uri": s.uri, "label": s.label, "width": s.width,
                                "height": s.height, "byte_size": s.byte_size, "sha256": s.sha256, "shard": s.shard,
                                "offset": s.offset, "meta": dict(s.meta) if s.meta else None})
            flush(keep_last_part=True)
            if progress is not None:
                progress(min(parts_done / max(total_parts, 1), 1.0))
    flush(keep_last_part=False)
    return out


def _batches(items: Iterator[SourceItem | SkippedPart]) -> Iterator[list[SourceItem | SkippedPart]]:
    batch: list[SourceItem | SkippedPart] = []
    held = 0
    for item in items:
        batch.append(item)
        if isinstance(item, SourceItem) and item.data is not None:
            held += len(item.data)
        if len(batch) >= BATCH or held >= BATCH_BYTES:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def remove_partial_dataset(ctx: CatalogContext, dataset_id: int | None) -> None:
    """Delete a dataset whose registration did not complete (never one that is ready)."""
    if dataset_id is None:
        return
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is not None and dataset.status == DatasetStatus.registering:
            purge_rows(session, dataset_id)
            session.delete(dataset)


register_job_kind(JobKind("register", handler=None, queue_class=CPU, undo=remove_partial_dataset, graph=REGISTER_GRAPH))


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


def scan_batch(pool: ThreadPoolExecutor, items: list[SourceItem], first: int, roots: DataRoots | list[Path], chunk: int = 64, *,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[ScannedImage]:
    """``scan_one`` over ``items`` (positions from ``first``), in order, ``chunk`` items per
    thread-pool task: a task per item costs more than the whole check of a missing file."""
    if not isinstance(roots, DataRoots):
        roots = DataRoots(tuple(roots))
    allowed: dict[str, bool] = {}  # container -> inside the roots, checked once per batch (a shard's members share one)
    down: list[ServiceUnavailableError] = []  # the first "store is down": the other tasks stop at their next item

    def run(start: int) -> list[ScannedImage]:
        out = []
        for i, item in enumerate(items[start : start + chunk]):
            if down:
                raise down[0]
            try:
                out.append(scan_one(first + start + i, item, roots, max_file_bytes=max_file_bytes, max_pixels=max_pixels, allowed=allowed))
            except ServiceUnavailableError as exc:
                down.append(exc)
                raise
        return out

    try:
        return [s for part in pool.map(run, range(0, len(items), chunk)) for s in part]
    except ServiceUnavailableError:
        if down:  # map cancelled the tasks not started; the running ones stopped at their next item
            raise down[0] from None
        raise


def scan_one(position: int, item: SourceItem, roots: DataRoots | list[Path], *,
             max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
             allowed: dict[str, bool] | None = None) -> ScannedImage:
    """Check, decode and hash one item, in bounded memory: the file's size is checked
    before any byte is read (``max_file_bytes``), its header before any pixel is decoded
    (``max_pixels``); a file up to :data:`HASH_CHUNK` is read once, a larger one is decoded
    from the file and hashed in :data:`HASH_CHUNK` reads, never held whole (JPEGs decode at
    1/8 scale: enough to find a truncated or corrupt one). Items inside containers, with
    their bytes or not, and object-storage files go through :func:`_scan_remote_or_member`."""
    if not isinstance(roots, DataRoots):
        roots = DataRoots(tuple(roots))
    if item.data is not None or item.shard is not None or storage.is_remote(item.uri):
        return _scan_remote_or_member(position, item, roots, max_file_bytes=max_file_bytes, max_pixels=max_pixels,
                                      allowed={} if allowed is None else allowed)
    local_roots = list(roots.local)
    shown = os.fsdecode(item.path).encode("utf-8", "backslashreplace").decode("utf-8")
    base = ScannedImage(position=position, uri=shown, label=item.label)
    try:
        real = item.path.resolve(strict=True)
    except (OSError, RuntimeError):
        return _skip(base, "missing or unresolvable")
    if not within(real, local_roots):
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
            decoded = _decode(fh if data is None else data, max_pixels)
            if isinstance(decoded[0], str):
                return _skip(base, *decoded)
            width, height = decoded
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
        meta=item.meta,  # a plain file keeps what its source knows too (COCO's categories)
    )


def _scan_remote_or_member(position: int, item: SourceItem, roots: DataRoots, *, max_file_bytes: int, max_pixels: int,
                           allowed: dict[str, bool]) -> ScannedImage:
    """An object-storage file, or a sample inside a container (tar member, Parquet row):
    its bytes come with the item (streamed by the source) or are read with one request.
    ``allowed`` remembers which containers lie inside the roots (for the batch being scanned)."""
    shown = item.uri.encode("utf-8", "backslashreplace").decode("utf-8")
    base = ScannedImage(position=position, uri=shown, label=item.label, shard=item.shard, offset=item.offset, meta=item.meta)
    container = item.shard or item.uri
    inside = allowed.get(container)
    if inside is None:
        inside = allowed[container] = roots.contains(container if storage.is_remote(container) else str(storage.local_path(container).resolve()))
    if not inside:
        return _skip(base, "outside the data roots")
    data = item.data
    if data is None:
        try:
            if item.size is not None and item.size > max_file_bytes:
                return _skip(base, TOO_LARGE, f"{item.size:,} > {max_file_bytes:,} bytes")
            location = storage.Location(item.uri, item.shard, item.offset, item.size)
            data = storage.read_location(location) if item.shard else storage.read_bytes(item.uri, limit=max_file_bytes)
        except ServiceUnavailableError:
            raise  # the store is down: the job fails with the reason (and is retried), nothing half-written stays
        except StorageTooLarge as exc:
            return _skip(base, TOO_LARGE, f"{exc.size:,} bytes, more than {exc.limit:,}")
        except StorageMissing:
            return _skip(base, "missing or unresolvable")  # as a missing local file
        except NDSError:
            return _skip(base, "unreadable")
    if not data:
        return _skip(base, "empty file")
    if len(data) > max_file_bytes:
        return _skip(base, TOO_LARGE, f"{len(data):,} > {max_file_bytes:,} bytes")
    decoded = _decode(bytes(data), max_pixels)
    if isinstance(decoded[0], str):
        return _skip(base, *decoded)
    width, height = decoded
    return ScannedImage(position=position, uri=item.uri, label=item.label, width=width, height=height, byte_size=len(data),
                        sha256=hashlib.sha256(data).hexdigest(), shard=item.shard, offset=item.offset, meta=item.meta)


def _decode(source: Any, max_pixels: int) -> tuple[int, int] | tuple[str, str | None]:
    """Decode an image (bytes or a binary file) to check it, in bounded memory: its header is
    checked before any pixel is decoded (``max_pixels``) and a JPEG decodes at 1/8 scale,
    enough to find a truncated or corrupt one. ``(width, height)``, or ``(reason, detail)``
    for :func:`_skip`."""
    try:
        with open_image(source, max_pixels) as im:
            width, height = im.size
            im.draft(None, (max(width // 8, 1), max(height // 8, 1)))  # JPEG: decode at 1/8 scale; others ignore it
            im.load()
    except TooManyPixels as exc:
        return TOO_MANY_PIXELS, (f"{exc.size[0]}x{exc.size[1]} = {exc.pixels:,} > {max_pixels:,}" if exc.size else f"{exc.pixels:,} > {max_pixels:,}")
    except UnidentifiedImageError:
        return "not an image", None
    except (OSError, ValueError, SyntaxError, EOFError):
        return "corrupt image", None
    return width, height


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
    return ScannedImage(position=base.position, uri=base.uri, label=label, skipped=reason, detail=detail, shard=base.shard, offset=base.offset)
