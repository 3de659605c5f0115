"""Deployment: the compose stack's file, the image recipe, .env.example, and moving an
embedded catalog into server mode (`nds db copy-to`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
from sqlalchemy import func, select
from sqlmodel import Session, SQLModel

from nds.catalog import access
from nds.catalog.context import CatalogContext
from nds.catalog.db import session_scope, upgrade
from nds.catalog.retrieval.manifest import iter_manifest
from nds.catalog.retrieval.queries import run_query
from nds.catalog.retrieval.request import QueryRequest
from nds.catalog.settings import Settings, load_settings
from nds.catalog.tables import Sample
from nds.samples.synthetic import add_files_and_vectors, add_indexed_dataset
from tests.server_mode import reset_database

ROOT = Path(__file__).resolve().parents[1]
NDS_SERVICES = ("migrate", "api", "worker-cpu", "worker-gpu")


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither 'docker compose' nor docker-compose is installed: run 'bash tests/services.sh install'")


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    """`docker compose config` of docker-compose.yml with .env.example as the .env (its two required values set)."""
    work = tmp_path_factory.mktemp("compose")
    shutil.copy(ROOT / "docker-compose.yml", work / "docker-compose.yml")
    env = (ROOT / ".env.example").read_text()
    env = env.replace("POSTGRES_PASSWORD=change-me", "POSTGRES_PASSWORD=s3cret").replace("NDS_ADMIN_KEY=\n", "NDS_ADMIN_KEY=" + "k" * 40 + "\n")
    (work / ".env").write_text(env)
    done = subprocess.run([*compose_command(), "config"], cwd=work, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_compose_stack(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "qdrant", *NDS_SERVICES}
    for name in ("postgres", "redis", "qdrant", "api"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert any("/var/lib/postgresql/data" in str(v) for v in services["postgres"]["volumes"])
    assert any("/qdrant/storage" in str(v) for v in services["qdrant"]["volumes"])
    assert services["migrate"]["command"] == ["nds", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker-cpu", "worker-gpu"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == deps["qdrant"]["condition"] == "service_healthy", name
    api = services["api"]["command"]
    assert api[:2] == ["nds", "serve"] and int(api[api.index("--workers") + 1]) > 1
    gpu = services["worker-gpu"]
    assert gpu["command"][-2:] == ["--concurrency", "1"] and "gpu" in gpu["command"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in NDS_SERVICES:  # one image, the same services and one shared artifacts volume
        env = services[name]["environment"]
        assert env["NDS_DATABASE_URL"].startswith("postgresql+psycopg://nds:s3cret@postgres")
        assert env["NDS_QDRANT_URL"] == "http://qdrant:6333" and env["NDS_BROKER_URL"].startswith("redis://redis")
        assert any(str(v).endswith("/var/lib/nds/artifacts") or "artifacts" in str(v) for v in services[name]["volumes"])
        assert services[name]["image"] == services["api"]["image"]
    assert len(env["NDS_ADMIN_KEY"]) >= 32  # the API binds 0.0.0.0: keys are required


def test_env_example_lists_every_setting():
    text = (ROOT / ".env.example").read_text()
    missing = [f"NDS_{name.upper()}" for name in Settings.model_fields if f"NDS_{name.upper()}=" not in text]
    assert not missing, f".env.example lacks {missing}"


def test_the_wheel_lists_every_sub_package():
    """The package-dir mapping lists packages by hand: a new sub-package folder must be added."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    for package, folder in setuptools["package-dir"].items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in parts:
                assert ".".join((package, *parts)) in listed, f"{path.parent} is not in [tool.setuptools] packages"


def test_dockerfile_installs_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for name in [*folders, "client"]:
        assert re.search(rf"^COPY {name} \./{name}$", dockerfile, re.M), f"the image does not copy {name}/"
    assert re.search(r"^COPY [^\n]*\bconstraints\.txt\b", dockerfile, re.M), "the image does not copy constraints.txt"
    assert "pip install -c constraints.txt ./client ." in dockerfile and "USER nds" in dockerfile


def test_every_install_uses_the_pins():
    """pip cannot resolve the dependency ranges from scratch in reasonable depth (boto3,
    botocore and aiobotocore): every install the project runs takes constraints.txt."""
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "--upgrade pip" not in line and not line.startswith("#")]
    assert installs and all("-c constraints" in line or "--no-deps" in line for line in installs), installs
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    for name in ("boto3", "botocore", "aiobotocore", "s3fs", "fsspec"):
        assert name in pins, f"{name} is not pinned"


# --------------------------------------------------------------------------- copy-to


