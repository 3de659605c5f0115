"""Object storage, against a real S3 API on loopback (moto's server mode, tests/s3.py): sources
under ``s3://`` data roots, an unreachable store and refused credentials (a clear error before
anything is stored), the store going away in the middle of a registration (the job fails,
nothing half-written, a retry completes), and the artifact store in a bucket."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlmodel import Session, select
from typer.testing import CliRunner

from nds.catalog.context import CatalogContext
from nds.catalog.db import upgrade
from nds.catalog.jobs import InlineDispatcher, get_job
from nds.catalog.registration import RegistrationRequest, start_registration
from nds.catalog.settings import Settings, load_settings
from nds.catalog.tables import Dataset, Expert, Job, JobStatus, Sample
from nds_client import storage
from nds_client.errors import InvalidInputError, SourceError, StorageUnavailable
from tests.conftest import LOOPBACK, write_images
from tests.s3 import FAULT_ATTEMPTS, bucket, closed_port, pointed_at, s3_fault_server, s3_server, subprocess_env  # noqa: F401 - fixtures

SMALL_INDEX = ["--clusters", "2", "--epochs", "1", "--image-size", "32", "--width", "8", "--min-steps", "10"]


# --------------------------------------------------------------------------- helpers


def s3_settings(tmp_path: Path, data_root: Path, *prefixes: str, **overrides: object) -> Settings:
    return load_settings(home=tmp_path / "home", data_roots=[data_root, *prefixes], database_url=None, qdrant_url=None,
                         broker_url=None, **overrides)


def open_ctx(settings: Settings) -> CatalogContext:
    upgrade(settings)
    return CatalogContext.open(settings)


@pytest.fixture
def s3ctx(tmp_path, data_root, bucket):  # noqa: F811 - the fixture
    """A catalog whose data roots are a local folder and ``s3://BUCKET/data``; (ctx, bucket, prefix)."""
    prefix = bucket.uri("data")
    ctx = open_ctx(s3_settings(tmp_path, data_root, prefix))
    yield ctx, bucket, prefix
    ctx.close()


def register(ctx: CatalogContext, name: str, path: str, source: str = "imagefolder", **options: str) -> tuple[Dataset | None, Job]:
    dataset, job = start_registration(ctx, RegistrationRequest(name=name, path=path, source=source, options=options))
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        return session.get(Dataset, dataset.id), get_job(session, job.id)


def stored(ctx: CatalogContext) -> tuple[int, int]:
    """(datasets, samples) in the catalog."""
    with Session(ctx.engine) as session:
        return len(session.exec(select(Dataset.id)).all()), len(session.exec(select(Sample.id)).all())


def samples_of(ctx: CatalogContext, dataset_id: int) -> list[Sample]:
    with Session(ctx.engine) as session:
        return list(session.exec(select(Sample).where(Sample.dataset_id == dataset_id).order_by(Sample.position)).all())


def source_name(ctx: CatalogContext, name: str) -> str:
    """The registered source ``name``, or its module's class by dotted path (a checkout whose
    entry points were installed before the plugin was written); skips when there is none."""
    if name in ctx.sources.names():
        return name
    import importlib

    try:
        module = importlib.import_module(f"nds.plugins.sources.{name}")
    except ImportError:
        pytest.skip(f"no {name} source plugin yet")
    from nds.plugins.contract import Source

    for attr, value in vars(module).items():
        if isinstance(value, type) and issubclass(value, Source) and getattr(value, "name", None) == name:
            return f"nds.plugins.sources.{name}:{attr}"
    pytest.skip(f"no {name} source class in nds.plugins.sources.{name}")


def collections_data():
    try:
        from tests import collections_data as module
    except ImportError:
        pytest.skip("tests/collections_data.py is not there yet")
    return module


