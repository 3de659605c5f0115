"""Defects found by trying the running product as a hostile user and a careless operator.

Each test reproduces one defect of the hardening round and fails on the code before its fix:
open mode reopened by revoking the last key, ids reused after a delete, start-up recovery
that destroyed a live CLI's work, abandoned index runs visible in search, DNS rebinding
in open mode. (The others have files of their own: test_onnx_parity, test_export_names,
test_hostile_files, test_cli_robustness, test_artifacts_gc.)
"""

from __future__ import annotations

import socket
import subprocess

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlmodel import Session, select

from nds.catalog import access
from nds.catalog.context import CatalogContext
from nds.catalog.datasets import delete_dataset
from nds.catalog.db import session_scope, upgrade
from nds.catalog.jobs import create_job, mark_interrupted
from nds.catalog.retrieval.manifest import iter_manifest
from nds.catalog.retrieval.queries import run_query
from nds.catalog.retrieval.request import QueryRequest
from nds.catalog.retrieval.search import search
from nds.catalog.settings import load_settings
from nds.catalog.tables import Dataset, DatasetStatus, Expert, Job, JobStatus, Sample
from nds.samples.synthetic import add_files_and_vectors, add_indexed_dataset
from nds_client.errors import GoneError
from tests.conftest import LOOPBACK


def app_client(settings) -> TestClient:
    from nds.api.app import create_app

    return TestClient(create_app(settings), base_url=LOOPBACK)


# --------------------------------------------------------------------------- 1. open mode


def test_revoking_every_key_never_reopens_the_api(any_settings):
    with app_client(any_settings) as api:
        created = api.post("/v1/keys", json={"name": "ops", "role": "admin"})
        assert created.status_code == 201
        admin = {"Authorization": f"Bearer {created.json()['key']}"}
        assert api.delete(f"/v1/keys/{created.json()['id']}", headers=admin).status_code == 200
        # the last key is revoked: an anonymous request must not mint an admin key
        minted = api.post("/v1/keys", json={"name": "x", "role": "admin"})
        assert minted.status_code == 401, minted.text
        assert api.get("/v1/datasets").status_code == 401
    # nor after a restart: a catalog that has had a key is never open again
    with app_client(any_settings) as api:
        assert api.post("/v1/keys", json={"name": "y", "role": "admin"}).status_code == 401
        assert api.get("/v1/datasets").status_code == 401


def test_revoking_the_last_key_through_the_cli_leaves_the_running_api_closed(any_settings, nds, cli_env):
    cli_env["NDS_DATABASE_URL"] = any_settings.database_url or ""
    with app_client(any_settings) as api:
        assert nds("keys", "create", "--name", "ops", "--role", "admin").exit_code == 0
        revoked = nds("keys", "revoke", "ops")
        assert revoked.exit_code == 0 and "no admin key is left" in revoked.output
        assert api.post("/v1/keys", json={"name": "x", "role": "admin"}).status_code == 401
    with Session(create_engine(any_settings.sqlalchemy_url)) as session:
        assert access.ever_had_keys(session=session)
        assert not access.api_is_open(session=session, auth="auto", admin_key=None)


# --------------------------------------------------------------------------- 2. ids never reused


