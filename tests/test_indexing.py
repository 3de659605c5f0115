"""The indexing pipeline on the embedded default: experts, classifiers, ONNX, REST and CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from nds.catalog.context import CatalogContext
from nds.catalog.db import upgrade
from nds.catalog.indexing import IndexRequest, start_indexing
from nds.catalog.jobs import InlineDispatcher, get_job
from nds.catalog.registration import RegistrationRequest, start_registration
from nds.catalog.settings import load_settings
from nds.catalog.tables import Assignment, Cluster, Dataset, DatasetStatus, Expert, JobStatus
from nds_client.errors import ConflictError, InvalidInputError, NotFoundError
from nds_client.runtime import create_session, read_metadata, run
from tests.conftest import LOOPBACK, wait_job, write_images

pytestmark = pytest.mark.slow  # trains networks or runs processes: not in `make test-fast`

SMALL = dict(image_size=32, epochs=1, width=8, min_steps=10)


def register(ctx, name: str, folder: Path) -> int:
    dataset, job = start_registration(ctx, RegistrationRequest(name=name, path=str(folder)))
    InlineDispatcher(ctx).submit(job)
    return dataset.id


def index(ctx, dataset_id: int, **kwargs):
    job = start_indexing(ctx, dataset_id, IndexRequest(**{**SMALL, **kwargs}))
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        return get_job(session, job.id)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Two registered datasets, both indexed with K=2 (module-scoped: training costs time)."""
    root = tmp_path_factory.mktemp("indexed")
    data = root / "data"
    settings = load_settings(home=root / "home", data_roots=[data], database_url=None, broker_url=None, qdrant_url=None)
    upgrade(settings)
    ctx = CatalogContext.open(settings)
    stripes = register(ctx, "stripes", write_images(data / "stripes", n=12, kind="stripes"))
    noise = register(ctx, "noise", write_images(data / "noise", n=12, kind="noise"))
    jobs = {name: index(ctx, did, clusters=2) for name, did in (("stripes", stripes), ("noise", noise))}
    yield ctx, {"stripes": stripes, "noise": noise}, jobs, settings
    ctx.close()


def test_pipeline_result_and_rows(indexed):
    ctx, ids, jobs, _ = indexed
    job = jobs["stripes"]
    assert job.status == JobStatus.succeeded, job.error
    result = job.result
    assert result["index_version"] == 1 and len(result["clusters"]) == 2
    assert sum(c["size"] for c in result["clusters"]) == 24
    assert all(0.0 <= c["heldout_accuracy"] <= 1.0 for c in result["clusters"])
    assert result["classifier"]["labels"] == ["a", "b"]
    with Session(ctx.engine) as session:
        ds = session.get(Dataset, ids["stripes"])
        assert (ds.status, ds.index_version) == (DatasetStatus.indexed, 1) and ds.backbone.startswith("rotnet-")
        experts = session.exec(select(Expert).where(Expert.dataset_id == ds.id)).all()
        assert sorted((e.kind.value, e.cluster) for e in experts) == [("classifier", None), ("rotation", 0), ("rotation", 1)]
        clusters = session.exec(select(Cluster).where(Cluster.dataset_id == ds.id)).all()
        assert sorted(c.size for c in clusters) == sorted(c["size"] for c in result["clusters"])
        assignments = session.exec(select(Assignment).where(Assignment.dataset_id == ds.id)).all()
        assert len(assignments) == 24
        # ranks number each (cluster, label) group 0..n-1
        groups: dict = {}
        for a in assignments:
            groups.setdefault((a.cluster, a.label), []).append(a.rank)
        assert all(sorted(r) == list(range(len(r))) for r in groups.values())
    # vectors: one point per sample; search hits carry the cluster of the active version's
    # assignment (the catalog's, not the vector payload's: tests/test_hardening.py)
    collection = "emb-" + ds.backbone
    assert ctx.vectors.count(collection, dataset_id=ids["stripes"]) == 24
    first = assignments[0]
    from nds.catalog.retrieval.search import search

    vector = ctx.vectors.fetch_vectors(collection, [first.sample_id])[0]
    hits = search(ctx, vectors=[vector.tolist()], k=24)["results"][0]
    exact = {h["sample_id"]: h for h in hits if h["score"] > 0.999}  # the synthetic images repeat, so ties are expected
    assert first.sample_id in exact and exact[first.sample_id]["cluster"] == first.cluster