def noise_png(seed: int, size: int) -> bytes:
    """A PNG of random pixels (incompressible: ``size`` 512 is about 790 KB)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------- sources in S3


def test_imagefolder_in_s3_registers(s3ctx, tmp_path):
    ctx, bucket, prefix = s3ctx
    local = write_images(tmp_path / "upload" / "pets", labels=("cat", "dog"), n=4)
    bucket.upload_folder(tmp_path / "upload", "data")
    bucket.put("data/pets/cat/broken.png", b"not an image")
    bucket.put("data/pets/.hidden/x.png", (local / "cat" / "0.png").read_bytes())
    dataset, job = register(ctx, "pets", f"{prefix}/pets/")  # a trailing slash is the same folder
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.labels, dataset.skipped) == (8, ["cat", "dog"], 1)
    assert dataset.uri == f"{prefix}/pets"
    assert job.result["skipped_reasons"] == {"not an image": 1}
    rows = samples_of(ctx, dataset.id)
    assert rows[0].uri == f"{prefix}/pets/cat/0.png" and all(r.uri.startswith(prefix + "/pets/") for r in rows)
    data = (local / "cat" / "0.png").read_bytes()
    assert (rows[0].sha256, rows[0].byte_size, rows[0].width, rows[0].label) == (hashlib.sha256(data).hexdigest(), len(data), 32, "cat")
    assert rows[0].shard is None
    assert storage.read_location(storage.Location(rows[0].uri)) == data  # the stored address opens through the I/O layer


def test_manifest_in_s3_with_s3_uris(s3ctx, tmp_path):
    ctx, bucket, prefix = s3ctx
    write_images(tmp_path / "upload" / "imgs", labels=("a", "b"), n=2)
    bucket.upload_folder(tmp_path / "upload", "data")
    bucket.upload_folder(tmp_path / "upload", "elsewhere")  # there, but outside the data roots
    lines = ["uri,label", f"{prefix}/imgs/a/0.png,x", "imgs/a/1.png,y", f"{prefix}/imgs/b/0.png,",
             f"{bucket.uri('elsewhere')}/imgs/b/1.png,z", f"{prefix}/imgs/b/missing.png,z"]
    bucket.put("data/lists/m.csv", ("\n".join(lines) + "\n").encode())
    bucket.put("data/imgs/lists-relative.csv", b"uri\na/0.png\n")
    dataset, job = register(ctx, "listed", f"{prefix}/lists/m.csv", source="manifest")
    assert job.status == JobStatus.succeeded, job.error
    # relative uris are relative to the manifest's folder: lists/imgs/a/1.png does not exist
    assert job.result["skipped_reasons"] == {"outside the data roots": 1, "missing or unresolvable": 2}
    assert (dataset.num_samples, dataset.labels) == (2, ["x"])
    assert [r.uri for r in samples_of(ctx, dataset.id)] == [f"{prefix}/imgs/a/0.png", f"{prefix}/imgs/b/0.png"]
    dataset, job = register(ctx, "relative", f"{prefix}/imgs/lists-relative.csv", source="manifest")
    assert [r.uri for r in samples_of(ctx, dataset.id)] == [f"{prefix}/imgs/a/0.png"]


def test_uris_outside_the_prefixes_are_refused(s3ctx, tmp_path):
    ctx, bucket, prefix = s3ctx
    write_images(tmp_path / "upload" / "pets", n=1)
    for where in ("data", "elsewhere", "data-sibling"):
        bucket.upload_folder(tmp_path / "upload", where)
    cases = [
        (bucket.uri("elsewhere/pets"), "outside the data roots"),
        (bucket.uri("data-sibling/pets"), "outside the data roots"),  # a prefix is whole path segments
        (f"{prefix}/../elsewhere/pets", "outside the data roots"),
        ("s3://another-bucket/data/pets", "outside the data roots"),
        (bucket.uri("elsewhere/pets/{0..1}.tar"), "outside the data roots"),
        (f"{prefix}/missing", "does not exist"),
    ]
    for path, needle in cases:
        with pytest.raises(InvalidInputError) as info:
            start_registration(ctx, RegistrationRequest(name="x", path=path))
        assert info.value.field == "path" and needle in str(info.value), (path, str(info.value))
    assert stored(ctx) == (0, 0)


def test_webdataset_shards_in_s3(s3ctx, tmp_path):
    ctx, bucket, prefix = s3ctx
    source = source_name(ctx, "webdataset")
    data = collections_data()
    data.write_shards(tmp_path / "upload" / "wds", 3, 10, truncate_last=True)
    bucket.upload_folder(tmp_path / "upload", "data")
    dataset, job = register(ctx, "wds", f"{prefix}/wds/{{00000..00002}}.tar", source=source)
    assert job.status == JobStatus.succeeded, job.error
    assert dataset.num_samples == 20
    assert [p["part"] for p in job.result["skipped_parts"]] == [f"{prefix}/wds/00002.tar"]
    rows = samples_of(ctx, dataset.id)
    first = rows[0]
    assert first.shard == f"{prefix}/wds/00000.tar" and first.uri.startswith(first.shard + "#") and first.offset > 0
    image = storage.read_location(storage.Location(first.uri, first.shard, first.offset, first.byte_size))  # one ranged GET
    assert hashlib.sha256(image).hexdigest() == first.sha256
    with pytest.raises(SourceError) as info:  # a brace pattern naming a missing shard names it
        start_registration(ctx, RegistrationRequest(name="more", path=f"{prefix}/wds/{{00000..00003}}.tar", source=source))
    assert info.value.field == "path" and "00003.tar" in str(info.value)
    globbed, job = register(ctx, "globbed", f"{prefix}/wds/*.tar", source=source)
    assert globbed.num_samples == 20


def test_parquet_in_s3(s3ctx, tmp_path):
    ctx, bucket, prefix = s3ctx
    source = source_name(ctx, "parquet")
    data = collections_data()
    data.write_parquet(tmp_path / "upload" / "pq" / "train.parquet", 12, row_group_size=5)
    bucket.upload_folder(tmp_path / "upload", "data")
    dataset, job = register(ctx, "hf", f"{prefix}/pq/train.parquet", source=source)
    assert job.status == JobStatus.succeeded, job.error
    assert (dataset.num_samples, dataset.labels) == (12, ["cat", "dog"])
    row = samples_of(ctx, dataset.id)[7]
    assert row.shard == f"{prefix}/pq/train.parquet" and row.offset == 7
    image = storage.read_location(storage.Location(row.uri, row.shard, row.offset, row.byte_size))
    assert hashlib.sha256(image).hexdigest() == row.sha256


# --------------------------------------------------------------------------- the store unreachable, the credentials refused


def _refused_everywhere(settings: Settings, ctx: CatalogContext, cli_env: dict[str, str], path: str, needle: str) -> None:
    """The catalog call, the REST API (503) and the CLI (exit 1) each refuse the registration of
    ``path`` with a message holding ``needle``, and nothing is stored."""
    from nds.api.app import create_app
    from nds.api.cli import app

    with pytest.raises(StorageUnavailable) as info:
        start_registration(ctx, RegistrationRequest(name="pets", path=path))
    assert needle in str(info.value) and path in str(info.value)
    with TestClient(create_app(settings), base_url=LOOPBACK) as api:
        resp = api.post("/v1/datasets", json={"name": "pets", "path": path})
    assert resp.status_code == 503, resp.text
    assert needle in resp.json()["detail"]
    result = CliRunner().invoke(app, ["datasets", "add", "pets", path], env=cli_env)
    assert result.exit_code == 1 and needle in result.stderr, result.output
    assert stored(ctx) == (0, 0)


def test_unreachable_endpoint_is_a_clear_error_before_anything_is_stored(s3ctx, tmp_path):
    ctx, bucket, prefix = s3ctx
    bucket.upload_folder(write_images(tmp_path / "upload", n=1), "data/pets")
    env = {"NDS_HOME": str(ctx.settings.home), "NDS_DATA_ROOTS": f"{tmp_path / 'data'},{prefix}", "NDS_DATABASE_URL": "",
           "NDS_BROKER_URL": "", "NDS_QDRANT_URL": "", "COLUMNS": "200"}
    with pointed_at(f"http://127.0.0.1:{closed_port()}", attempts=FAULT_ATTEMPTS):
        started = time.monotonic()
        _refused_everywhere(ctx.settings, ctx, env, f"{prefix}/pets", "the object store does not answer")
        elapsed = time.monotonic() - started
    assert elapsed < 30, f"three refusals took {elapsed:.0f} s"


def test_refused_credentials_are_a_clear_error_before_anything_is_stored(s3ctx, s3_server, tmp_path):  # noqa: F811
    ctx, bucket, prefix = s3ctx
    bucket.upload_folder(write_images(tmp_path / "upload", n=1), "data/pets")
    env = {"NDS_HOME": str(ctx.settings.home), "NDS_DATA_ROOTS": f"{tmp_path / 'data'},{prefix}", "NDS_DATABASE_URL": "",
           "NDS_BROKER_URL": "", "NDS_QDRANT_URL": "", "COLUMNS": "200"}
    with s3_server.refusing_credentials():
        _refused_everywhere(ctx.settings, ctx, env, f"{prefix}/pets", "the credentials are refused")
        with pytest.raises(StorageUnavailable, match="refused the credentials"):  # a listing's 403 names the code
            storage.list_files(f"{prefix}/pets")
    # refused while the job runs (after the checks passed): the job fails, nothing stays
    dataset, job = start_registration(ctx, RegistrationRequest(name="pets", path=f"{prefix}/pets"))
    with s3_server.refusing_credentials():
        InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        failed = get_job(session, job.id)
    assert failed.status == JobStatus.failed and "refused the credentials" in failed.error, failed.error
    assert stored(ctx) == (0, 0)


# --------------------------------------------------------------------------- the store goes away mid-registration


@pytest.fixture
def fault_ctx(tmp_path, data_root, s3_fault_server):  # noqa: F811
    """A catalog on the test's own S3 server (to stop and restart); (ctx, server, bucket, prefix)."""
    made = s3_fault_server.create_bucket()
    prefix = made.uri("data")
    ctx = open_ctx(s3_settings(tmp_path, data_root, prefix))
    yield ctx, s3_fault_server, made, prefix
    ctx.close()
    if not s3_fault_server.running:
        s3_fault_server.start()
    made.remove()