def build_source(settings: Settings) -> dict:
    """An embedded catalog with two indexed datasets, their vectors and expert files, a key,
    a restricted dataset and a stored query."""
    upgrade(settings)
    with CatalogContext.open(settings) as ctx:
        a = add_indexed_dataset(ctx, "alpha", clusters=2, labels=["x", "y"], samples_per_group=4)
        b = add_indexed_dataset(ctx, "beta", clusters=3, labels=["x"], samples_per_group=5)
        points = add_files_and_vectors(ctx)
        with session_scope(ctx.engine) as session:
            access.create_key(session=session, name="team", role="client")
            access.set_access(session=session, dataset_id=b.dataset_id, restricted=True, keys=["team"])
        scores = {e: 0.3 + 0.1 * c for ds in (a, b) for c, e in ds.expert_ids.items()}
        query = run_query(ctx, QueryRequest(expert_scores=scores, budget=20, seed=4))
        manifest = [r for chunk in iter_manifest(ctx, query) for r in chunk]
        with ctx.engine.connect() as conn:
            counts = {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in SQLModel.metadata.sorted_tables}
    return {"scores": scores, "query": query.id, "manifest": manifest, "counts": counts, "points": points}


@pytest.mark.server
def test_copy_to_postgresql_keeps_everything(services, tmp_path, nds, settings):
    source = build_source(settings)
    reset_database(services.migrations_database_url)
    target_home = tmp_path / "target"
    args = ["db", "copy-to", "--database-url", services.migrations_database_url, "--home", str(target_home),
            "--artifacts-dir", str(target_home / "artifacts"), "--json"]
    done = nds(*args)
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["rows"]["datasets"] == 2 and report["points"] == {"emb-synthetic": source["points"]}
    assert report["files"] == source["counts"]["experts"] + 1 + 2  # + the query's picks file and the snapshots of the two index versions

    target = load_settings(home=target_home, database_url=services.migrations_database_url, artifacts_dir=target_home / "artifacts",
                           qdrant_url=None, broker_url=None, data_roots=settings.data_roots)
    with CatalogContext.open(target) as ctx:
        with ctx.engine.connect() as conn:
            counts = {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in SQLModel.metadata.sorted_tables}
        assert counts == source["counts"]
        assert ctx.vectors.count("emb-synthetic") == source["points"]
        # the stored query exports the same manifest there, and a new query with the same seed matches it
        from nds.catalog.tables import Query

        with Session(ctx.engine) as session:
            stored = session.get(Query, source["query"])
        assert [r for chunk in iter_manifest(ctx, stored) for r in chunk] == source["manifest"]
        again = run_query(ctx, QueryRequest(expert_scores=source["scores"], budget=20, seed=4))
        assert [r for chunk in iter_manifest(ctx, again) for r in chunk] == source["manifest"]
        with session_scope(ctx.engine) as session:  # sequences moved past the copied ids
            key, _ = access.create_key(session=session, name="after-copy", role="admin")
            assert key.id == source["counts"]["api_keys"] + 1
        with Session(ctx.engine) as session:
            assert access.find_key(session=session, ref="team").role.value == "client"
    # a second copy into the now non-empty catalog is refused and changes nothing
    again = nds(*args)
    assert again.exit_code == 1 and "not empty" in again.output
    assert nds("db", "copy-to", "--database-url", services.migrations_database_url, "--artifacts-dir", str(tmp_path)).exit_code == 1


def test_copy_vectors_into_a_qdrant_server_store(settings, tmp_path):
    from qdrant_client import QdrantClient

    from nds.catalog.vectors import QdrantServerStore

    source = build_source(settings)
    target = load_settings(home=tmp_path / "t", database_url=None, qdrant_url=None, broker_url=None, data_roots=settings.data_roots)
    upgrade(target)
    class RecordingClient(QdrantClient):  # qdrant-client's local mode ignores sharding: record what we ask for
        created: dict = {}

        def create_collection(self, collection_name, **kwargs):  # noqa: ANN001, ANN003, ANN201
            RecordingClient.created[collection_name] = kwargs
            return super().create_collection(collection_name, **kwargs)

    store = QdrantServerStore("http://qdrant.invalid:6333", client=RecordingClient(location=":memory:"), shard_number=2, replication_factor=3)
    from nds.catalog.transfer import copy_catalog

    with CatalogContext.open(settings) as src, CatalogContext(target, vectors=store) as dst:
        report = copy_catalog(src, dst)
        assert report.points == {"emb-synthetic": source["points"]}
        with Session(src.engine) as session:
            ids = session.exec(select(Sample.id).order_by(Sample.id)).scalars().all()
        assert np.allclose(src.vectors.fetch_vectors("emb-synthetic", ids), store.fetch_vectors("emb-synthetic", ids), atol=1e-6)
        created = RecordingClient.created["emb-synthetic"]
        assert (created["shard_number"], created["replication_factor"]) == (2, 3)


def test_qdrant_sharding_comes_from_the_settings(tmp_path):
    from nds.catalog.vectors import QdrantServerStore, open_vector_store

    settings = load_settings(home=tmp_path, qdrant_url="http://127.0.0.1:1", qdrant_shards=6, qdrant_replication_factor=2, data_roots=[tmp_path])
    store = open_vector_store(settings)  # no connection is made until the first call
    try:
        assert isinstance(store, QdrantServerStore) and (store.shard_number, store.replication_factor) == (6, 2)
    finally:
        store.close()
