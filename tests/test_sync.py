"""Datasets that grow: ``nds datasets sync`` and POST /v1/datasets/{id}/sync on a real catalog.

Image folders (and WebDataset shards, where that source is installed) gain and lose files;
the sync registers and removes their samples, places the new ones in the clusters of the
active index without retraining, keeps ranks dense and stored queries honest, and changes
nothing when nothing changed or the source is gone.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func
from sqlmodel import Session, select

from nds.catalog import access
from nds.catalog.db import session_scope
from nds.catalog.indexing import IndexRequest, start_indexing
from nds.catalog.jobs import InlineDispatcher, create_job, get_job
from nds.catalog.registration import RegistrationRequest, open_source, start_registration, store_items
from nds.catalog.retrieval.manifest import iter_manifest
from nds.catalog.retrieval.queries import run_query
from nds.catalog.retrieval.request import QueryRequest
from nds.catalog.retrieval.search import search
from nds.catalog.sync import drop_uncommitted_samples, start_sync
from nds.catalog.tables import Assignment, Cluster, Dataset, DatasetStatus, Expert, Group, Job, JobStatus, Sample
from nds.catalog.vectors import collection_name
from nds_client.errors import ConflictError, GoneError, SourceError
from tests.conftest import LOOPBACK, wait_job, write_images

pytestmark = pytest.mark.slow  # indexes (trains small networks)

SMALL = dict(image_size=32, epochs=1, width=8, min_steps=10)
WEBDATASET = Path(__file__).resolve().parents[1] / "plugins" / "sources" / "webdataset.py"


# --------------------------------------------------------------------------- helpers


def add_images(folder: Path, label: str, start: int, count: int, *, seed: int = 1) -> list[Path]:
    """FOLDER/<label>/new-<i>.png for i in [start, start + count): distinct noisy images."""
    rng = np.random.default_rng(seed + start)
    (folder / label).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        x = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        path = folder / label / f"new-{i}.png"
        Image.fromarray(x).save(path)
        paths.append(path)
    return paths


def register(ctx, name: str, path: Path | str, source: str = "imagefolder") -> int:
    dataset, job = start_registration(ctx, RegistrationRequest(name=name, path=str(path), source=source))
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        done = get_job(session, job.id)
    assert done.status == JobStatus.succeeded, done.error
    return dataset.id


def index(ctx, dataset_id: int, **kwargs) -> Job:
    job = start_indexing(ctx, dataset_id, IndexRequest(**{**SMALL, "clusters": 2, **kwargs}))
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        done = get_job(session, job.id)
    assert done.status == JobStatus.succeeded, done.error
    return done


def sync(ctx, dataset_id: int) -> Job:
    job = start_sync(ctx, dataset_id)
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        return get_job(session, job.id)


def dataset(ctx, dataset_id: int) -> Dataset:
    with Session(ctx.engine) as session:
        return session.get(Dataset, dataset_id)


def sample_uris(ctx, dataset_id: int) -> dict[int, str]:
    with Session(ctx.engine) as session:
        return dict(session.exec(select(Sample.id, Sample.uri).where(Sample.dataset_id == dataset_id)).all())


def manifest(ctx, query) -> list:
    return [row for chunk in iter_manifest(ctx, query) for row in chunk]


def everything(ctx, dataset_id: int):
    """A query whose manifest holds every placed sample once (priors over every label, no repeats)."""
    labels = dataset(ctx, dataset_id).labels
    return run_query(ctx, QueryRequest(label_priors={dataset_id: {lab: 1 / len(labels) for lab in labels}}, budget=100_000, replacement=False))


def check_version(ctx, dataset_id: int, version: int) -> dict[tuple[int, str | None], int]:
    """Ranks are 0..n-1 in every group, group sizes count the assignments, cluster sizes sum
    their groups; returns the group sizes."""
    with Session(ctx.engine) as session:
        rows = session.exec(select(Assignment.cluster, Assignment.label, Assignment.rank)
                            .where(Assignment.dataset_id == dataset_id, Assignment.index_version == version)).all()
        groups = {(g.cluster, g.label): g.size for g in session.exec(
            select(Group).where(Group.dataset_id == dataset_id, Group.index_version == version)).all()}
        clusters = {c.cluster: c.size for c in session.exec(
            select(Cluster).where(Cluster.dataset_id == dataset_id, Cluster.index_version == version)).all()}
    ranks: dict[tuple[int, str | None], list[int]] = {}
    for c, lab, r in rows:
        ranks.setdefault((c, lab), []).append(r)
    assert {k: sorted(v) for k, v in ranks.items()} == {k: list(range(n)) for k, n in groups.items()}
    for c, size in clusters.items():
        assert size == sum(n for (gc, _), n in groups.items() if gc == c)
    return groups


def snapshot(ctx, dataset_id: int) -> dict:
    """Every catalog row of the dataset and its vector count."""
    with Session(ctx.engine) as session:
        ds = session.get(Dataset, dataset_id)
        data = {
            "dataset": ds.model_dump(),
            "samples": sorted(tuple(s.model_dump().items()) for s in session.exec(select(Sample).where(Sample.dataset_id == dataset_id)).all()),
            "assignments": sorted(session.exec(select(Assignment.sample_id, Assignment.index_version, Assignment.cluster, Assignment.label,
                                                      Assignment.rank).where(Assignment.dataset_id == dataset_id)).all()),
            "groups": sorted(session.exec(select(Group.id, Group.index_version, Group.cluster, Group.label, Group.size)
                                          .where(Group.dataset_id == dataset_id)).all()),
            "clusters": sorted(session.exec(select(Cluster.id, Cluster.index_version, Cluster.size).where(Cluster.dataset_id == dataset_id)).all()),
            "experts": sorted(session.exec(select(Expert.id, Expert.index_version, Expert.sha256).where(Expert.dataset_id == dataset_id)).all()),
        }
    data["points"] = ctx.vectors.count(collection_name(ds.backbone), dataset_id=dataset_id) if ds.backbone else None
    return data


@pytest.fixture
def indexed(ctx, data_root):
    """An indexed image folder: labels a and b, 8 images each, K=2."""
    folder = write_images(data_root / "src", labels=("a", "b"), n=8)
    dataset_id = register(ctx, "grows", folder)
    index(ctx, dataset_id)
    return dataset_id, folder


# --------------------------------------------------------------------------- growth


def test_added_files_are_registered_placed_and_queried(ctx, indexed):
    dataset_id, folder = indexed
    before = everything(ctx, dataset_id)
    before_rows = [(r.key, r.cluster) for r in manifest(ctx, before)]
    with Session(ctx.engine) as session:
        experts = sorted(session.exec(select(Expert.id, Expert.sha256).where(Expert.dataset_id == dataset_id)).all())
    added = add_images(folder, "a", 0, 4) + add_images(folder, "c", 0, 3)

    job = sync(ctx, dataset_id)
    assert job.status == JobStatus.succeeded, job.error
    result = job.result
    assert (result["added"], result["removed"], result["changed"]) == (7, 0, True)
    assert (result["index_version"], result["previous_index_version"], result["placed"]) == (2, 1, 7)
    assert result["parts"] == {"now": 23, "registered": 16, "new": 7, "vanished": 0, "unchanged": 16}
    assert result["skipped_parts"] == [] and result["skipped"] == 0
    new, old = result["distance"]["new"], result["distance"]["indexed"]
    assert new["n"] == 7 and old["n"] == 16 and 0 <= new["mean"] <= 2 and new["p90"] >= 0
    assert isinstance(result["reindex"]["advised"], bool) and "re-index" in result["reindex"]["reason"]

    ds = dataset(ctx, dataset_id)
    assert (ds.status, ds.index_version, ds.num_samples, ds.labels, ds.num_labels) == (DatasetStatus.indexed, 2, 23, ["a", "b", "c"], 3)
    groups = check_version(ctx, dataset_id, 2)
    assert sum(groups.values()) == 23 and sum(n for (_, lab), n in groups.items() if lab == "c") == 3
    with Session(ctx.engine) as session:
        # the same experts (ids, files), now of version 2; version 1 is kept for the queries made on it
        assert sorted(session.exec(select(Expert.id, Expert.sha256).where(Expert.dataset_id == dataset_id)).all()) == experts
        assert set(session.exec(select(Expert.index_version).where(Expert.dataset_id == dataset_id)).all()) == {2}
        assert set(session.exec(select(Group.index_version).where(Group.dataset_id == dataset_id)).all()) == {1, 2}
    assert ctx.vectors.count(collection_name(ds.backbone), dataset_id=dataset_id) == 23
    check_version(ctx, dataset_id, 1)

    # a new query sees the new samples at once; the one made before still reads what it picked
    uris = sample_uris(ctx, dataset_id)
    rows = manifest(ctx, everything(ctx, dataset_id))
    assert sorted(int(r.key.split("/")[1]) for r in rows) == sorted(uris)
    assert {str(p.resolve()) for p in added} <= {r.uri for r in rows}
    only_c = manifest(ctx, run_query(ctx, QueryRequest(label_priors={dataset_id: {"c": 1.0}}, budget=50, replacement=False)))
    assert sorted(r.uri for r in only_c) == sorted(str(p.resolve()) for p in added[4:])
    assert [(r.key, r.cluster) for r in manifest(ctx, before)] == before_rows
    # scores made on the experts before the sync still work (same expert ids)
    scored = run_query(ctx, QueryRequest(expert_scores={e: 0.5 for e, _ in experts if e}, budget=10))
    assert len(manifest(ctx, scored)) > 0
    # the new points are searchable and carry their cluster of version 2
    new_id = next(i for i, u in uris.items() if u == str(added[0].resolve()))
    vector = ctx.vectors.fetch_vectors(collection_name(ds.backbone), [new_id])[0]
    hits = search(ctx, vectors=[vector.tolist()], k=23)["results"][0]
    exact = {h["sample_id"]: h for h in hits if h["score"] > 0.999}  # similar images tie
    with Session(ctx.engine) as session:
        cluster = session.exec(select(Assignment.cluster).where(Assignment.sample_id == new_id, Assignment.index_version == 2)).one()
    assert new_id in exact and exact[new_id]["cluster"] == cluster


def test_removed_files_go_ranks_stay_dense_and_manifests_never_name_them(ctx, indexed):
    dataset_id, folder = indexed
    before = everything(ctx, dataset_id)
    picked_before = {r.key for r in manifest(ctx, before)}
    gone = [folder / "a" / "0.png", folder / "a" / "3.png", folder / "b" / "5.png"]
    gone_uris = {str(p.resolve()) for p in gone}
    uris = sample_uris(ctx, dataset_id)
    gone_ids = {i for i, u in uris.items() if u in gone_uris}
    for path in gone:
        path.unlink()

    job = sync(ctx, dataset_id)
    assert job.status == JobStatus.succeeded, job.error
    assert (job.result["added"], job.result["removed"], job.result["index_version"]) == (0, 3, 2)
    assert sorted(job.result["vanished_parts"]) == sorted(gone_uris)
    assert job.result["parts"]["vanished"] == 3
    ds = dataset(ctx, dataset_id)
    assert ds.num_samples == 13
    groups = check_version(ctx, dataset_id, 2)
    assert sum(groups.values()) == 13
    with Session(ctx.engine) as session:
        assert not session.exec(select(Sample.id).where(Sample.dataset_id == dataset_id, Sample.id.in_(gone_ids))).all()
        assert not session.exec(select(Assignment.sample_id).where(Assignment.sample_id.in_(gone_ids))).all()
    space = collection_name(ds.backbone)
    assert ctx.vectors.count(space, dataset_id=dataset_id) == 13

    gone_keys = {f"grows/{i}" for i in gone_ids}
    # the query made before the sync: its samples less the removed ones, never another sample
    assert {r.key for r in manifest(ctx, before)} == picked_before - gone_keys
    rows = manifest(ctx, everything(ctx, dataset_id))
    assert {r.key for r in rows} == picked_before - gone_keys and not {r.uri for r in rows} & gone_uris
    # another change drops version 1: the query made two changes ago is gone, never wrong
    add_images(folder, "a", 0, 2)
    assert sync(ctx, dataset_id).result["index_version"] == 3
    with pytest.raises(GoneError):
        manifest(ctx, before)
    check_version(ctx, dataset_id, 3)


def test_added_and_removed_in_one_sync_and_a_label_partition(ctx, data_root):
    folder = write_images(data_root / "src", labels=("a", "b"), n=8)
    dataset_id = register(ctx, "labelled", folder)
    index(ctx, dataset_id, partition="labels")
    with Session(ctx.engine) as session:
        cluster_of = {c.label: c.cluster for c in session.exec(select(Cluster).where(Cluster.dataset_id == dataset_id)).all()}
    added = add_images(folder, "a", 0, 5)  # noise, unlike the striped a's: placed by label all the same
    for i in range(8):
        (folder / "b" / f"{i}.png").unlink()  # every b goes: its group and cluster empty
    job = sync(ctx, dataset_id)
    assert job.status == JobStatus.succeeded, job.error
    assert (job.result["added"], job.result["removed"]) == (5, 8)
    groups = check_version(ctx, dataset_id, 2)
    assert groups == {(cluster_of["a"], "a"): 13}
    with Session(ctx.engine) as session:
        sizes = {c.cluster: c.size for c in session.exec(select(Cluster).where(Cluster.dataset_id == dataset_id, Cluster.index_version == 2)).all()}
        placed = session.exec(select(Assignment.cluster).join(Sample, Sample.id == Assignment.sample_id)
                              .where(Assignment.index_version == 2, Sample.uri.in_([str(p.resolve()) for p in added]))).all()
    assert sizes == {cluster_of["a"]: 13, cluster_of["b"]: 0} and set(placed) == {cluster_of["a"]}
    assert dataset(ctx, dataset_id).labels == ["a"]
    rows = manifest(ctx, run_query(ctx, QueryRequest(label_priors={dataset_id: {"a": 1.0}}, budget=100, replacement=False)))
    assert len(rows) == 13


def test_nothing_changed_changes_nothing(ctx, indexed):
    dataset_id, folder = indexed
    before = snapshot(ctx, dataset_id)
    job = sync(ctx, dataset_id)
    assert job.status == JobStatus.succeeded, job.error
    result = job.result
    assert (result["changed"], result["added"], result["removed"], result["index_version"]) == (False, 0, 0, 1)
    assert result["previous_index_version"] is None and result["parts"]["unchanged"] == 16
    assert snapshot(ctx, dataset_id) == before
    # after a change, the next sync again finds nothing to do
    add_images(folder, "b", 0, 2)
    assert sync(ctx, dataset_id).result["added"] == 2
    after = snapshot(ctx, dataset_id)
    again = sync(ctx, dataset_id)
    assert (again.result["changed"], again.result["added"], again.result["index_version"]) == (False, 0, 2)
    assert snapshot(ctx, dataset_id) == after


def test_a_file_that_is_not_an_image_is_reported_at_every_sync_and_stores_nothing(ctx, indexed):
    dataset_id, folder = indexed
    (folder / "a" / "notes.png").write_bytes(b"not an image")
    before = snapshot(ctx, dataset_id)
    for _ in range(2):
        job = sync(ctx, dataset_id)
        assert job.status == JobStatus.succeeded, job.error
        assert (job.result["changed"], job.result["added"], job.result["skipped"]) == (False, 0, 1)
        assert job.result["skipped_reasons"] == {"not an image": 1}
        assert snapshot(ctx, dataset_id) == before


def test_not_indexed_dataset_just_registers_and_removes(ctx, data_root):
    folder = write_images(data_root / "plain", labels=("a", "b"), n=4)
    dataset_id = register(ctx, "plain", folder)
    add_images(folder, "b", 0, 3)
    (folder / "a" / "1.png").unlink()
    job = sync(ctx, dataset_id)
    assert job.status == JobStatus.succeeded, job.error
    result = job.result
    assert (result["added"], result["removed"], result["index_version"], result["distance"]) == (3, 1, 0, None)
    assert result["reindex"]["advised"] is False and "not indexed" in result["reindex"]["reason"]
    ds = dataset(ctx, dataset_id)
    assert (ds.status, ds.num_samples, ds.labels, ds.index_version) == (DatasetStatus.ready, 10, ["a", "b"], 0)
    with Session(ctx.engine) as session:
        positions = session.exec(select(Sample.position).where(Sample.dataset_id == dataset_id).order_by(Sample.position)).all()
    assert len(set(positions)) == 10 and min(positions[-3:]) == 8  # the new ones after every registered one
    index(ctx, dataset_id)  # and it indexes as any dataset
    assert sum(check_version(ctx, dataset_id, 1).values()) == 10


# --------------------------------------------------------------------------- refusals and failures


def test_vanished_source_is_an_error_and_the_dataset_is_kept(ctx, indexed, data_root):
    dataset_id, folder = indexed
    before = snapshot(ctx, dataset_id)
    moved = data_root / "elsewhere"
    folder.rename(moved)
    with pytest.raises(SourceError, match="is gone") as err:
        start_sync(ctx, dataset_id)
    assert "nothing changed" in err.value.message and err.value.field == "path"
    assert snapshot(ctx, dataset_id) == before
    # a folder that lists nothing any more is gone too (never: remove every sample)
    folder.mkdir()
    with pytest.raises(SourceError, match="lists no files"):
        start_sync(ctx, dataset_id)
    assert snapshot(ctx, dataset_id) == before
    # gone between the request and the job: the job fails with the reason, nothing changed
    folder.rmdir()
    moved.rename(folder)
    job = start_sync(ctx, dataset_id)
    shutil.rmtree(folder)
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        failed = get_job(session, job.id)
    assert failed.status == JobStatus.failed and "is gone" in failed.error and "nothing changed" in failed.error
    assert snapshot(ctx, dataset_id) == before


def test_a_sync_that_fails_after_storing_leaves_the_dataset_as_it_was(ctx, indexed):
    """The default backbone is replaced (its pointer deleted: the next load trains another
    version): the new samples cannot be placed in the old space; everything stored is undone."""
    dataset_id, folder = indexed
    before = snapshot(ctx, dataset_id)
    add_images(folder, "a", 0, 3)
    ctx.artifacts.delete("backbones/default.json")
    job = sync(ctx, dataset_id)
    assert job.status == JobStatus.failed and "not" in job.error and "re-index" in job.error
    assert snapshot(ctx, dataset_id) == before


def test_what_a_dead_sync_stored_is_removed_by_the_next(ctx, indexed):
    """A sync whose process died after storing samples (rows past num_samples, no assignment)."""
    dataset_id, folder = indexed
    before = snapshot(ctx, dataset_id)
    add_images(folder, "b", 0, 2)
    source = open_source(ctx, "imagefolder", str(folder))
    new = [p for p in source.parts() if "new-" in p]
    store_items(ctx, dataset_id, source.items(new), first_position=100, total_parts=len(new))  # what the dead sync stored
    assert drop_uncommitted_samples(ctx, dataset_id) == 2
    assert snapshot(ctx, dataset_id) == before
    store_items(ctx, dataset_id, source.items(new), first_position=100, total_parts=len(new))
    job = sync(ctx, dataset_id)  # cleans up first, then registers them once
    assert job.status == JobStatus.succeeded, job.error
    assert (job.result["added"], dataset(ctx, dataset_id).num_samples) == (2, 18)
    assert sum(check_version(ctx, dataset_id, 2).values()) == 18


def test_start_up_after_a_dead_sync_undoes_it(ctx, indexed):
    """The embedded server starts after its process died in a sync: the job is marked failed
    and its kind's undo runs (the stored rows dropped, the dataset 'indexed' again)."""
    from nds.catalog.jobs import mark_interrupted

    dataset_id, folder = indexed
    before = snapshot(ctx, dataset_id)
    add_images(folder, "b", 0, 2)
    source = open_source(ctx, "imagefolder", str(folder))
    new = [p for p in source.parts() if "new-" in p]
    with session_scope(ctx.engine) as session:
        session.get(Dataset, dataset_id).status = DatasetStatus.indexing
        job = create_job(session, kind="sync", dataset_id=dataset_id)
        job.status, job.owner = JobStatus.running, None  # a process that left no record counts as dead
    store_items(ctx, dataset_id, source.items(new), first_position=100, total_parts=len(new))
    assert [j.id for j in mark_interrupted(ctx, reason="interrupted")] == [job.id]
    assert snapshot(ctx, dataset_id) == before
    assert dataset(ctx, dataset_id).status == DatasetStatus.indexed