def _failed_cleanly(ctx: CatalogContext, job: Job, dataset: Dataset | None) -> None:
    assert job.status == JobStatus.failed, job.result
    assert "the object store does not answer" in job.error, job.error
    assert dataset is None and stored(ctx) == (0, 0)  # no dataset row, no samples


def test_store_stopped_mid_registration_fails_the_job_and_a_retry_completes(fault_ctx, tmp_path):
    ctx, server, bucket, prefix = fault_ctx
    write_images(tmp_path / "upload" / "pets", labels=("a", "b", "c", "d"), n=10)
    bucket.upload_folder(tmp_path / "upload", "data")
    dataset, job = start_registration(ctx, RegistrationRequest(name="pets", path=f"{prefix}/pets"))
    stopped = server.stop_after_object_gets(12)  # 11 images read, then the server dies under the 12th
    InlineDispatcher(ctx).submit(job)
    assert stopped.wait(30) and not server.running
    with Session(ctx.engine) as session:
        _failed_cleanly(ctx, get_job(session, job.id), session.get(Dataset, dataset.id))
    server.restart()  # the same port; moto's backends kept the objects
    again, retried = register(ctx, "pets", f"{prefix}/pets")
    assert retried.status == JobStatus.succeeded, retried.error
    assert again.num_samples == 40 and len(samples_of(ctx, again.id)) == 40