def test_ids_are_never_reused_and_old_queries_of_deleted_datasets_are_gone(any_settings):
    ctx = CatalogContext.open(any_settings)
    try:
        v = add_indexed_dataset(ctx, "V", clusters=2, labels=["a", "b"], samples_per_group=3)
        with Session(ctx.engine) as session:
            v_samples = set(session.exec(select(Sample.id).where(Sample.dataset_id == v.dataset_id)).all())
            v_experts = set(session.exec(select(Expert.id).where(Expert.dataset_id == v.dataset_id)).all())
        query = run_query(ctx, QueryRequest(expert_scores={e: 0.5 + 0.1 * k for k, e in v.expert_ids.items()}, budget=6, seed=0))
        assert sum(len(rows) for rows in iter_manifest(ctx, query)) > 0
        delete_dataset(ctx=ctx, dataset_id=v.dataset_id)
        n = add_indexed_dataset(ctx, "N", clusters=2, labels=["a", "b"], samples_per_group=3)
        with Session(ctx.engine) as session:
            n_samples = set(session.exec(select(Sample.id).where(Sample.dataset_id == n.dataset_id)).all())
            n_experts = set(session.exec(select(Expert.id).where(Expert.dataset_id == n.dataset_id)).all())
        assert n.dataset_id > v.dataset_id
        assert not (n_samples & v_samples) and min(n_samples) > max(v_samples)
        assert not (n_experts & v_experts) and min(n_experts) > max(v_experts)
        with pytest.raises(GoneError, match="deleted"):
            next(iter_manifest(ctx, query))
        # keys too: a revoked key's id is never handed to a new key
        with session_scope(ctx.engine) as session:
            first, _ = access.create_key(session=session, name="k1", role="client")
        with session_scope(ctx.engine) as session:
            session.exec(text("DELETE FROM api_keys"))  # even if an operator deletes rows by hand
        with session_scope(ctx.engine) as session:
            second, _ = access.create_key(session=session, name="k2", role="client")
        assert second.id > first.id
    finally:
        ctx.close()
    with app_client(any_settings) as api:
        api.post("/v1/keys", json={"name": "never", "role": "admin"})  # (closed already: keys existed)
        key = _operator_key(any_settings)
        for path in (f"/v1/queries/{query.id}/manifest", f"/v1/queries/{query.id}/samples"):
            r = api.get(path, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 410, (path, r.status_code, r.text)
            assert "deleted" in r.json()["detail"] and r.json()["hint"]
        summary = api.get(f"/v1/queries/{query.id}", headers={"Authorization": f"Bearer {key}"})
        assert summary.status_code == 200  # the query itself is still there to read


def _operator_key(settings) -> str:
    ctx = CatalogContext.open(settings)
    try:
        with session_scope(ctx.engine) as session:
            return access.create_key(session=session, name=f"op-{np.random.randint(1 << 30)}", role="admin")[1]
    finally:
        ctx.close()


def test_the_migration_keeps_existing_catalogs_and_retires_their_deleted_ids(tmp_path):
    settings = load_settings(home=tmp_path / "home", database_url=None)
    upgrade(settings, "0004")
    engine = create_engine(settings.sqlalchemy_url)
    now = "2026-12-01 00:00:00"
    with engine.begin() as conn:
        for did in (1, 2, 3):
            conn.execute(text(
                "INSERT INTO datasets (id, name, source, uri, status, num_samples, num_labels, labels, skipped, index_version, restricted, created_at, updated_at) "
                "VALUES (:id, :name, 'imagefolder', '/x', 'ready', 2, 0, '[]', 0, 0, 0, :t, :t)"), {"id": did, "name": f"d{did}", "t": now})
            for pos in range(2):
                conn.execute(text("INSERT INTO samples (dataset_id, position, uri, width, height, byte_size, sha256) VALUES (:d, :p, '/x', 1, 1, 1, :h)"),
                             {"d": did, "p": pos, "h": "0" * 64})
        # dataset 3 was deleted before the upgrade, a job and a stored query still name it
        conn.execute(text("DELETE FROM samples WHERE dataset_id = 3"))
        conn.execute(text("DELETE FROM datasets WHERE id = 3"))
        conn.execute(text("INSERT INTO jobs (id, kind, dataset_id, status, progress, params, attempts, created_at) "
                          "VALUES ('j', 'register', 3, 'succeeded', 1.0, '{}', 1, :t)"), {"t": now})
        conn.execute(text("INSERT INTO queries (id, request, index_versions, summary, created_at) "
                          "VALUES ('q', '{\"expert_scores\": {\"41\": 1.0}}', '{\"3\": 1}', '{}', :t)"), {"t": now})
    upgrade(settings)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM samples")).scalar() == 4  # nothing cascaded away
        assert conn.execute(text("SELECT count(*) FROM datasets")).scalar() == 2
        sql = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'datasets'")).scalar()
        assert "AUTOINCREMENT" in sql
        assert conn.execute(text("PRAGMA foreign_key_check")).fetchall() == []
        conn.execute(text(
            "INSERT INTO datasets (name, source, uri, status, num_samples, num_labels, labels, skipped, index_version, restricted, created_at, updated_at) "
            "VALUES ('new', 'imagefolder', '/x', 'ready', 0, 0, '[]', 0, 0, 0, :t, :t)"), {"t": now})
        assert conn.execute(text("SELECT id FROM datasets WHERE name = 'new'")).scalar() == 4  # not 3: a job and a query name 3
        conn.execute(text("INSERT INTO experts (dataset_id, index_version, kind, artifact, sha256, byte_size, input_size, metrics, metadata, created_at) "
                          "VALUES (4, 1, 'rotation', 'a', :h, 0, 64, '{}', '{}', :t)"), {"h": "0" * 64, "t": now})
        assert conn.execute(text("SELECT id FROM experts")).scalar() == 42  # past the expert a stored query names
    engine.dispose()


# --------------------------------------------------------------------------- 4. recovery


def _registering(ctx, name: str, owner: str | None, kind: str = "register", status: DatasetStatus = DatasetStatus.registering) -> tuple[int, str]:
    with session_scope(ctx.engine) as session:
        dataset = Dataset(name=name, source="imagefolder", uri="/x", status=status)
        session.add(dataset)
        session.flush()
        job = create_job(session, kind=kind, dataset_id=dataset.id)
        job.status, job.owner, job.worker = JobStatus.running, owner, owner
        return dataset.id, job.id


def test_server_start_leaves_the_jobs_of_live_processes_alone(settings, ctx):
    host = socket.gethostname()
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        alive_reg, alive_reg_job = _registering(ctx, "alive-reg", f"{host}:{live.pid}")
        dead_reg, dead_reg_job = _registering(ctx, "dead-reg", f"{host}:{dead.pid}")
        alive_idx, alive_idx_job = _registering(ctx, "alive-idx", f"{host}:{live.pid}", kind="index", status=DatasetStatus.indexing)
        dead_idx, _ = _registering(ctx, "dead-idx", f"{host}:{dead.pid}", kind="index", status=DatasetStatus.indexing)
        other_host, other_job = _registering(ctx, "elsewhere", "another-host:1")
        ctx.close()
        with app_client(settings) as api:  # the start-up recovery runs in the lifespan
            names = {d["name"]: d for d in api.get("/v1/datasets").json()["data"]}
            assert "dead-reg" not in names  # its process died: the partial dataset is removed
            assert names["alive-reg"]["status"] == "registering"  # a live CLI's registration is kept
            assert names["elsewhere"]["status"] == "registering"  # another host's process is never judged
            assert names["alive-idx"]["status"] == "indexing"
            assert names["dead-idx"]["status"] == "ready"
            assert api.get(f"/v1/jobs/{alive_reg_job}").json()["status"] == "running"
            assert api.get(f"/v1/jobs/{alive_idx_job}").json()["status"] == "running"
            assert api.get(f"/v1/jobs/{dead_reg_job}").json()["status"] == "failed"
            second = api.post(f"/v1/datasets/{alive_idx}/index", json={"clusters": 1})
            assert second.status_code == 409  # no second index while the first still runs
    finally:
        live.kill()
        live.wait()


def test_jobs_record_their_owner_and_worker(ctx):
    with session_scope(ctx.engine) as session:
        job = create_job(session, kind="register", dataset_id=None)
    assert job.owner == f"{socket.gethostname()}:{__import__('os').getpid()}"
    live = subprocess.Popen(["sleep", "60"])
    try:
        with session_scope(ctx.engine) as session:
            other = create_job(session, kind="register", dataset_id=None)
            other.owner = f"{socket.gethostname()}:{live.pid}"
        # at start-up nothing of this process runs yet: a job naming its pid was left by an
        # earlier process that had the same pid (a restarted container's pid 1); a live
        # other process's job is not touched
        assert [j.id for j in mark_interrupted(ctx, reason="x")] == [job.id]
        with Session(ctx.engine) as session:
            assert session.get(Job, other.id).status == JobStatus.queued
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------- 5. abandoned index runs


def test_search_hits_carry_the_active_versions_clusters_and_abandoned_points_are_removed(ctx):
    from nds.catalog.indexing import restore_interrupted_indexing

    ds = add_indexed_dataset(ctx, "v", clusters=2, labels=["a"], samples_per_group=4)
    add_files_and_vectors(ctx, dim=8)
    with Session(ctx.engine) as session:
        ids = session.exec(select(Sample.id).where(Sample.dataset_id == ds.dataset_id).order_by(Sample.id)).all()
    # an abandoned run rewrote the points with its own clusters (0..3) and wrote a new space
    vectors = ctx.vectors.fetch_vectors("emb-synthetic", ids)
    ctx.vectors.upsert("emb-synthetic", ids, vectors, [{"dataset_id": ds.dataset_id, "label": "a", "cluster_id": 3} for _ in ids])
    ctx.vectors.ensure_collection("emb-abandoned", 8)
    ctx.vectors.upsert("emb-abandoned", ids, vectors, [{"dataset_id": ds.dataset_id, "label": "a"} for _ in ids])
    with session_scope(ctx.engine) as session:
        dataset = session.get(Dataset, ds.dataset_id)
        dataset.status = DatasetStatus.indexing
        job = create_job(session, kind="index", dataset_id=ds.dataset_id)
        job.status, job.owner = JobStatus.running, "gone-process-host:1"
        job.owner = None  # a process that left no record counts as dead
    hits = search(ctx, vectors=[vectors[0].tolist()], k=len(ids))["results"][0]
    assert hits and {h["cluster"] for h in hits} <= {0, 1}  # the active version's clusters, never 3
    assert [j.id for j in mark_interrupted(ctx, reason="interrupted")] == [job.id]  # and its kind's undo ran
    assert ctx.vectors.count("emb-abandoned", dataset_id=ds.dataset_id) == 0
    assert restore_interrupted_indexing(ctx) == []  # nothing left for the sweep
    # the sweep, for a dataset held with no job on record at all
    with session_scope(ctx.engine) as session:
        session.get(Dataset, ds.dataset_id).status = DatasetStatus.indexing
    ctx.vectors.upsert("emb-abandoned", ids, vectors, [{"dataset_id": ds.dataset_id, "label": "a"} for _ in ids])
    assert restore_interrupted_indexing(ctx) == ["v"]
    assert ctx.vectors.count("emb-abandoned", dataset_id=ds.dataset_id) == 0
    assert ctx.vectors.count("emb-synthetic", dataset_id=ds.dataset_id) == len(ids)


def test_a_failed_index_run_leaves_no_points_in_a_new_space(ctx, monkeypatch):
    from nds.catalog import indexing
    from nds_client.errors import NDSError

    ds = add_indexed_dataset(ctx, "v", clusters=2, labels=["a"], samples_per_group=4)
    add_files_and_vectors(ctx, dim=8)
    with Session(ctx.engine) as session:
        ids = session.exec(select(Sample.id).where(Sample.dataset_id == ds.dataset_id)).all()
    ctx.vectors.ensure_collection("emb-new", 8)
    ctx.vectors.upsert("emb-new", ids, np.ones((len(ids), 8)), [{"dataset_id": ds.dataset_id, "label": "a"} for _ in ids])
    with session_scope(ctx.engine) as session:
        session.get(Dataset, ds.dataset_id).status = DatasetStatus.indexing
    indexing.restore_status(ctx, ds.dataset_id)  # what a failed run (a parity check) ends with
    assert ctx.vectors.count("emb-new", dataset_id=ds.dataset_id) == 0
    assert ctx.vectors.count("emb-synthetic", dataset_id=ds.dataset_id) == len(ids)
    with Session(ctx.engine) as session:
        assert session.get(Dataset, ds.dataset_id).status == DatasetStatus.indexed
    assert NDSError  # (imported for the reader: failures of a run are NDSErrors)


# --------------------------------------------------------------------------- 6. DNS rebinding


def test_open_mode_answers_only_loopback_hosts_and_origins(settings):
    upgrade(settings)
    body = {"name": "r", "role": "admin"}
    with app_client(settings) as api:
        rebound = {"Host": "rebind.attacker.example:8769", "Origin": "http://rebind.attacker.example:8769"}
        r = api.post("/v1/keys", json=body, headers=rebound)
        assert r.status_code == 401 and "rebind.attacker.example" in r.json()["detail"]
        assert api.get("/v1/datasets", headers={"Host": "rebind.attacker.example:8769"}).status_code == 401
        foreign = api.post("/v1/keys", json=body, headers={"Origin": "http://rebind.attacker.example:8769"})
        assert foreign.status_code == 401
        assert api.post("/v1/keys", json=body, headers={"Origin": "null"}).status_code == 401
        for host in ("127.0.0.1:8769", "localhost:8769", "[::1]:8769", "127.0.0.2"):
            assert api.get("/v1/datasets", headers={"Host": host}).status_code == 200, host
        ok = api.post("/v1/keys", json=body, headers={"Origin": "http://127.0.0.1:8769"})
        assert ok.status_code == 201  # the operator's own browser tab on loopback


def test_allowed_hosts_for_deployments(tmp_path, data_root):
    settings = load_settings(home=tmp_path / "home", data_roots=[data_root], database_url=None, qdrant_url=None, broker_url=None,
                             allowed_hosts="nds.example.org, api.internal")
    assert settings.allowed_hosts == ["nds.example.org", "api.internal"]
    upgrade(settings)
    with app_client(settings) as api:
        assert api.get("/healthz", headers={"Host": "nds.example.org"}).status_code == 200
        assert api.get("/healthz", headers={"Host": "api.internal:8000"}).status_code == 200
        wrong = api.get("/healthz", headers={"Host": "evil.example"})
        assert wrong.status_code == 400 and wrong.json()["field"] == "Host"
        assert api.get("/healthz").status_code == 200  # loopback always answers


# --------------------------------------------------------------------------- server paths


@pytest.mark.parametrize("public", [None, "s3://bucket/pool"])
def test_client_keys_never_see_server_paths(tmp_path, data_root, public):
    settings = load_settings(home=tmp_path / "home", data_roots=[data_root], database_url=None, qdrant_url=None, broker_url=None,
                             public_uris=f"{data_root}={public}" if public else "")
    upgrade(settings)
    ctx = CatalogContext.open(settings)
    ds = add_indexed_dataset(ctx, "pool", clusters=2, labels=["a"], samples_per_group=3)
    add_files_and_vectors(ctx, dim=8)
    with session_scope(ctx.engine) as session:
        session.exec(text("UPDATE samples SET uri = :root || '/pool/' || id || '.png'").bindparams(root=str(data_root)))
        session.exec(text("UPDATE datasets SET uri = :root || '/pool'").bindparams(root=str(data_root)))
        client = access.create_key(session=session, name="client", role="client")[1]
        admin = access.create_key(session=session, name="admin", role="admin")[1]
    vector = ctx.vectors.fetch_vectors("emb-synthetic", [1])[0].tolist()
    ctx.close()
    root = str(data_root)
    expected_prefix = (public + "/") if public else ""
    with app_client(settings) as api:
        as_client, as_admin = ({"Authorization": f"Bearer {k}"} for k in (client, admin))
        query = api.post("/v1/queries", json={"expert_scores": {str(e): 1.0 for e in ds.expert_ids.values()}, "budget": 4}, headers=as_client).json()
        seen = [
            api.get("/v1/datasets", headers=as_client).text,
            api.get(f"/v1/datasets/{ds.dataset_id}", headers=as_client).text,
            api.get(f"/v1/datasets/{ds.dataset_id}/samples", headers=as_client).text,
            api.post("/v1/search", json={"vectors": [vector], "k": 3}, headers=as_client).text,
            api.get(f"/v1/queries/{query['id']}/samples", headers=as_client).text,
            api.get(f"/v1/queries/{query['id']}/manifest?format=jsonl", headers=as_client).text,
        ]
        for body in seen:
            assert root not in body, body[:300]
        rows = api.get(f"/v1/queries/{query['id']}/samples", headers=as_client).json()["data"]
        assert rows and all(r["uri"].startswith(expected_prefix + "pool/") for r in rows), rows
        assert api.get(f"/v1/datasets/{ds.dataset_id}", headers=as_client).json()["uri"] == expected_prefix + "pool"
        # operators keep the stored uri
        assert api.get(f"/v1/datasets/{ds.dataset_id}/samples", headers=as_admin).json()["data"][0]["uri"].startswith(root + "/pool/")


# --------------------------------------------------------------------------- the shared backbone


def test_the_shared_backbone_never_trains_on_restricted_images_unless_the_operator_says_so(tmp_path, data_root):
    from nds.catalog.indexing import sample_registered_images
    from nds.catalog.jobs import JobFailed
    from tests.conftest import write_images

    def catalog_with(include: bool, restricted: tuple[bool, bool]):
        settings = load_settings(home=tmp_path / f"home-{include}-{restricted}", data_roots=[data_root], database_url=None, qdrant_url=None,
                                 broker_url=None, backbone_include_restricted=include)
        upgrade(settings)
        ctx = CatalogContext.open(settings)
        for name, is_restricted, n in (("open", restricted[0], 3), ("secret", restricted[1], 5)):
            folder = write_images(data_root / name, labels=("a",), n=n)
            with session_scope(ctx.engine) as session:
                dataset = Dataset(name=name, source="imagefolder", uri=str(folder), status=DatasetStatus.ready, restricted=is_restricted)
                session.add(dataset)
                session.flush()
                for i, path in enumerate(sorted((folder / "a").iterdir())):
                    session.add(Sample(dataset_id=dataset.id, position=i, uri=str(path), label="a", width=32, height=32, byte_size=1, sha256="0" * 64))
        return ctx

    ctx = catalog_with(False, (False, True))
    assert len(sample_registered_images(ctx, 100, 16)) == 3  # the restricted dataset's 5 images are left out
    ctx.close()
    ctx = catalog_with(True, (False, True))
    assert len(sample_registered_images(ctx, 100, 16)) == 8
    ctx.close()
    ctx = catalog_with(False, (True, True))
    with pytest.raises(JobFailed, match="only on unrestricted datasets"):
        sample_registered_images(ctx, 100, 16)
    ctx.close()


def test_search_never_shows_points_outside_a_datasets_active_space(ctx):
    """A dataset being re-indexed into another dataset's space has points there before its
    new version commits: they are not hits of that space."""
    moving = add_indexed_dataset(ctx, "moving", clusters=1, labels=["a"], samples_per_group=4)
    add_indexed_dataset(ctx, "settled", clusters=1, labels=["a"], samples_per_group=4)
    add_files_and_vectors(ctx, dim=8)  # both datasets' points in emb-synthetic
    with session_scope(ctx.engine) as session:
        session.get(Dataset, moving.dataset_id).backbone = "older"  # its active space is another one
    vector = ctx.vectors.fetch_vectors("emb-synthetic", [1])[0].tolist()
    hits = search(ctx, vectors=[vector], k=8, backbone="synthetic")["results"][0]
    assert hits and {h["dataset"] for h in hits} == {"settled"}
