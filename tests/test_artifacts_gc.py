"""The artifact store's garbage collection (``nds artifacts gc``, and after a dataset is
deleted), a query that fails after writing its picks file, a full disk (503, no server path),
and damaged picks files (410 that says to run the query again, never a MemoryError)."""

from __future__ import annotations

import json
import os
import re
import struct
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import Session, select

from nds.catalog.artifact_gc import DEFAULT_GRACE_SECONDS, gc
from nds.catalog.context import CatalogContext
from nds.catalog.db import session_scope, upgrade
from nds.catalog.retrieval.manifest import iter_manifest
from nds.catalog.retrieval.picks import picks_key
from nds.catalog.retrieval.queries import run_query
from nds.catalog.retrieval.request import QueryRequest
from nds.catalog.settings import load_settings
from nds.catalog.tables import Dataset, DatasetStatus, Expert, Query
from nds.samples.synthetic import add_indexed_dataset
from nds_client.errors import GoneError, StorageFullError
from tests.conftest import LOOPBACK, small_tmpfs

OLD = 2 * DEFAULT_GRACE_SECONDS  # an age well past the default grace period


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def put(ctx: CatalogContext, key: str, data: bytes = b"x" * 100, *, old: bool = True) -> Path:
    """Write ``key`` through the store (temp + rename, as the catalog does); old: aged past the grace."""
    path = ctx.artifacts.write_bytes(key, data)
    if old:
        age(path, OLD)
    return path


def files(ctx: CatalogContext) -> set[str]:
    root = ctx.artifacts.root
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def build_store(ctx: CatalogContext):
    """Datasets A (backbone bb-a) and B (bb-b) with expert files under experts/<id>/, their
    published backbones, the default backbone's pointer and network, and a backbone lock; all old."""
    a = add_indexed_dataset(ctx, "A", clusters=2, labels=["x", "y"])
    b = add_indexed_dataset(ctx, "B", clusters=2, labels=["x", "z"])
    with session_scope(ctx.engine) as session:
        for d, backbone in ((a, "bb-a"), (b, "bb-b")):
            session.get(Dataset, d.dataset_id).backbone = backbone
            for e in session.exec(select(Expert).where(Expert.dataset_id == d.dataset_id)).all():
                e.artifact = f"experts/{d.dataset_id}/{e.kind.value}-{e.id:04d}.onnx"
    with Session(ctx.engine) as session:
        keys = {e.dataset_id: [] for e in session.exec(select(Expert)).all()}
        for e in session.exec(select(Expert)).all():
            put(ctx, e.artifact)
            keys[e.dataset_id].append(e.artifact)
    for version in ("bb-a", "bb-b"):
        put(ctx, f"backbones/published/{version}.onnx")
        put(ctx, f"backbones/published/{version}.json", json.dumps({"version": version}).encode())
    put(ctx, "backbones/rotnet-current.onnx")
    put(ctx, "backbones/default.json", json.dumps({"artifact": "backbones/rotnet-current.onnx", "version": "rotnet-current"}).encode())
    lock = ctx.artifacts.path("backbones/.lock")
    lock.touch()
    age(lock, OLD)
    return a, b, keys


def referenced_keys(a, b, keys) -> set[str]:
    return {*keys[a.dataset_id], *keys[b.dataset_id], "backbones/published/bb-a.onnx", "backbones/published/bb-a.json",
            "backbones/published/bb-b.onnx", "backbones/published/bb-b.json", "backbones/rotnet-current.onnx",
            "backbones/default.json", "backbones/.lock"}


# --------------------------------------------------------------------------- gc