def test_store_gone_before_the_listing_fails_the_job(fault_ctx, tmp_path):
    ctx, server, bucket, prefix = fault_ctx
    bucket.upload_folder(write_images(tmp_path / "upload", n=3), "data/pets")
    dataset, job = start_registration(ctx, RegistrationRequest(name="pets", path=f"{prefix}/pets"))  # checked while up
    server.stop()
    InlineDispatcher(ctx).submit(job)  # the job lists the folder: the store does not answer
    with Session(ctx.engine) as session:
        _failed_cleanly(ctx, get_job(session, job.id), session.get(Dataset, dataset.id))
    server.restart()
    again, retried = register(ctx, "pets", f"{prefix}/pets")
    assert retried.status == JobStatus.succeeded and again.num_samples == 6


def test_store_stopped_while_a_shard_streams_fails_the_job_not_the_shard(fault_ctx, tmp_path):
    """A shard larger than one sequential read (16 MiB): the server dies between its first and
    second range; that is the store's failure (the job fails), not a bad shard (SkippedPart)."""
    ctx, server, bucket, prefix = fault_ctx
    source = source_name(ctx, "webdataset")
    per_shard = 24  # 24 x ~790 KB: two ranged GETs per shard
    for s in range(2):
        write_tar(tmp_path / "upload" / "wds" / f"{s:05d}.tar",
                  [m for i in range(per_shard) for m in ((f"{s}{i:03d}.png", noise_png(100 * s + i, 512)), (f"{s}{i:03d}.cls", b"1"))])
    assert (tmp_path / "upload" / "wds" / "00000.tar").stat().st_size > storage.SEQUENTIAL_BLOCK
    bucket.upload_folder(tmp_path / "upload", "data")
    dataset, job = start_registration(ctx, RegistrationRequest(name="wds", path=f"{prefix}/wds/{{00000..00001}}.tar", source=source))
    stopped = server.stop_after_object_gets(2)  # the first shard's second range
    InlineDispatcher(ctx).submit(job)
    assert stopped.wait(30)
    with Session(ctx.engine) as session:
        failed = get_job(session, job.id)
        _failed_cleanly(ctx, failed, session.get(Dataset, dataset.id))
    assert "00000.tar" in failed.error
    server.restart()
    again, retried = register(ctx, "wds", f"{prefix}/wds/{{00000..00001}}.tar", source=source)
    assert retried.status == JobStatus.succeeded, retried.error
    assert again.num_samples == 2 * per_shard and retried.result["skipped_parts"] == []


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_s3_sources_register_index_query_and_manifest(s3ctx, tmp_path):
    """CLI: an image folder and a manifest in S3 registered and indexed; a query's manifest carries their s3 uris."""
    from nds.api.app import create_app
    from nds.api.cli import app

    ctx, bucket, prefix = s3ctx
    write_images(tmp_path / "upload" / "pets", labels=("cat", "dog"), n=8, kind="stripes")
    write_images(tmp_path / "upload" / "more", labels=("x", "y"), n=8, kind="noise", seed=3)
    bucket.upload_folder(tmp_path / "upload", "data")
    rows = [f"{prefix}/more/{label}/{i}.png,{label}" for label in ("x", "y") for i in range(8)]
    bucket.put("data/more.csv", ("uri,label\n" + "\n".join(rows) + "\n").encode())
    env = {"NDS_HOME": str(ctx.settings.home), "NDS_DATA_ROOTS": f"{tmp_path / 'data'},{prefix}", "NDS_DATABASE_URL": "",
           "NDS_BROKER_URL": "", "NDS_QDRANT_URL": "", "COLUMNS": "200"}
    runner = CliRunner()
    for name, path, source in (("pets", f"{prefix}/pets", "imagefolder"), ("more", f"{prefix}/more.csv", "manifest")):
        added = runner.invoke(app, ["datasets", "add", name, path, "--source", source, "--json"], env=env)
        assert added.exit_code == 0, added.output
        assert json.loads(added.stdout)["num_samples"] == 16
        indexed = runner.invoke(app, ["index", name, *SMALL_INDEX], env=env)
        assert indexed.exit_code == 0, indexed.output
    with Session(ctx.engine) as session:
        experts = session.exec(select(Expert.id)).all()
    with TestClient(create_app(ctx.settings), base_url=LOOPBACK) as api:
        made = api.post("/v1/queries", json={"expert_scores": {str(e): 0.5 for e in experts}, "budget": 20})
        assert made.status_code in (200, 201), made.text
        csv_text = api.get(f"/v1/queries/{made.json()['id']}/manifest", params={"format": "csv"}).text
    lines = csv_text.strip().splitlines()
    header = lines[0].split(",")
    uris = [dict(zip(header, line.split(",")))["uri"] for line in lines[1:]]
    assert uris and all(u.startswith(f"{prefix}/pets/") or u.startswith(f"{prefix}/more/") for u in uris), uris[:5]
    assert {u.split("/")[4] for u in uris} == {"pets", "more"}
    assert storage.read_bytes(uris[0])[:8] == b"\x89PNG\r\n\x1a\n"  # what the manifest names opens