def test_exported_experts_run_in_onnxruntime_with_metadata(indexed):
    ctx, ids, _, _ = indexed
    with Session(ctx.engine) as session:
        experts = session.exec(select(Expert).where(Expert.dataset_id == ids["stripes"])).all()
    for e in experts:
        path = ctx.artifacts.open_path(e.artifact)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e.sha256
        meta = read_metadata(path)
        assert json.loads(meta["task"]) == e.kind.value and json.loads(meta["input_size"]) == 32
        assert json.loads(meta["backbone_version"]).startswith("rotnet-")
        assert "training_config" in meta and "mean" in meta and "std" in meta
        if e.kind.value == "classifier":
            assert json.loads(meta["label_names"]) == ["a", "b"]
        session = create_session(path)
        for batch in (1, 7):
            logits, features = run(session, np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32))
            assert logits.shape == (batch, 4 if e.kind.value == "rotation" else 2) and features.shape == (batch, 128)


def test_indexing_one_dataset_leaves_the_other_alone(indexed):
    ctx, ids, _, _ = indexed
    with Session(ctx.engine) as session:
        before = [(e.id, e.sha256, e.index_version) for e in session.exec(select(Expert).where(Expert.dataset_id == ids["noise"])).all()]
        clusters_before = [(c.id, c.size) for c in session.exec(select(Cluster).where(Cluster.dataset_id == ids["noise"])).all()]
    job = index(ctx, ids["stripes"], clusters=3)
    assert job.status == JobStatus.succeeded, job.error
    with Session(ctx.engine) as session:
        after = [(e.id, e.sha256, e.index_version) for e in session.exec(select(Expert).where(Expert.dataset_id == ids["noise"])).all()]
        clusters_after = [(c.id, c.size) for c in session.exec(select(Cluster).where(Cluster.dataset_id == ids["noise"])).all()]
        assert session.get(Dataset, ids["stripes"]).index_version == 2
    assert before == after and clusters_before == clusters_after


def test_rerun_reuses_artifacts_one_file_per_expert(indexed):
    ctx, ids, _, _ = indexed
    job1 = index(ctx, ids["noise"], clusters=2, seed=5)
    files_before = sorted(p.name for p in (ctx.artifacts.root / "experts" / str(ids["noise"])).glob("*.onnx"))
    job2 = index(ctx, ids["noise"], clusters=2, seed=5)
    files_after = sorted(p.name for p in (ctx.artifacts.root / "experts" / str(ids["noise"])).glob("*.onnx"))
    assert job1.status == job2.status == JobStatus.succeeded
    assert all(c["reused"] for c in job2.result["clusters"])
    assert files_before == files_after
    assert not list(ctx.artifacts.root.rglob(".*tmp*"))


def test_label_partition(indexed):
    ctx, ids, _, _ = indexed
    job = index(ctx, ids["noise"], partition="labels")
    assert job.status == JobStatus.succeeded, job.error
    assert [(c["label"], c["size"]) for c in job.result["clusters"]] == [("a", 12), ("b", 12)]


