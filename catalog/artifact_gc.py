"""Garbage collection of the artifact store: remove the files no catalog row refers to.

What counts as **referenced** (kept whatever its age):

* ``experts.artifact`` of every expert row, of every index version still stored;
* ``backbones/published/<version>.onnx`` and ``.json`` of every backbone version a dataset
  row names (``datasets.backbone``);
* ``queries/<id>.picks`` of every stored query;
* ``snapshots/<dataset>/v<version>-a<active>.arrow``, the columnar snapshot of every index
  version still stored, built at its dataset's current active version (a snapshot built at an
  earlier active version, before a sync, is superseded and goes like any unreferenced file);
* backbone pointer files (``backbones/<name>.json`` directly under ``backbones/``, e.g. the
  default backbone's ``default.json``) and the artifact each one names: the embedding network
  the next index job loads;
* lock files (``*.lock``): unlinking a held lock would let a second process take it;
* ``jobs/<id>/`` of a queued or running job: the arrays its tasks hand each other (a job
  that ended removes its own; what a killed process left is collected like the rest).

Files outside ``experts/``, ``backbones/``, ``queries/``, ``snapshots/`` and ``jobs/`` are left alone (nothing in the
catalog writes them), except writers' temp files. Everything else is **unreferenced** and
removed once it is older than the grace period (default 1 hour): a writer that has written
its file but not yet committed the row naming it (a query between its picks file and its
row, an index job between its first expert and its commit) is never hit. Temp files
(``.tmp-*`` of the store, ``.<name>.*.tmp`` of the ONNX exporter) follow the same rule: a
live writer's is young and kept, a dead writer's is old and removed.

Two rules cover writers that reuse an *old* file (content-addressed keys: an index job that
finds a file of the same inputs keeps it instead of training again): the folder
``experts/<id>/`` of a dataset that is registering or indexing is never touched, nor is
``backbones/published/`` while any dataset is. The rows are read before the store is walked
and again before anything is removed; a file referenced or protected in either reading is
kept, and each file is stat-ed again just before it is unlinked (a file replaced or
rewritten since is kept).

``release`` names keys whose rows the caller has just deleted (a dataset's experts, after
``nds datasets rm``): they go at once, without waiting for the grace period, if nothing
else refers to them and no rule protects them.

A store in object storage (``NDS_ARTIFACTS_DIR=s3://...``) is collected by the same rules:
its objects are listed (one listing of the prefix), an object's age is its LastModified,
and it is asked for again (ETag and time) just before it is deleted. It holds no temp files
(an upload appears whole or not at all) and no lock files (those are in the local cache,
which this does not touch: it is a copy, refilled on demand).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from sqlalchemy import Connection, select

from nds.catalog.artifacts import is_temp_name, walk_files
from nds.catalog.context import CatalogContext
from nds.catalog.retrieval.picks import PICKS_PREFIX, picks_key
from nds.catalog.retrieval.snapshot import SNAPSHOT_PREFIX, snapshot_key
from nds.catalog.spaces import PUBLISHED
from nds.catalog.tables import Dataset, DatasetStatus, Expert, Group, Job, JobStatus, Query
from nds_client.errors import NotFoundError

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 3600.0
JOBS_PREFIX = "jobs"  # jobs/<job id>/: what a job's tasks hand each other (nds.catalog.indexing)
MANAGED = ("experts", "backbones", PICKS_PREFIX, SNAPSHOT_PREFIX, JOBS_PREFIX)  # the top-level folders the catalog writes
BUSY = (DatasetStatus.registering, DatasetStatus.indexing)
LISTED_KEYS = 1000  # at most this many removed keys are listed in the report


@dataclass
class GcReport:
    dry_run: bool
    grace_seconds: float
    removed: int = 0            # unreferenced files removed (would be, with dry_run)
    removed_bytes: int = 0
    temp_removed: int = 0       # of which temp files of dead writers
    kept: int = 0               # referenced (or protected by a running job)
    kept_bytes: int = 0
    young: int = 0              # unreferenced, but inside the grace period: a writer may still commit its row
    young_bytes: int = 0
    removed_keys: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Roots:
    keys: set[str]
    busy_datasets: set[int]
    known_datasets: set[int]
    live_jobs: set[str] = field(default_factory=set)

    @property
    def any_busy(self) -> bool:
        return bool(self.busy_datasets)


def _roots(ctx: CatalogContext) -> _Roots:
    keys: set[str] = set()
    with ctx.engine.connect() as conn:
        keys.update(conn.execute(select(Expert.artifact).distinct()).scalars())
        datasets = conn.execute(select(Dataset.id, Dataset.status, Dataset.backbone)).all()
        keys.update(picks_key(qid) for qid in conn.execute(select(Query.id)).scalars())
        keys.update(_snapshot_keys(conn))
        live = set(conn.execute(select(Job.id).where(Job.status.in_([JobStatus.queued, JobStatus.running]))).scalars())
    busy: set[int] = set()
    for did, status, backbone in datasets:
        if DatasetStatus(status) in BUSY:
            busy.add(did)
        if backbone:
            keys.update((f"{PUBLISHED}/{backbone}.onnx", f"{PUBLISHED}/{backbone}.json"))
    keys.update(_pointer_targets(ctx))
    return _Roots(keys, busy, {d[0] for d in datasets}, live)


def _snapshot_keys(conn: Connection) -> set[str]:
    """The snapshot of every index version still stored, at its dataset's active version."""
    active = dict(conn.execute(select(Dataset.id, Dataset.index_version)).all())
    stored = conn.execute(select(Group.dataset_id, Group.index_version).distinct()).all()
    return {snapshot_key(did, version, active[did]) for did, version in stored if did in active}