# --------------------------------------------------------------------------- artifacts in object storage


SECOND_PROCESS = r"""
import hashlib, json, sys
from sqlmodel import Session, select
from nds.catalog.context import CatalogContext
from nds.catalog.retrieval.manifest import iter_manifest
from nds.catalog.settings import load_settings
from nds.catalog.tables import Expert, Query

ctx = CatalogContext.open(load_settings())
with Session(ctx.engine) as session:
    experts = session.exec(select(Expert)).all()
    query = session.get(Query, sys.argv[1])
digests = {e.artifact: hashlib.sha256(ctx.artifacts.open_path(e.artifact).read_bytes()).hexdigest() == e.sha256 for e in experts}
rows = sum(len(chunk) for chunk in iter_manifest(ctx, query))
print(json.dumps({"store": type(ctx.artifacts).__name__, "digests": digests, "manifest_rows": rows}))
"""


@pytest.mark.slow
def test_artifacts_in_object_storage(tmp_path, data_root, bucket):  # noqa: F811
    """NDS_ARTIFACTS_DIR=s3://...: the experts, the backbone and the picks are objects in the bucket;
    the download route serves them; another process with an empty cache reads them; a re-index
    finds them there; the garbage collection works on the bucket."""
    from nds.api.app import create_app
    from nds.catalog.artifact_gc import DEFAULT_GRACE_SECONDS, gc
    from nds.catalog.artifacts import RemoteArtifactStore
    from nds.catalog.datasets import delete_dataset
    from nds.catalog.indexing import IndexRequest, start_indexing

    store = bucket.uri("artifacts")
    settings = s3_settings(tmp_path, data_root, artifacts_dir=store)
    assert settings.artifacts_uri == store
    ctx = open_ctx(settings)
    assert isinstance(ctx.artifacts, RemoteArtifactStore)
    dataset, job = register(ctx, "pets", str(write_images(data_root / "pets", labels=("a", "b"), n=8)))
    indexing = start_indexing(ctx, dataset.id, IndexRequest(clusters=2, image_size=32, epochs=1, width=8, min_steps=10))
    InlineDispatcher(ctx).submit(indexing)
    with Session(ctx.engine) as session:
        done = get_job(session, indexing.id)
        assert done.status == JobStatus.succeeded, done.error
        experts = session.exec(select(Expert)).all()
    keys = set(bucket.keys("artifacts/"))
    assert experts and {f"artifacts/{e.artifact}" for e in experts} <= keys
    assert "artifacts/backbones/default.json" in keys and any(k.startswith("artifacts/backbones/published/") for k in keys)
    assert not (settings.resolved_home / "artifacts").exists()  # nothing written to a local store
    assert not [k for k in keys if ".tmp" in k]
    for e in experts:
        assert hashlib.sha256(bucket.get(f"artifacts/{e.artifact}")).hexdigest() == e.sha256

    shutil.rmtree(settings.artifacts_path)  # the cache: the route downloads again
    with TestClient(create_app(settings), base_url=LOOPBACK) as api:
        model = api.get(f"/v1/experts/{experts[0].id}/model.onnx")
        assert model.status_code == 200 and hashlib.sha256(model.content).hexdigest() == experts[0].sha256
        query = api.post("/v1/queries", json={"expert_scores": {str(e.id): 0.5 for e in experts}, "budget": 10})
        assert query.status_code in (200, 201), query.text
        qid = query.json()["id"]
        assert api.get(f"/v1/queries/{qid}/manifest", params={"format": "csv"}).status_code == 200
    assert f"artifacts/queries/{qid}.picks" in bucket.keys("artifacts/queries/")

    shutil.rmtree(settings.artifacts_path)
    env = subprocess_env(bucket.server, NDS_HOME=str(settings.home), NDS_ARTIFACTS_DIR=store, NDS_DATA_ROOTS=str(data_root),
                         NDS_DATABASE_URL="", NDS_QDRANT_URL="", NDS_BROKER_URL="")
    done = subprocess.run([sys.executable, "-c", SECOND_PROCESS, qid], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["store"] == "RemoteArtifactStore" and all(seen["digests"].values()) and len(seen["digests"]) == len(experts)
    assert seen["manifest_rows"] > 0

    shutil.rmtree(settings.artifacts_path)  # a re-index with the same inputs finds its experts in the bucket
    again = start_indexing(ctx, dataset.id, IndexRequest(clusters=2, image_size=32, epochs=1, width=8, min_steps=10))
    InlineDispatcher(ctx).submit(again)
    with Session(ctx.engine) as session:
        rerun = get_job(session, again.id)
    assert rerun.status == JobStatus.succeeded and all(c["reused"] for c in rerun.result["clusters"]), rerun.result

    from nds.catalog.transfer import copy_catalog

    shutil.rmtree(settings.artifacts_path, ignore_errors=True)  # `nds db copy-to` lists the bucket, not the cache
    target = load_settings(home=tmp_path / "copy", database_url=None, qdrant_url=None, broker_url=None, data_roots=[data_root])
    upgrade(target)
    with CatalogContext.open(target) as dst:
        report = copy_catalog(ctx, dst)
        copied = {o.key: o.size for o in dst.artifacts.list_objects()}
    in_bucket = {k.removeprefix("artifacts/") for k in bucket.keys("artifacts/")}
    assert in_bucket and set(copied) == in_bucket and report.files == len(in_bucket), (sorted(in_bucket ^ set(copied)), report)
    assert all(copied[f"{e.artifact}"] == len(bucket.get(f"artifacts/{e.artifact}")) for e in experts)

    stray = ctx.artifacts.write_bytes("experts/999/stray.onnx", b"x" * 10)  # no row names it
    assert stray.is_file()
    young = gc(ctx)
    assert young.removed == 0 and young.young >= 1
    old = gc(ctx, now=time.time() + 2 * DEFAULT_GRACE_SECONDS)
    # and the snapshot of version 1 built while it was active: the re-index superseded it (a
    # manifest of an old query builds version 1's snapshot again, at the new active version)
    assert sorted(old.removed_keys) == ["experts/999/stray.onnx", "snapshots/1/v1-a1.arrow"], old.removed_keys
    assert "artifacts/experts/999/stray.onnx" not in bucket.keys("artifacts/")
    assert {f"artifacts/{e.artifact}" for e in experts} <= set(bucket.keys("artifacts/"))  # referenced: kept
    delete_dataset(ctx=ctx, dataset_id=dataset.id)
    assert not [k for k in bucket.keys("artifacts/experts/") if k.startswith(f"artifacts/experts/{dataset.id}/")]
    ctx.close()


def test_remote_artifact_store_unit(bucket, tmp_path):  # noqa: F811
    """The store's interface on a bucket: writes appear whole, reads go through the cache, errors name the key."""
    from nds.catalog.artifacts import RemoteArtifactStore
    from nds_client.errors import ArtifactError, NotFoundError

    store = RemoteArtifactStore(bucket.uri("art"), tmp_path / "cache")
    assert not store.exists("queries/q.picks")
    with pytest.raises(NotFoundError):
        store.open_path("queries/q.picks")
    path = store.write_bytes("queries/q.picks", b"hello")
    assert path == tmp_path / "cache" / "queries" / "q.picks" and path.read_bytes() == b"hello"
    assert bucket.get("art/queries/q.picks") == b"hello" and store.exists("queries/q.picks")

    def failing(p: Path) -> None:
        p.write_bytes(b"half")
        raise RuntimeError("the writer died")

    with pytest.raises(RuntimeError):
        store.write_with("queries/half.picks", failing)
    assert "art/queries/half.picks" not in bucket.keys("art/") and not list((tmp_path / "cache").rglob(".tmp-*"))
    bucket.put("art/queries/q.picks", b"changed elsewhere")  # another machine rewrote it: the cache is not served
    assert store.open_path("queries/q.picks").read_bytes() == b"changed elsewhere"
    store.delete("queries/q.picks")
    assert not store.exists("queries/q.picks") and not path.exists()
    with pytest.raises(ArtifactError, match="escapes"):
        store.path("../outside")
    with pointed_at(f"http://127.0.0.1:{closed_port()}", attempts=FAULT_ATTEMPTS):
        with pytest.raises(StorageUnavailable) as info:
            store.write_bytes("queries/x.picks", b"x")
    assert "queries/x.picks" in str(info.value) and "does not answer" in str(info.value)
    assert bucket.name not in str(info.value) and "127.0.0.1" not in str(info.value)  # the key, not the bucket or the endpoint
    assert os.listdir(tmp_path / "cache" / "queries") == []


def _client_error(code: str, kind: type[OSError] = OSError, *args: object) -> OSError:
    """An OSError raised from botocore's ClientError, as s3fs raises them."""
    from botocore.exceptions import ClientError

    exc = kind(*args) if args else kind(code)
    exc.__cause__ = ClientError({"Error": {"Code": code, "Message": code}}, "GetObject")
    return exc


def test_failures_of_the_store_are_unavailable_not_unreadable():
    """A connection cut, reset or closed, a throttled or failing store, refused tokens and missing
    credentials say the store is unavailable (the job fails, a shard is not skipped as bad);
    a missing object or another error of one file stays a StorageError (that file is skipped)."""
    import errno

    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    from nds_client.errors import StorageError
    from nds_client.storage import translated

    unavailable = {
        "the object store does not answer": [EndpointConnectionError(endpoint_url="http://x"), ConnectionClosedError(endpoint_url="http://x"),
                                             ReadTimeoutError(endpoint_url="http://x"), aiohttp.ServerDisconnectedError(),
                                             aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"), ConnectionResetError()],
        "failing or overloaded": [_client_error("SlowDown", OSError, errno.EBUSY, "reduce"), _client_error("InternalError", OSError, errno.EREMOTEIO, "x")],
        "refused the credentials": [_client_error("InvalidAccessKeyId", PermissionError), _client_error("InvalidToken", OSError, errno.EINVAL, "x"),
                                    _client_error("SignatureDoesNotMatch", PermissionError)],
        "refused access (HTTP 403": [_client_error("AccessDenied", PermissionError), PermissionError("Forbidden")],
        "no credentials": [NoCredentialsError()],
    }
    for needle, errors in unavailable.items():
        for exc in errors:
            with pytest.raises(StorageUnavailable) as info, translated("s3://b/k"):
                raise exc
            assert needle in str(info.value), (exc, str(info.value))
    for exc, needle in ((_client_error("NoSuchKey", FileNotFoundError), "does not exist"), (OSError(errno.EIO, "odd"), "odd")):
        with pytest.raises(StorageError) as caught, translated("s3://b/k"):
            raise exc
        assert needle in str(caught.value) and not isinstance(caught.value, StorageUnavailable)