def test_gc_removes_only_old_unreferenced_files(ctx):
    a, b, keys = build_store(ctx)
    query = run_query(ctx, QueryRequest(expert_scores={a.expert_ids[0]: 0.5}, budget=20))
    age(ctx.artifacts.path(picks_key(query.id)), OLD)  # an old stored query: referenced, kept
    orphans = {
        "experts/999/rotation-dead.onnx": put(ctx, "experts/999/rotation-dead.onnx", b"d" * 1000),   # a deleted dataset's expert
        f"experts/{a.dataset_id}/rotation-v0.onnx": put(ctx, f"experts/{a.dataset_id}/rotation-v0.onnx", b"v" * 10),  # a dropped index version
        "backbones/published/bb-gone.onnx": put(ctx, "backbones/published/bb-gone.onnx", b"g" * 500),
        "backbones/rotnet-previous.onnx": put(ctx, "backbones/rotnet-previous.onnx"),
        f"queries/{uuid.uuid4()}.picks": None,  # a query answered 503 by the old code
    }
    orphan_picks = next(k for k in orphans if k.startswith("queries/"))
    orphans[orphan_picks] = put(ctx, orphan_picks, b"p" * 50)
    stale_tmp = ctx.artifacts.path("experts/999/.tmp-abc.onnx")
    stale_tmp.write_bytes(b"t" * 7)
    age(stale_tmp, OLD)
    stale_export = ctx.artifacts.path("backbones/.rotnet-training-1.onnx.k3j.tmp")
    stale_export.write_bytes(b"e" * 3)
    age(stale_export, OLD)
    young = {
        "experts/999/rotation-fresh.onnx": put(ctx, "experts/999/rotation-fresh.onnx", old=False),  # an index job not yet committed
        f"queries/{uuid.uuid4()}.picks": None,  # a query between its picks file and its row
    }
    young_picks = next(k for k in young if k.startswith("queries/"))
    young[young_picks] = put(ctx, young_picks, old=False)
    live_tmp = ctx.artifacts.path(f"queries/.tmp-live{uuid.uuid4().hex}.picks")
    live_tmp.write_bytes(b"l")
    foreign = put(ctx, "notes/readme.txt")  # nothing in the catalog writes there: never touched
    synthetic = put(ctx, "synthetic/loose.onnx")

    before = files(ctx)
    dry = gc(ctx, dry_run=True)
    assert files(ctx) == before  # nothing removed
    assert dry.removed == len(orphans) + 2 and dry.temp_removed == 2
    assert dry.removed_bytes == 1000 + 10 + 500 + 100 + 50 + 7 + 3
    assert dry.young == len(young) + 1

    report = gc(ctx)
    assert (report.removed, report.removed_bytes, report.young) == (dry.removed, dry.removed_bytes, dry.young)
    assert set(report.removed_keys) == {*orphans, "experts/999/.tmp-abc.onnx", "backbones/.rotnet-training-1.onnx.k3j.tmp"}
    left = files(ctx)
    assert referenced_keys(a, b, keys) <= left
    assert picks_key(query.id) in left
    assert not set(orphans) & left and not stale_tmp.exists() and not stale_export.exists()
    assert set(young) <= left and live_tmp.exists() and foreign.exists() and synthetic.exists()
    assert report.kept >= len(referenced_keys(a, b, keys)) - 1  # the lock is not counted
    assert [r.key for chunk in iter_manifest(ctx, query) for r in chunk]  # the query still reads

    # the grace is the caller's: with 0, the young orphans go too, never the live rows' files
    gc(ctx, grace_seconds=0)
    left = files(ctx)
    assert not set(young) & left and referenced_keys(a, b, keys) <= left and picks_key(query.id) in left


def test_gc_leaves_the_files_of_a_dataset_being_indexed_alone(ctx):
    """An index job may reuse an old file of the same inputs (content-addressed keys) before
    its commit refers to it: while the dataset is indexing, its folder and the published
    backbones are not collected, whatever their age."""
    a, b, keys = build_store(ctx)
    stale = put(ctx, f"experts/{a.dataset_id}/rotation-reused.onnx")
    unpublished = put(ctx, "backbones/published/bb-new.onnx")
    with session_scope(ctx.engine) as session:
        session.get(Dataset, a.dataset_id).status = DatasetStatus.indexing
    report = gc(ctx, grace_seconds=0)
    assert stale.exists() and unpublished.exists() and report.removed == 0
    with session_scope(ctx.engine) as session:
        session.get(Dataset, a.dataset_id).status = DatasetStatus.indexed
    gc(ctx)
    assert not stale.exists() and not unpublished.exists()
    assert referenced_keys(a, b, keys) <= files(ctx)