def test_bad_requests(indexed):
    ctx, ids, _, _ = indexed
    cases = [
        (dict(clusters=0), "clusters"),
        (dict(clusters=25), "clusters"),
        (dict(partition="spectral"), "partition"),
        (dict(backbone="clip"), "backbone"),
        (dict(image_size=4), "image_size"),
        (dict(epochs=0), "epochs"),
        (dict(weights="/etc/passwd", backbone="torchvision:resnet18"), "weights"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidInputError) as info:
            start_indexing(ctx, ids["noise"], IndexRequest(**{**SMALL, **kwargs}))
        assert info.value.field == field, (kwargs, info.value)
    with pytest.raises(InvalidInputError, match="known: default, onnx, torchvision"):
        start_indexing(ctx, ids["noise"], IndexRequest(backbone="clip"))
    with pytest.raises(NotFoundError):
        start_indexing(ctx, 999, IndexRequest())
    with Session(ctx.engine) as session:
        assert session.get(Dataset, ids["noise"]).status == DatasetStatus.indexed


def test_index_option_limits_are_written_once():
    """INDEX_LIMITS bounds the REST body, IndexRequest.validate and the CLI, with IndexRequest's defaults."""
    import inspect
    import typing

    from nds.api.cli import index as cli_index
    from nds.api.schemas import IndexBody
    from nds.catalog.index_options import INDEX_LIMITS, PARTITIONS

    schema = IndexBody.model_json_schema()["properties"]
    cli = inspect.signature(cli_index).parameters
    cli_help = {name: hint.__metadata__[0].help for name, hint in typing.get_type_hints(cli_index, include_extras=True).items() if name in cli}
    assert schema["partition"]["enum"] == list(PARTITIONS)
    for name in ("clusters", "partition", "backbone", "weights", "image_size", "epochs", "width", "seed", "min_steps"):
        assert IndexBody().model_dump()[name] == getattr(IndexRequest(), name) == cli[name].default, name
    for name, limit in INDEX_LIMITS.items():
        assert (schema[name]["minimum"], schema[name]["maximum"]) == (limit.low, limit.high), name
        assert f"{limit.low} to {limit.high}" in cli_help[name], name
        IndexRequest(**{name: limit.low}).validate()
        IndexRequest(**{name: limit.high}).validate()
        for bad in (limit.low - 1, limit.high + 1, "8", True):
            with pytest.raises(InvalidInputError) as info:
                IndexRequest(**{name: bad}).validate()
            assert info.value.field == name, (name, bad)
    # the messages callers see
    for kwargs, message in [(dict(clusters=0), "clusters must be at least 1, got 0"),
                            (dict(clusters=100_001), "clusters must be at most 100000, got 100001"),
                            (dict(image_size=4), "image_size must be between 16 and 512 pixels, got 4"),
                            (dict(epochs=0), "epochs must be between 1 and 1000, got 0"),
                            (dict(min_steps=-1), "min_steps must be between 0 and 100000, got -1"),
                            (dict(width=2), "width must be between 4 and 128, got 2"),
                            (dict(seed=-1), "seed must be between 0 and 2147483647, got -1")]:
        with pytest.raises(InvalidInputError) as info:
            IndexRequest(**kwargs).validate()
        assert info.value.message == message


def test_busy_datasets_conflict(indexed):
    ctx, ids, _, _ = indexed
    job = start_indexing(ctx, ids["noise"], IndexRequest(**SMALL))
    with pytest.raises(ConflictError, match="already being indexed"):
        start_indexing(ctx, ids["noise"], IndexRequest(**SMALL))
    InlineDispatcher(ctx).submit(job)  # let it finish so the module's datasets stay usable
    with Session(ctx.engine) as session:
        ds = session.get(Dataset, ids["noise"])
        ds.status = DatasetStatus.registering
        session.add(ds)
        session.commit()
    try:
        with pytest.raises(ConflictError, match="still being registered"):
            start_indexing(ctx, ids["noise"], IndexRequest(**SMALL))
    finally:
        with Session(ctx.engine) as session:
            ds = session.get(Dataset, ids["noise"])
            ds.status = DatasetStatus.indexed
            session.add(ds)
            session.commit()


def test_undecodable_dataset_fails_cleanly(indexed, tmp_path):
    ctx, _, _, settings = indexed
    folder = write_images(settings.data_roots[0] / "fragile", n=3)
    did = register(ctx, "fragile", folder)
    for png in folder.rglob("*.png"):
        png.write_bytes(b"corrupted after registration")
    job = index(ctx, did, clusters=1)
    assert job.status == JobStatus.failed and "could be decoded" in job.error
    with Session(ctx.engine) as session:
        ds = session.get(Dataset, did)
        assert ds.status == DatasetStatus.ready and ds.index_version == 0
        assert session.exec(select(Expert).where(Expert.dataset_id == did)).all() == []
        assert session.exec(select(Assignment).where(Assignment.dataset_id == did)).all() == []
    assert not (ctx.artifacts.root / "experts" / str(did)).exists() or not list((ctx.artifacts.root / "experts" / str(did)).iterdir())


def test_rest_index_experts_and_download(indexed):
    from nds.api.app import create_app

    ctx, ids, _, settings = indexed
    with TestClient(create_app(settings), base_url=LOOPBACK) as api:
        resp = api.post(f"/v1/datasets/{ids['stripes']}/index", json={"clusters": 2, **SMALL})
        assert resp.status_code == 202, resp.text
        job = wait_job(api, resp.json()["id"], timeout=60)
        assert job["status"] == "succeeded", job
        assert api.post(f"/v1/datasets/{ids['stripes']}/index", json={"clusters": 0}).json()["field"] == "clusters"
        assert api.post(f"/v1/datasets/{ids['stripes']}/index", json={"clusters": 1000}).json()["field"] == "clusters"
        assert api.post(f"/v1/datasets/{ids['stripes']}/index", json={"backbone": "nope"}).json()["field"] == "backbone"
        assert api.post("/v1/datasets/999/index", json={}).status_code == 404

        listed = api.get("/v1/experts").json()
        kinds = [e["kind"] for e in listed["data"]]
        assert kinds.count("rotation") >= 4 and kinds.count("classifier") == 2
        for e in listed["data"]:
            for key in ("id", "kind", "dataset_id", "cluster", "sha256", "input_size", "created_at"):
                assert key in e
        only = api.get("/v1/experts", params={"dataset": ids["stripes"], "kind": "classifier"}).json()
        assert only["count"] == 1 and only["data"][0]["dataset_id"] == ids["stripes"]
        assert api.get("/v1/experts", params={"kind": "bogus"}).status_code == 422

        expert = only["data"][0]
        assert api.get(f"/v1/experts/{expert['id']}").json()["sha256"] == expert["sha256"]
        model = api.get(f"/v1/experts/{expert['id']}/model.onnx")
        assert model.status_code == 200 and model.headers["etag"] == f'"{expert["sha256"]}"'
        assert hashlib.sha256(model.content).hexdigest() == expert["sha256"]
        cached = api.get(f"/v1/experts/{expert['id']}/model.onnx", headers={"If-None-Match": model.headers["etag"]})
        assert cached.status_code == 304
        assert api.get("/v1/experts/99999/model.onnx").status_code == 404
        clusters = api.get(f"/v1/datasets/{ids['stripes']}/clusters").json()
        assert len(clusters) == 2 and sum(c["size"] for c in clusters) == 24


def test_cli_index_and_experts_list(indexed, tmp_path):
    from typer.testing import CliRunner

    from nds.api.cli import app

    _, ids, _, settings = indexed
    env = {"NDS_HOME": str(settings.home), "NDS_DATA_ROOTS": str(settings.data_roots[0]), "NDS_DATABASE_URL": "", "NDS_BROKER_URL": "", "COLUMNS": "200"}
    runner = CliRunner()
    result = runner.invoke(app, ["index", "noise", "--clusters", "2", "--epochs", "1", "--image-size", "32", "--width", "8", "--min-steps", "10"], env=env)
    assert result.exit_code == 0, result.output
    assert "held-out rotation" in result.output and "label classifier" in result.output
    listed = json.loads(runner.invoke(app, ["experts", "list", "--json"], env=env).stdout)
    assert {e["kind"] for e in listed["data"]} == {"rotation", "classifier"}
    bad = runner.invoke(app, ["index", "noise", "--clusters", "0"], env=env)
    assert bad.exit_code == 1 and "clusters must be at least 1" in bad.stderr
    bad = runner.invoke(app, ["index", "noise", "--backbone", "clip"], env=env)
    assert bad.exit_code == 1 and "known: default, onnx, torchvision" in bad.stderr
    assert runner.invoke(app, ["experts", "list", "--kind", "bogus"], env=env).exit_code == 1


def test_search_by_example(indexed):
    from nds.api.app import create_app

    ctx, ids, _, settings = indexed
    with Session(ctx.engine) as session:
        ds = session.get(Dataset, ids["noise"])
        sample_id = session.exec(select(Assignment.sample_id).where(Assignment.dataset_id == ds.id)).first()
    vector = ctx.vectors.fetch_vectors("emb-" + ds.backbone, [sample_id])[0].tolist()
    with TestClient(create_app(settings), base_url=LOOPBACK) as api:
        resp = api.post("/v1/search", json={"vectors": [vector], "k": 5})
        assert resp.status_code == 200, resp.text
        hits = resp.json()["results"][0]
        assert hits[0]["score"] > 0.999 and hits[0]["dataset"] == "noise" and hits[0]["uri"].endswith(".png")
        only = api.post("/v1/search", json={"vectors": [vector], "k": 5, "datasets": [ids["stripes"]]}).json()["results"][0]
        assert only and all(h["dataset"] == "stripes" for h in only)
        assert api.post("/v1/search", json={"vectors": [vector[:10]], "k": 5}).status_code == 422
        assert api.post("/v1/search", json={"vectors": [vector], "backbone": "nope"}).json()["field"] == "backbone"
        assert api.post("/v1/search", json={"vectors": [vector], "datasets": [999]}).json()["field"] == "datasets"
        assert api.post("/v1/search", json={"vectors": []}).status_code == 422
