"""Manifests from the columnar snapshot of an index version: the same bytes as the SQL path.

The previous path (:func:`iter_manifest_sql`: SQL lookups per chunk, a row object per sample,
the exporters' row-by-row ``stream``) is the reference: for the same query, the snapshot path
(:func:`iter_manifest_batches` and the exporters' ``stream_batches``) must give the same csv,
jsonl and parquet bytes, for the operator and for a client key (uris shown relative to the
data roots), for any page (offset, limit), after a sync removed samples, and when the
snapshot file was deleted or damaged (it is rebuilt from SQL).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, update
from sqlmodel import Session, select

from nds.catalog.access import LOCAL, Principal, Role
from nds.catalog.artifact_gc import gc
from nds.catalog.retrieval import snapshot as snapshots
from nds.catalog.retrieval.manifest import iter_manifest, iter_manifest_batches, iter_manifest_sql
from nds.catalog.retrieval.queries import run_query
from nds.catalog.retrieval.request import QueryRequest
from nds.catalog.retrieval.snapshot import open_snapshot, snapshot_key, write_snapshot
from nds.catalog.tables import Assignment, Dataset, Group, Sample
from nds.catalog.uris import client_uri, uri_column_view
from nds.plugins.contract import Exporter
from nds.samples.synthetic import add_indexed_dataset
from nds_client.errors import GoneError
from tests.conftest import LOOPBACK
from tests.server_mode import server_home, server_settings  # noqa: F401 - fixtures of the server-mode test

FORMATS = ("csv", "jsonl", "parquet")
CLIENT = Principal(role=Role.client, key_id=None, name="client")


def vary_samples(ctx, data_root: Path, dataset_id: int) -> None:
    """Give a synthetic dataset's samples what real ones have: tar members, Parquet-less files
    under the data root, object-storage uris, uris outside the roots, odd characters, metadata."""
    with Session(ctx.engine) as session:
        ids = session.exec(select(Sample.id).where(Sample.dataset_id == dataset_id).order_by(Sample.id)).all()
        for i in ids:
            kind = i % 6
            values: dict = {}
            if kind == 0:
                shard = f"{data_root}/shards/{i % 3:03d}.tar"
                values = {"uri": f"{shard}#cls/{i}.png", "shard": shard, "offset": 512 * i, "byte_size": 100 + i,
                          "meta": {"url": f"http://example.org/{i}.png", "caption": 'a, "b"\n', "key": f"k{i}"}}
            elif kind == 1:
                values = {"uri": f'{data_root}/we,ird "dir"/ü {i}.png', "label": 'lab,"el"'}
            elif kind == 2:
                values = {"uri": f"s3://bucket/x/{i}.png", "meta": {"n": i}}
            elif kind == 3:
                values = {"uri": f"/elsewhere/{i}.png", "label": "tab\there\r"}
            elif kind == 4:
                values = {"uri": f"{data_root}/plain/{i}.png", "label": None}
            else:
                values = {"uri": f"{data_root}/odd//./x\n{i}.png", "label": "ünï\u2028", "offset": 7}
            session.execute(update(Sample).where(Sample.id == i).values(**values))
        # one group without a label: its assignments too
        session.execute(update(Group).where(Group.dataset_id == dataset_id, Group.cluster == 0, Group.label == "x").values(label=None))
        session.execute(update(Assignment).where(Assignment.dataset_id == dataset_id, Assignment.cluster == 0, Assignment.label == "x")
                        .values(label=None))
        session.commit()


@pytest.fixture
def catalog(ctx, data_root):
    a = add_indexed_dataset(ctx, "A", clusters=3, labels=["x", "y"], sizes=np.array([[30, 10], [5, 5], [40, 20]]))
    b = add_indexed_dataset(ctx, 'we"ird,B', clusters=2, labels=["x", "z"], sizes=np.array([[8, 12], [50, 3]]))
    vary_samples(ctx, data_root, a.dataset_id)
    vary_samples(ctx, data_root, b.dataset_id)
    experts = [*a.expert_ids.values(), *b.expert_ids.values()]
    scores = {e: s for e, s in zip(experts, (0.5, 0.52, 0.55, 0.54, 0.53))}
    queries = [
        run_query(ctx, QueryRequest(expert_scores=scores, budget=400, seed=1)),                  # with replacement: counts > 1
        run_query(ctx, QueryRequest(expert_scores=scores, budget=10_000, replacement=False, seed=2)),  # every sample with weight
        run_query(ctx, QueryRequest(label_priors={b.dataset_id: {"z": 0.7, "x": 0.3}}, budget=50, seed=3)),
    ]
    return ctx, a, b, queries


def old_bytes(ctx, query, fmt: str, *, principal=LOCAL, offset: int = 0, limit: int | None = None, chunk: int = 2000) -> bytes:
    exporter = ctx.exporters.get(fmt)()
    rows = ([r.as_dict() for r in c] for c in iter_manifest_sql(ctx, query, offset=offset, limit=limit, chunk=chunk, principal=principal))
    return b"".join(exporter.stream(rows))


def new_bytes(ctx, query, fmt: str, *, principal=LOCAL, offset: int = 0, limit: int | None = None, chunk: int = 2000) -> bytes:
    exporter = ctx.exporters.get(fmt)()
    return b"".join(exporter.stream_batches(iter_manifest_batches(ctx, query, offset=offset, limit=limit, chunk=chunk, principal=principal)))


def snapshot_files(ctx) -> list[Path]:
    return sorted((ctx.artifacts.root / snapshots.SNAPSHOT_PREFIX).rglob("*.arrow"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("principal", [LOCAL, CLIENT], ids=["admin", "client"])
def test_snapshot_manifest_is_the_sql_manifest_byte_for_byte(catalog, fmt, principal):
    ctx, _, _, queries = catalog
    for query in queries:
        for chunk in (2000, 37):
            old = old_bytes(ctx, query, fmt, principal=principal, chunk=chunk)
            assert new_bytes(ctx, query, fmt, principal=principal, chunk=chunk) == old, (query.id, chunk)
    assert len(snapshot_files(ctx)) == 2  # both datasets' snapshots were built, and used


def test_rows_and_pages_are_the_sql_path_s(catalog):
    ctx, _, _, queries = catalog
    query = queries[1]
    total = query.summary["unique_samples"]
    old = [r for c in iter_manifest_sql(ctx, query) for r in c]
    assert [r for c in iter_manifest(ctx, query) for r in c] == old  # meta and stored locations included
    assert len(old) == total > 150
    for offset, limit in ((0, 1), (0, 10), (5, 17), (total - 3, 10), (total, 5), (100, None), (0, total)):
        page = [r for c in iter_manifest(ctx, query, offset=offset, limit=limit, chunk=16) for r in c]
        assert page == old[offset: None if limit is None else offset + limit], (offset, limit)
        for fmt in FORMATS:
            assert new_bytes(ctx, query, fmt, offset=offset, limit=limit, chunk=16) == old_bytes(ctx, query, fmt, offset=offset, limit=limit, chunk=16)
    client_rows = [r for b in iter_manifest_batches(ctx, query, principal=CLIENT) for r in Exporter.rows_of(b)]
    assert client_rows == [r.as_dict() for c in iter_manifest_sql(ctx, query, principal=CLIENT) for r in c]
    assert any(not r["uri"].startswith("/") for r in client_rows)  # the client view was applied


def test_http_routes_serve_the_snapshot_path(catalog, settings):
    from nds.api.app import create_app

    ctx, _, _, queries = catalog
    query = queries[0]
    with TestClient(create_app(settings), base_url=LOOPBACK) as api:
        for fmt in (*FORMATS, "img2dataset"):
            r = api.get(f"/v1/queries/{query.id}/manifest", params={"format": fmt, "offset": 3, "limit": 100})
            assert r.status_code == 200, r.text
            if fmt in FORMATS:
                assert r.content == old_bytes(ctx, query, fmt, offset=3, limit=100)
        page = api.get(f"/v1/queries/{query.id}/samples", params={"offset": 2, "limit": 30}).json()
        expected = [r.as_dict() for c in iter_manifest_sql(ctx, query, offset=2, limit=30) for r in c]
        assert page["data"] == expected and any(r["meta"] for r in expected)


def test_a_deleted_or_damaged_snapshot_is_rebuilt(catalog):
    ctx, a, _, queries = catalog
    query = queries[1]
    expected = {fmt: old_bytes(ctx, query, fmt) for fmt in FORMATS}
    assert new_bytes(ctx, query, "csv") == expected["csv"]
    files = snapshot_files(ctx)
    assert files
    for path in files:
        path.unlink()
    assert new_bytes(ctx, query, "parquet") == expected["parquet"]  # the cached map is not used for a file that is gone
    assert snapshot_files(ctx) == files  # rebuilt under the same keys
    for path in files:
        path.write_bytes(b"ARROW1 not really")
    assert new_bytes(ctx, query, "jsonl") == expected["jsonl"]
    assert all(p.stat().st_size > 100 for p in snapshot_files(ctx))
    # idempotent: writing again keeps the file as it is
    key = snapshot_key(a.dataset_id, 1, 1)
    before = os.stat(ctx.artifacts.path(key))
    assert write_snapshot(ctx, a.dataset_id, 1) == key
    after = os.stat(ctx.artifacts.path(key))
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_a_snapshot_that_does_not_match_the_catalog_is_rebuilt(catalog):
    ctx, a, _, queries = catalog
    query = queries[1]
    expected = old_bytes(ctx, query, "csv")
    assert new_bytes(ctx, query, "csv") == expected
    # a file of the right name with other groups (as if copied from another catalog): not used
    path = ctx.artifacts.path(snapshot_key(a.dataset_id, 1, 1))
    other = snapshot_files(ctx)[1] if snapshot_files(ctx)[0] == path else snapshot_files(ctx)[0]
    path.write_bytes(other.read_bytes())
    snapshots._cache.clear()
    assert new_bytes(ctx, query, "csv") == expected


def test_samples_removed_by_a_sync_are_never_named(catalog):
    """A sync deletes the samples it removes (and their assignments) from the versions it keeps and
    makes a new version active in the same commit: the old version's snapshot is rebuilt at the new
    active version, with holes where the removed samples were."""
    ctx, a, _, queries = catalog
    query = queries[1]
    before = [r for c in iter_manifest(ctx, query) for r in c]
    with Session(ctx.engine) as session:
        ids = session.exec(select(Sample.id).where(Sample.dataset_id == a.dataset_id).order_by(Sample.id)).all()
        gone = [ids[3], ids[4], ids[-1]]
        session.exec(delete(Assignment).where(Assignment.sample_id.in_(gone)))
        session.exec(delete(Sample).where(Sample.id.in_(gone)))
        session.exec(update(Dataset).where(Dataset.id == a.dataset_id).values(index_version=2))  # as the sync's commit does
        session.commit()
    after = [r for c in iter_manifest(ctx, query) for r in c]
    assert after == [r for c in iter_manifest_sql(ctx, query) for r in c]
    assert {r.key for r in after} == {r.key for r in before} - {f"A/{i}" for i in gone}
    for fmt in FORMATS:
        assert new_bytes(ctx, query, fmt, chunk=50) == old_bytes(ctx, query, fmt, chunk=50)
    assert ctx.artifacts.exists(snapshot_key(a.dataset_id, 1, 2))
    # gc keeps the snapshots of live versions at the active version, collects the superseded one
    report = gc(ctx, grace_seconds=0)
    assert report.removed_keys == [snapshot_key(a.dataset_id, 1, 1)]
    assert ctx.artifacts.exists(snapshot_key(a.dataset_id, 1, 2))


def test_gone_versions_and_datasets_answer_as_before(catalog):
    ctx, a, b, queries = catalog
    query = queries[0]
    new_bytes(ctx, query, "csv")  # the snapshots exist: they must not hide a gone version
    with Session(ctx.engine) as session:
        session.exec(delete(Group).where(Group.dataset_id == b.dataset_id, Group.index_version == 1))
        session.commit()
    for path in (iter_manifest_batches, iter_manifest_sql):
        with pytest.raises(GoneError, match="index version 1 of dataset 'we\"ird,B' is gone"):
            next(path(ctx, query))
    with Session(ctx.engine) as session:
        session.delete(session.get(Dataset, b.dataset_id))
        session.commit()
    for path in (iter_manifest_batches, iter_manifest_sql):
        with pytest.raises(GoneError, match=f"dataset {b.dataset_id} of this query was deleted"):
            next(path(ctx, query))
    assert write_snapshot(ctx, b.dataset_id, 1) is None


def test_unwritable_store_falls_back_to_sql(catalog, monkeypatch):
    ctx, _, _, queries = catalog
    query = queries[2]
    expected = old_bytes(ctx, query, "csv")

    def refuse(*args, **kwargs):
        raise snapshots.SnapshotUnavailable("cannot write snapshot: the server's storage is full")

    monkeypatch.setattr("nds.catalog.retrieval.manifest.open_snapshot", refuse)
    assert new_bytes(ctx, query, "csv") == expected
    assert snapshot_files(ctx) == []


def test_snapshots_switched_off_serve_from_sql(catalog, monkeypatch):
    ctx, a, _, queries = catalog
    for o in ctx.artifacts.list_objects("snapshots"):
        ctx.artifacts.delete(o.key)
    monkeypatch.setattr(ctx, "settings", ctx.settings.model_copy(update={"manifest_snapshots": False}))
    assert write_snapshot(ctx, a.dataset_id, 1) is None
    assert new_bytes(ctx, queries[0], "csv") == old_bytes(ctx, queries[0], "csv")
    assert snapshot_files(ctx) == []  # nothing written, nothing read


def test_take_in_any_order_across_batches(catalog, monkeypatch):
    ctx, a, _, _ = catalog
    monkeypatch.setattr(snapshots, "BATCH_ROWS", 7)  # many record batches
    snapshots._cache.clear()
    for path in snapshot_files(ctx):
        path.unlink()
    snap = open_snapshot(ctx, a.dataset_id, 1)
    assert len(snap.batches) > 10
    whole = [r for b in snap.batches for r in b.to_pylist()]
    rng = np.random.default_rng(0)
    for rows in (np.arange(snap.rows), rng.permutation(snap.rows)[:50], np.array([5, 5, 3, 90, 0]), np.arange(10, 30), np.zeros(0, np.int64)):
        assert snap.take(rows.astype(np.int64)).to_pylist() == [whole[i] for i in rows]


def test_the_column_uri_view_is_the_uri_view(tmp_path):
    root, inner, public_root = tmp_path / "data", tmp_path / "data" / "inner", tmp_path / "pub"
    roots = [root, inner, public_root, Path("/")]
    public = {public_root: "s3://bucket/base/", inner: "https://cdn.example/x"}
    values = [None, "", "/", str(root), str(root) + "/", f"{root}/a.png", f"{inner}/b/c.png", str(inner), f"{public_root}/p q.png",
              str(public_root), f"file://{root}/f.png", f"{root}//double.png", f"{root}/./dot.png", f"{root}/.hidden", f"{root}/a/..",
              f"{root}/x.tar#m/1.png", f"{root}/x.parquet#row=5", "s3://b/k.png", "S3://b/k.png", "hf://d/x", "x://y", "/a/b://c",
              "relative/path.png", f"{root}/ü,\"n\".png", f"{root}/a/.", "/elsewhere/z.png", f"{tmp_path}/dataX/no.png",
              "/synthetic/d/0/x/1.png", "/up/..", "/x/.hidden", "/x/y/", "/x/ü 猫.png", "/x\\y/z.png"]
    import pyarrow as pa

    for principal in (LOCAL, CLIENT):
        scalar = (lambda u: u) if principal.is_admin else (lambda u: client_uri(u, roots, public))
        column = uri_column_view(principal, roots, public)(pa.array(values, pa.string())).to_pylist()
        assert column == [None if v is None else scalar(v) for v in values]
    only_data = uri_column_view(CLIENT, [root], {})(pa.array(values, pa.string())).to_pylist()
    assert only_data == [None if v is None else client_uri(v, [root], {}) for v in values]


def test_csv_and_jsonl_columns_render_like_the_standard_library():
    """The exporters' columnar path on values chosen to need quoting or escaping."""
    import pyarrow as pa

    from nds.catalog.retrieval.manifest import BATCH_SCHEMA
    from nds.plugins.exporters.text import CsvExporter, JsonlExporter
    from nds_client.manifests import MANIFEST_COLUMNS

    strings = ["plain", "", "a,b", 'q"uote', "line\nend", "cr\rx", "tab\tx", "\x00nul", "\x7fdel", "\x85nel", "ü", "\u2028ls", "back\\slash",
               " lead", "trail ", "'single'", "é,\"\n"]
    floats = [0.1, 1.0, -0.0, 0.0, 1e-05, 1e300, 2.5e-324, float("nan"), float("inf"), 1 / 3, 123456789.125, 5e-07, 1e16, 0.30000000000000004,
              7.0, 8.25, 9e99]
    n = len(strings)
    rows = [{"key": strings[i], "uri": strings[-1 - i], "label": None if i % 3 == 0 else strings[i], "dataset": strings[(i * 5) % n],
             "cluster": i - 3, "weight": floats[i], "count": 2**40 + i, "shard": None if i % 2 else strings[i],
             "offset": None if i % 2 else i * 1000, "size": None if i % 4 else 7, "meta": None} for i in range(n)]
    batch = pa.record_batch([pa.array([r[c] for r in rows], f.type) for c, f in zip((*MANIFEST_COLUMNS, "meta"), BATCH_SCHEMA)], schema=BATCH_SCHEMA)
    for exporter in (CsvExporter(), JsonlExporter()):
        assert b"".join(exporter.stream_batches([batch, batch.slice(3, 5)])) == b"".join(exporter.stream([rows, rows[3:8]]))


@pytest.mark.server
def test_server_mode_snapshot_manifest_is_the_sql_manifest(server_settings):
    from nds.catalog.context import CatalogContext

    with CatalogContext.open(server_settings) as ctx:
        data_root = server_settings.data_roots[0]
        a = add_indexed_dataset(ctx, "pg-snap-A", clusters=3, labels=["x", "y"], sizes=np.array([[300, 100], [50, 50], [400, 200]]))
        vary_samples(ctx, data_root, a.dataset_id)
        experts = list(a.expert_ids.values())
        query = run_query(ctx, QueryRequest(expert_scores={e: 0.5 + 0.02 * i for i, e in enumerate(experts)}, budget=5000, seed=4))
        assert write_snapshot(ctx, a.dataset_id, 1) == snapshot_key(a.dataset_id, 1, 1)
        for fmt in FORMATS:
            for principal in (LOCAL, CLIENT):
                assert new_bytes(ctx, query, fmt, principal=principal) == old_bytes(ctx, query, fmt, principal=principal)