def test_busy_datasets_are_409(ctx, data_root):
    folder = write_images(data_root / "busy", labels=("a", "b"), n=4)
    dataset_id = register(ctx, "busy", folder)
    start_indexing(ctx, dataset_id, IndexRequest(**SMALL, clusters=2))  # claimed, not run
    with pytest.raises(ConflictError, match="being indexed or synced"):
        start_sync(ctx, dataset_id)
    with session_scope(ctx.engine) as session:
        session.get(Dataset, dataset_id).status = DatasetStatus.ready
    job = start_sync(ctx, dataset_id)  # claimed by a sync: a second sync, an index or a delete must wait
    with pytest.raises(ConflictError):
        start_sync(ctx, dataset_id)
    with pytest.raises(ConflictError):
        start_indexing(ctx, dataset_id, IndexRequest(**SMALL, clusters=2))
    InlineDispatcher(ctx).submit(job)
    assert dataset(ctx, dataset_id).status == DatasetStatus.ready


# --------------------------------------------------------------------------- REST and CLI


def test_rest_sync_is_admin_only_and_answers_202_with_the_job(settings, ctx, data_root):
    from nds.api.app import create_app

    folder = write_images(data_root / "rest", labels=("a", "b"), n=4)
    dataset_id = register(ctx, "rest", folder)
    with session_scope(ctx.engine) as session:
        admin = access.create_key(session=session, name="admin", role="admin")[1]
        client = access.create_key(session=session, name="alice", role="client")[1]
    ctx.close()  # the app opens its own context
    add_images(folder, "a", 0, 2)
    with TestClient(create_app(settings), base_url=LOOPBACK) as api:
        refused = api.post(f"/v1/datasets/{dataset_id}/sync", headers={"Authorization": f"Bearer {client}"})
        assert refused.status_code == 403 and refused.json()["hint"] == "this needs an admin key"
        assert api.post(f"/v1/datasets/{dataset_id}/sync").status_code == 401
        assert api.post("/v1/datasets/999999/sync", headers={"Authorization": f"Bearer {admin}"}).status_code == 404
        answer = api.post(f"/v1/datasets/{dataset_id}/sync", headers={"Authorization": f"Bearer {admin}"})
        assert answer.status_code == 202
        body = answer.json()
        assert body["kind"] == "sync" and body["dataset_id"] == dataset_id
        api.headers["Authorization"] = f"Bearer {admin}"
        done = wait_job(api, body["id"])
        assert done["status"] == "succeeded", done["error"]
        assert (done["result"]["added"], done["result"]["removed"]) == (2, 0)
        assert api.get(f"/v1/datasets/{dataset_id}").json()["num_samples"] == 10
        shutil.rmtree(folder)
        gone = api.post(f"/v1/datasets/{dataset_id}/sync")
        assert gone.status_code == 422 and "is gone" in gone.json()["detail"] and gone.json()["field"] == "path"
        assert api.get(f"/v1/datasets/{dataset_id}").json()["status"] == "ready"