def _pointer_targets(ctx: CatalogContext) -> set[str]:
    """Backbone pointer files (``backbones/*.json``) and the artifacts they name."""
    import json

    found: set[str] = set()
    names = [o.key.split("/", 1)[1] for o in ctx.artifacts.list_objects("backbones") if o.key.count("/") == 1]
    for name in names:
        if is_temp_name(name) or not name.endswith(".json"):
            continue
        found.add(f"backbones/{name}")
        try:
            target = json.loads(ctx.artifacts.open_path(f"backbones/{name}").read_text()).get("artifact")
        except (OSError, ValueError, AttributeError, NotFoundError):
            continue
        if isinstance(target, str):
            found.add(target)
    return found


def _protected(key: str, roots: _Roots) -> bool:
    """Whether a running job may be about to refer to ``key`` (see the module docstring)."""
    parts = PurePosixPath(key).parts
    if parts[0] == "experts" and len(parts) > 2 and parts[1].isdigit() and int(parts[1]) in roots.busy_datasets:
        return True
    if parts[0] == JOBS_PREFIX and len(parts) > 2 and parts[1] in roots.live_jobs:
        return True
    return key.startswith(f"{PUBLISHED}/") and roots.any_busy


@dataclass(frozen=True)
class _ObjectStat:
    """What the collection compares of an object (an os.stat_result's fields; the ETag as its inode)."""

    st_size: int
    st_mtime: float
    st_ino: str | None


def _listing(ctx: CatalogContext) -> Iterable[tuple[str, os.stat_result | _ObjectStat]] | None:
    """(key, stat) of every file of the store; None when there is no store yet."""
    if ctx.artifacts.remote:
        return [(o.key, _ObjectStat(o.size, o.mtime, o.etag)) for o in ctx.artifacts.list_objects()]
    if not ctx.artifacts.root.is_dir():
        return None
    return walk_files(ctx.artifacts.root)