def test_nds_artifacts_gc_and_datasets_rm(ctx, nds):
    a, b, keys = build_store(ctx)
    orphan = put(ctx, "experts/999/rotation-dead.onnx", b"d" * 2048)
    young_orphan = put(ctx, "experts/999/rotation-young.onnx", old=False)

    dry = nds("artifacts", "gc", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    data = json.loads(dry.output)
    assert data["dry_run"] and data["removed"] == 1 and data["removed_bytes"] == 2048 and data["young"] == 1
    assert orphan.exists()

    done = nds("artifacts", "gc", "--grace", str(3 * OLD), "--json")  # a longer grace: the 2 h old orphan is inside it
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["removed"] == 0 and orphan.exists()
    done = nds("artifacts", "gc")
    assert done.exit_code == 0 and "removed 1 files" in done.output, done.output
    assert not orphan.exists() and young_orphan.exists()

    # deleting B: its experts go at once (however young), and its backbone no other dataset uses
    fresh = [ctx.artifacts.path(k) for k in keys[b.dataset_id]]
    for path in fresh:
        os.utime(path)  # indexed a moment ago
    rm = nds("datasets", "rm", "B")
    assert rm.exit_code == 0, rm.output
    left = files(ctx)
    assert not set(keys[b.dataset_id]) & left
    assert not {"backbones/published/bb-b.onnx", "backbones/published/bb-b.json"} & left
    assert {*keys[a.dataset_id], "backbones/published/bb-a.onnx", "backbones/rotnet-current.onnx", "backbones/default.json"} <= left
    assert young_orphan.exists()  # not the deleted dataset's, still inside the grace
    assert not ctx.artifacts.path(f"experts/{b.dataset_id}").exists()  # its empty folder too


def test_rest_delete_collects_the_datasets_files(settings, ctx):
    from nds.api.app import create_app

    a, b, keys = build_store(ctx)
    shared = put(ctx, "backbones/published/bb-a.onnx")
    with session_scope(ctx.engine) as session:
        session.get(Dataset, b.dataset_id).backbone = "bb-a"  # B shares A's space now: bb-b is unreferenced
    with TestClient(create_app(settings), base_url=LOOPBACK) as api:
        assert api.delete(f"/v1/datasets/{a.dataset_id}").status_code == 204
        left = files(ctx)
        assert not set(keys[a.dataset_id]) & left
        assert shared.exists()  # B still uses bb-a
        assert "backbones/published/bb-b.onnx" not in left  # old and unreferenced since B moved
        assert set(keys[b.dataset_id]) <= left
        assert api.delete(f"/v1/datasets/{b.dataset_id}").status_code == 204
        left = files(ctx)
    assert not set(keys[b.dataset_id]) & left and not shared.exists()
    assert {"backbones/rotnet-current.onnx", "backbones/default.json", "backbones/.lock"} <= left  # the default backbone stays


# --------------------------------------------------------------------------- a query that fails after its picks file


def test_a_query_whose_row_insert_fails_leaves_no_picks_file(settings, ctx):
    from nds.api.app import create_app

    a = add_indexed_dataset(ctx, "A", clusters=2, labels=["x", "y"])
    with ctx.engine.begin() as conn:  # every insert into queries fails in the database (no such table)
        conn.execute(text("CREATE TRIGGER refuse_queries BEFORE INSERT ON queries BEGIN INSERT INTO no_such_table VALUES (1); END"))
    with TestClient(create_app(settings), base_url=LOOPBACK) as api:
        r = api.post("/v1/queries", json={"expert_scores": {str(a.expert_ids[0]): 0.5}, "budget": 20})
    assert r.status_code == 503, r.text
    assert r.headers.get("Retry-After")
    assert not [k for k in files(ctx) if k.startswith("queries/")]
    with Session(ctx.engine) as session:
        assert session.exec(select(Query)).all() == []


# --------------------------------------------------------------------------- full disk


ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+[\w.-]*")


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs, filled up: the artifact store's disk with no space left."""
    with small_tmpfs(tmp_path / "full-disk", "1m") as mount:
        (mount / "queries").mkdir()
        with open(mount / "filler", "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        yield mount


def test_a_full_disk_answers_503_with_retry_after_and_no_path(tmp_path, data_root, full_disk):
    from nds.api.app import create_app

    settings = load_settings(home=tmp_path / "home", artifacts_dir=full_disk, data_roots=[data_root],
                             database_url=None, qdrant_url=None, broker_url=None)
    upgrade(settings)
    with CatalogContext.open(settings) as ctx:
        a = add_indexed_dataset(ctx, "A", clusters=2, labels=["x", "y"])
        with pytest.raises(StorageFullError) as caught:
            ctx.artifacts.write_bytes("queries/direct.picks", b"x" * 10000)
        assert str(full_disk) not in str(caught.value)
    with TestClient(create_app(settings), base_url=LOOPBACK, raise_server_exceptions=False) as api:
        r = api.post("/v1/queries", json={"expert_scores": {str(a.expert_ids[0]): 0.5}, "budget": 20})
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) > 0
    body = r.text
    assert "storage is full" in r.json()["detail"]
    for secret in (str(full_disk), str(tmp_path), str(settings.resolved_home)):
        assert secret not in body
    assert not ABSOLUTE_PATH.search(body), body
    assert os.listdir(full_disk / "queries") == []  # no picks file, no temp file


def test_error_messages_name_no_server_path(ctx):
    with pytest.raises(Exception) as caught:  # noqa: PT011 - NotFoundError
        ctx.artifacts.open_path("experts/1/missing.onnx")
    assert str(ctx.artifacts.root) not in str(caught.value) and "artifact store" in str(caught.value)


# --------------------------------------------------------------------------- damaged picks files


def _header(data: bytes) -> tuple[int, dict]:
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


def _with_header(data: bytes, **changes) -> bytes:
    length, header = _header(data)
    header.update(changes)
    new = json.dumps(header).encode()
    return struct.pack("<Q", len(new)) + new + data[8 + length :]


def _per_group_overwritten(data: bytes) -> bytes:
    length, header = _header(data)
    at = 8 + length + 4 * 8 * header["groups"]
    return data[:at] + np.full(header["groups"], 2**40, dtype="<i8").tobytes() + data[at + 8 * header["groups"] :]


def _ranks_overwritten(data: bytes) -> bytes:
    length, header = _header(data)
    at = 8 + length + 5 * 8 * header["groups"]
    size = np.dtype(header["rank_dtype"]).itemsize * header["rows"]
    return data[:at] + np.full(header["rows"], -7, dtype=header["rank_dtype"]).tobytes() + data[at + size :]


DAMAGE = {
    "empty": lambda d: b"",
    "truncated in the header": lambda d: d[:5],
    "truncated in the arrays": lambda d: d[: len(d) - 9],
    "absurd header length": lambda d: struct.pack("<Q", 2**62) + d[8:],
    "garbage header": lambda d: d[:8] + b"\xff" * _header(d)[0] + d[8 + _header(d)[0] :],
    "absurd counts": lambda d: _with_header(d, groups=10**12, rows=10**15),
    "negative counts": lambda d: _with_header(d, groups=-3),
    "unknown dtype": lambda d: _with_header(d, rank_dtype="<f16"),
    "unknown format": lambda d: _with_header(d, format=99),
    "labels of another size": lambda d: _with_header(d, labels=["x"]),
    "per-group numbers overwritten": _per_group_overwritten,
    "ranks overwritten": _ranks_overwritten,
    "extra bytes": lambda d: d + b"\0" * 16,
}


@pytest.fixture
def stored_query(settings, ctx):
    a = add_indexed_dataset(ctx, "A", clusters=2, labels=["x", "y"])
    query = run_query(ctx, QueryRequest(expert_scores={a.expert_ids[0]: 0.5, a.expert_ids[1]: 0.4}, budget=40))
    return ctx, query


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_picks_file_is_a_clear_410(settings, stored_query, damage):
    from nds.api.app import create_app

    ctx, query = stored_query
    path = ctx.artifacts.path(picks_key(query.id))
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(GoneError, match="damaged.*run the query again"):
        for _ in iter_manifest(ctx, query):
            pass
    with TestClient(create_app(settings), base_url=LOOPBACK, raise_server_exceptions=False) as api:
        for url in (f"/v1/queries/{query.id}/samples", f"/v1/queries/{query.id}/manifest"):
            r = api.get(url)
            assert r.status_code == 410, (url, r.status_code, r.text)
            assert "run the query again" in r.json()["detail"] and str(ctx.artifacts.root) not in r.text
        assert api.get(f"/v1/queries/{query.id}").status_code == 200  # the query itself is still there


def test_a_missing_picks_file_is_a_410_without_a_path(settings, stored_query):
    from nds.api.app import create_app

    ctx, query = stored_query
    ctx.artifacts.path(picks_key(query.id)).unlink()
    with TestClient(create_app(settings), base_url=LOOPBACK, raise_server_exceptions=False) as api:
        r = api.get(f"/v1/queries/{query.id}/samples")
    assert r.status_code == 410 and "missing" in r.json()["detail"] and "run the query again" in r.json()["detail"]
    assert not ABSOLUTE_PATH.search(r.text), r.text