def test_rest_sync_of_a_busy_dataset_is_409(settings, ctx, data_root):
    from nds.api.app import create_app
    from nds.catalog.context import CatalogContext

    dataset_id = register(ctx, "busy", write_images(data_root / "busy", labels=("a",), n=2))
    ctx.close()
    with TestClient(create_app(settings), base_url=LOOPBACK) as api, CatalogContext.open(settings) as other:
        # (set once the app started: at start-up it removes a registration no live job runs)
        for status, says in ((DatasetStatus.registering, "still being registered"), (DatasetStatus.indexing, "being indexed or synced")):
            with session_scope(other.engine) as session:
                session.get(Dataset, dataset_id).status = status
            answer = api.post(f"/v1/datasets/{dataset_id}/sync")
            assert answer.status_code == 409 and says in answer.json()["detail"]
        with session_scope(other.engine) as session:
            session.get(Dataset, dataset_id).status = DatasetStatus.ready
        assert api.post(f"/v1/datasets/{dataset_id}/sync").status_code == 202


def test_cli_sync_prints_the_summary(nds, data_root):
    folder = write_images(data_root / "cli", labels=("a", "b"), n=6)
    assert nds("db", "upgrade").exit_code == 0
    added = nds("datasets", "add", "cli", str(folder))
    assert added.exit_code == 0, added.output
    assert nds("index", "cli", "--clusters", "2", "--epochs", "1", "--image-size", "32", "--width", "8", "--min-steps", "10").exit_code == 0
    add_images(folder, "a", 0, 3)
    (folder / "b" / "2.png").unlink()
    shown = nds("datasets", "sync", "cli")
    assert shown.exit_code == 0, shown.output
    text = " ".join(re.sub("[\u2500-\u257f|]", " ", shown.output).split())  # the table's borders out
    for expected in ("synced cli", "added 3", "removed 1", "samples now 14", "index version 2 (was 1)", "distance to centroid, new",
                     "distance to centroid, indexed", "removed part"):
        assert expected in text, (expected, shown.output)
    assert "re-index advised" in text or "no re-index needed" in text
    again = nds("datasets", "sync", "cli", "--json")
    assert again.exit_code == 0
    data = json.loads(again.stdout)
    assert (data["changed"], data["added"], data["removed"], data["index_version"]) == (False, 0, 0, 2) and data["job_id"]
    shutil.rmtree(folder)
    gone = nds("datasets", "sync", "cli")
    assert gone.exit_code == 1 and "is gone" in " ".join(gone.output.split())