def gc(
    ctx: CatalogContext, *, dry_run: bool = False, grace_seconds: float = DEFAULT_GRACE_SECONDS,
    release: Iterable[str] = (), now: float | None = None,
) -> GcReport:
    """Remove (``dry_run``: only count) the store's files that no row refers to and that are
    older than ``grace_seconds``, or named in ``release``; see the module docstring."""
    grace_seconds = max(0.0, float(grace_seconds))
    report = GcReport(dry_run=dry_run, grace_seconds=grace_seconds)
    released = set(release)
    before = _roots(ctx)
    listing = _listing(ctx)
    if listing is None:
        return report
    candidates: list[tuple[str, os.stat_result | _ObjectStat, bool]] = []  # (key, stat, is temp)
    for key, st in listing:
        name = key.rsplit("/", 1)[-1]
        temp = is_temp_name(name)
        if name.endswith(".lock") or (not temp and ("/" not in key or key.split("/", 1)[0] not in MANAGED)):
            continue  # locks, and files the catalog did not write: never ours to remove
        if not temp and (key in before.keys or _protected(key, before)):
            report.kept += 1
            report.kept_bytes += st.st_size
            continue
        candidates.append((key, st, temp))
    after = _roots(ctx)  # rows committed while the store was walked count too
    clock = time.time() if now is None else now
    for key, st, temp in candidates:
        if not temp and (key in after.keys or _protected(key, after)):
            report.kept += 1
            report.kept_bytes += st.st_size
            continue
        old = clock - st.st_mtime >= grace_seconds
        if not old and not (key in released and not temp):
            report.young += 1
            report.young_bytes += st.st_size
            continue
        if not dry_run and not _unlink_if_unchanged(ctx, key, st, None if key in released else grace_seconds, clock):
            report.young += 1
            report.young_bytes += st.st_size
            continue
        report.removed += 1
        report.removed_bytes += st.st_size
        report.temp_removed += int(temp)
        if len(report.removed_keys) < LISTED_KEYS:
            report.removed_keys.append(key)
    if not dry_run:
        _remove_empty_expert_folders(ctx, after)
    return report


def _unlink_if_unchanged(ctx: CatalogContext, key: str, seen: os.stat_result | _ObjectStat, grace: float | None, clock: float) -> bool:
    """Unlink ``key`` if it is still the file that was seen (same inode, not written since)."""
    if ctx.artifacts.remote:
        now = ctx.artifacts.stat(key)
        # the ETag says whether it was rewritten; times only to the second (a HEAD's Last-Modified, a listing's may have ms)
        if now is None or now.etag != seen.st_ino or abs(now.mtime - seen.st_mtime) >= 1 or (grace is not None and clock - now.mtime < grace):
            return False
        ctx.artifacts.delete(key)
        return True
    path = ctx.artifacts.root / key
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if st.st_ino != seen.st_ino or st.st_mtime != seen.st_mtime or (grace is not None and clock - st.st_mtime < grace):
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _remove_empty_expert_folders(ctx: CatalogContext, roots: _Roots) -> None:
    """``experts/<id>/`` folders left empty by datasets that no longer exist (ids are never
    reused, so no writer can be about to put a file there)."""
    folder = ctx.artifacts.root / "experts"
    if ctx.artifacts.remote or not folder.is_dir():  # object storage has no folders
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink() and entry.name.isdigit() and int(entry.name) not in roots.known_datasets:
            try:
                entry.rmdir()
            except OSError:
                pass  # not empty (or already gone)


def collect_after_delete(ctx: CatalogContext, released: Iterable[str]) -> GcReport | None:
    """The gc that follows a dataset's deletion: ``released`` (its experts' files) at once,
    the rest after the grace period. A failure is logged, never raised: the delete is done."""
    try:
        report = gc(ctx, release=released)
    except Exception:  # noqa: BLE001 - the next 'nds artifacts gc' collects what this one could not
        log.exception("artifact gc after a dataset delete failed")
        return None
    if report.removed:
        log.info("artifact gc: removed %d files (%d bytes)", report.removed, report.removed_bytes)
    return report