# --------------------------------------------------------------------------- shards


@pytest.mark.skipif(not WEBDATASET.exists(), reason="the webdataset source plugin is not there")
def test_webdataset_shards_added_and_removed(ctx, data_root):
    from tests.collections_data import write_shards

    shards = data_root / "shards"
    write_shards(shards, 3, 10)
    dataset_id = register(ctx, "shards", shards, source="webdataset")
    assert dataset(ctx, dataset_id).num_samples == 30
    more = data_root / "more"
    write_shards(more, 5, 10, truncate_last=True)
    shutil.copy(more / "00003.tar", shards / "00003.tar")
    shutil.copy(more / "00004.tar", shards / "00004.tar")  # truncated: skipped, stores nothing
    (shards / "00000.tar").unlink()
    job = sync(ctx, dataset_id)
    assert job.status == JobStatus.succeeded, job.error
    result = job.result
    assert (result["added"], result["removed"]) == (10, 10)
    assert [p["part"] for p in result["skipped_parts"]] == [str((shards / "00004.tar").resolve())]
    assert result["parts"] == {"now": 4, "registered": 3, "new": 2, "vanished": 1, "unchanged": 2}
    with Session(ctx.engine) as session:
        found = sorted(set(session.exec(select(Sample.shard).where(Sample.dataset_id == dataset_id)).all()))
        count = session.exec(select(func.count()).select_from(Sample).where(Sample.dataset_id == dataset_id)).one()
    assert found == [str((shards / f"0000{i}.tar").resolve()) for i in (1, 2, 3)] and count == 30
    # the truncated shard is tried again at every sync, and reported again; nothing else changes
    again = sync(ctx, dataset_id).result
    assert (again["changed"], again["added"], len(again["skipped_parts"])) == (False, 0, 1)
