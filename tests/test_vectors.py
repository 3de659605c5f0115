"""The vector store: one suite run against both backends, plus the Edge store's multi-process guarantees.

The server backend runs over ``QdrantClient(location=":memory:")`` (qdrant-client's local mode,
which speaks the server's API); the Edge backend over Qdrant Edge in ``tmp_path``.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from nds.catalog.settings import load_settings
from nds.catalog.vectors import (
    EdgeVectorStore,
    QdrantServerStore,
    VectorHit,
    VectorStore,
    open_vector_store,
)
from nds_client.errors import (
    InvalidInputError,
    NotFoundError,
    ServiceUnavailableError,
    VectorStoreBusyError,
    VectorStoreError,
)

# qdrant-client's local mode keeps no payload indexes and says so; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")

REPO = Path(__file__).resolve().parents[1]
DIM = 8


@pytest.fixture(params=["edge", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    if request.param == "edge":
        backend: VectorStore = EdgeVectorStore(tmp_path / "vectors")
    else:
        backend = QdrantServerStore(":memory:", client=QdrantClient(location=":memory:"))
    with backend:
        yield backend


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def fill(store: VectorStore, name: str = "emb", *, n: int = 30, datasets: int = 3, seed: int = 0, start: int = 0) -> np.ndarray:
    """``n`` random points with ids start.., dataset_id = id % datasets; returns the vectors."""
    store.ensure_collection(name, DIM)
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    ids = list(range(start, start + n))
    store.upsert(name, ids, vectors, [{"dataset_id": i % datasets, "label": f"l{i % 2}"} for i in ids])
    return vectors


# ---------------------------------------------------------------------------
# The shared suite: same calls, same answers, same errors on both backends
# ---------------------------------------------------------------------------


def test_ensure_collection_is_idempotent_and_refuses_another_dim(store: VectorStore) -> None:
    assert not store.has_collection("emb")
    store.ensure_collection("emb", DIM)
    store.ensure_collection("emb", DIM)
    assert store.has_collection("emb")
    assert store.list_collections() == ["emb"]
    with pytest.raises(VectorStoreError, match=r"exists with dim 8, not 16"):
        store.ensure_collection("emb", 16)
    with pytest.raises(InvalidInputError) as info:
        store.ensure_collection("../escape", DIM)
    assert info.value.field == "name"
    with pytest.raises(InvalidInputError):
        store.ensure_collection("other", 0)


def test_upsert_counts_all_and_by_dataset(store: VectorStore) -> None:
    if isinstance(store, (EdgeVectorStore, QdrantServerStore)):
        store.batch_size = 7  # several internal batches
    vectors = fill(store, n=30, datasets=3)
    assert store.count("emb") == 30
    assert [store.count("emb", dataset_id=d) for d in range(4)] == [10, 10, 10, 0]
    store.upsert("emb", [0, 1], vectors[:2] * 2, [{"dataset_id": 5}, {"dataset_id": 5}])  # replaces
    assert store.count("emb") == 30
    assert store.count("emb", dataset_id=5) == 2
    store.upsert("emb", [], np.zeros((0, DIM), np.float32), [])
    assert store.count("emb") == 30


def test_search_returns_nearest_with_cosine_score_and_filters_datasets(store: VectorStore) -> None:
    vectors = fill(store, n=30, datasets=3)
    query = vectors[4] * 3.0  # same direction, other length
    hits = store.search("emb", query, 5)
    assert len(hits) == 5 and all(isinstance(h, VectorHit) for h in hits)
    assert hits[0].id == 4
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    expected = unit(vectors) @ unit(query)
    assert [h.id for h in hits] == list(np.argsort(-expected)[:5])
    assert [h.score for h in hits] == pytest.approx(list(np.sort(expected)[::-1][:5]), abs=1e-5)
    assert hits[0].payload == {"dataset_id": 1, "label": "l0", "cluster_id": None}

    restricted = store.search("emb", query, 30, dataset_ids=[0, 2])
    assert len(restricted) == 20
    assert {h.payload["dataset_id"] for h in restricted} == {0, 2}
    assert 4 not in {h.id for h in restricted}
    assert store.search("emb", query, 3, dataset_ids=[]) == []
    with pytest.raises(InvalidInputError) as info:
        store.search("emb", query, 0)
    assert info.value.field == "k"


def test_fetch_vectors_in_order_of_ids_and_missing_id(store: VectorStore) -> None:
    vectors = fill(store, n=10)
    got = store.fetch_vectors("emb", [7, 2, 7, 0])
    assert got.dtype == np.float32 and got.shape == (4, DIM)
    np.testing.assert_allclose(got, unit(vectors[[7, 2, 7, 0]]), atol=1e-5)  # cosine stores unit vectors
    assert store.fetch_vectors("emb", []).shape == (0, DIM)
    with pytest.raises(NotFoundError, match=r"not in vector collection 'emb': 42"):
        store.fetch_vectors("emb", [1, 42])


def test_delete_dataset_removes_only_that_dataset_from_every_collection(store: VectorStore) -> None:
    fill(store, "a", n=30, datasets=3)
    store.ensure_collection("b", 4)
    store.upsert("b", [100, 101, 102], np.eye(4, dtype=np.float32)[:3], [{"dataset_id": 1}, {"dataset_id": 2}, {"dataset_id": 1}])
    assert store.delete_dataset(1) == 10 + 2
    assert store.count("a", dataset_id=1) == 0 and store.count("b", dataset_id=1) == 0
    assert store.count("a") == 20 and store.count("b") == 1
    assert store.delete_dataset(1) == 0
    assert store.delete_dataset(77) == 0


@pytest.mark.parametrize(
    ("vectors", "field"),
    [
        (np.full((2, DIM), np.nan, np.float32), "vectors"),
        (np.array([[np.inf] + [0.0] * (DIM - 1), [1.0] * DIM], np.float32), "vectors"),
        (np.ones((2, DIM + 1), np.float32), "vectors"),
        (np.ones((3, DIM), np.float32), "vectors"),
        (np.zeros((2, DIM), np.float32), "vectors"),
        (np.ones(DIM, np.float32), "vectors"),
    ],
    ids=["nan", "inf", "wrong-dim", "wrong-count", "zero-rows", "1d"],
)
def test_bad_vectors_are_invalid_input(store: VectorStore, vectors: np.ndarray, field: str) -> None:
    store.ensure_collection("emb", DIM)
    with pytest.raises(InvalidInputError) as info:
        store.upsert("emb", [1, 2], vectors, [{"dataset_id": 1}, {"dataset_id": 1}])
    assert info.value.field == field
    assert store.count("emb") == 0


def test_bad_query_ids_and_payloads_are_invalid_input(store: VectorStore) -> None:
    fill(store, n=4)
    for query in (np.ones(DIM + 1), np.full(DIM, np.nan), np.zeros(DIM)):
        with pytest.raises(InvalidInputError) as info:
            store.search("emb", query, 3)
        assert info.value.field == "vector"
    good = np.ones((1, DIM), np.float32)
    for ids, payloads, field in (
        ([-1], [{"dataset_id": 1}], "ids"),
        ([1.5], [{"dataset_id": 1}], "ids"),
        ([1], [{"label": "x"}], "payloads"),
        ([1], [{"dataset_id": 1, "label": 3}], "payloads"),
        ([1], [], "payloads"),
    ):
        with pytest.raises(InvalidInputError) as info:
            store.upsert("emb", ids, good if ids else good[:0], payloads)
        assert info.value.field == field


def test_unknown_collection_is_not_found_everywhere(store: VectorStore) -> None:
    calls = [
        lambda: store.upsert("nope", [1], np.ones((1, DIM), np.float32), [{"dataset_id": 1}]),
        lambda: store.search("nope", np.ones(DIM), 3),
        lambda: store.count("nope"),
        lambda: store.fetch_vectors("nope", [1]),
    ]
    for call in calls:
        with pytest.raises(NotFoundError, match="vector collection 'nope' does not exist"):
            call()
    store.delete_collection("nope")  # deleting what is not there does nothing
    assert store.delete_dataset(1) == 0


def test_delete_collection_and_close(store: VectorStore) -> None:
    fill(store, "a")
    fill(store, "b")
    store.delete_collection("a")
    assert store.list_collections() == ["b"] and not store.has_collection("a")
    with pytest.raises(NotFoundError):
        store.count("a")
    store.ensure_collection("a", 3)  # a new one, any dim
    assert store.count("a") == 0
    store.close()
    with pytest.raises(VectorStoreError, match="closed"):
        store.count("b")


# ---------------------------------------------------------------------------
# Factory and error translation
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection:UserWarning")
def test_open_vector_store_picks_the_backend_from_settings(tmp_path: Path) -> None:
    with open_vector_store(load_settings(home=tmp_path, qdrant_url=None)) as embedded:
        assert isinstance(embedded, EdgeVectorStore)
        assert embedded.path == tmp_path.resolve() / "vectors"
    with open_vector_store(load_settings(home=tmp_path, qdrant_url="http://127.0.0.1:1", qdrant_api_key="k")) as remote:
        assert isinstance(remote, QdrantServerStore)  # no connection made yet


def test_unreachable_server_is_service_unavailable() -> None:
    with QdrantServerStore("http://127.0.0.1:1", timeout=2) as remote:
        with pytest.raises(ServiceUnavailableError, match="cannot be reached") as info:
            remote.list_collections()
        assert info.value.__cause__ is not None


def test_edge_engine_failure_becomes_vector_store_error(tmp_path: Path) -> None:
    store = EdgeVectorStore(tmp_path / "vectors")
    fill(store, n=3)
    (tmp_path / "vectors" / "emb" / "edge_config.json").write_text("not json")  # a damaged shard
    with pytest.raises(VectorStoreError, match="cannot count vector collection 'emb'") as info:
        store.count("emb")
    assert not isinstance(info.value, NotFoundError)
    assert info.value.__cause__ is not None


def test_edge_waits_for_the_lock_then_reports_busy(tmp_path: Path) -> None:
    store = EdgeVectorStore(tmp_path / "vectors", lock_timeout=0.3)
    fill(store, n=3)
    fd = os.open(tmp_path / "vectors" / ".locks" / "emb.lock", os.O_RDWR)  # as another nds process would
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(VectorStoreBusyError) as info:
            store.count("emb")
        assert str(tmp_path / "vectors") in str(info.value)
        assert "NDS_QDRANT_URL" in str(info.value)
    finally:
        os.close(fd)
    assert store.count("emb") == 3


def test_edge_session_keeps_the_collection_open(tmp_path: Path) -> None:
    store = EdgeVectorStore(tmp_path / "vectors")
    vectors = fill(store, n=10)
    with store.session("emb"):
        assert store.search("emb", vectors[3], 1)[0].id == 3
        store.upsert("emb", [3], vectors[3:4], [{"dataset_id": 9}])
        assert store.count("emb") == 10
        with pytest.raises(VectorStoreError, match="inside its own session"):
            store.delete_collection("emb")
    assert store.search("emb", vectors[3], 1)[0].payload["dataset_id"] == 9


# ---------------------------------------------------------------------------
# Edge store shared by two OS processes (API server + worker)
# ---------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from pathlib import Path
    from nds.catalog.vectors import EdgeVectorStore

    path, action, start, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = EdgeVectorStore(Path(path))
    if action == "read":
        hits = store.search("emb", np.ones(8, np.float32), 3)
        print(json.dumps({"count": store.count("emb"), "top": hits[0].id}))
    else:
        rng = np.random.default_rng(start)
        for r in range(rounds):
            ids = list(range(start + 10 * r, start + 10 * r + 10))
            store.upsert("emb", ids, rng.standard_normal((10, 8)).astype(np.float32), [{"dataset_id": start} for _ in ids])
            store.count("emb")
        print(json.dumps({"count": store.count("emb", dataset_id=start)}))
    """
)


def run_child(path: Path, action: str, start: int = 0, rounds: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), action, str(start), str(rounds)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_edge_data_written_by_one_process_is_read_by_another(tmp_path: Path) -> None:
    path = tmp_path / "vectors"
    store = EdgeVectorStore(path)
    store.ensure_collection("emb", DIM)
    vectors = np.eye(DIM, dtype=np.float32) + 0.01
    vectors[5] = 1.0  # the point nearest to the all-ones query
    store.upsert("emb", range(DIM), vectors, [{"dataset_id": 1}] * DIM)
    assert result(run_child(path, "read")) == {"count": DIM, "top": 5}
    assert result(run_child(path, "write", start=1000, rounds=2)) == {"count": 20}
    assert store.count("emb") == DIM + 20  # and back: this process sees the other's writes


def test_edge_two_processes_writing_to_one_directory_both_succeed(tmp_path: Path) -> None:
    path = tmp_path / "vectors"
    store = EdgeVectorStore(path)
    store.ensure_collection("emb", DIM)
    first, second = run_child(path, "write", start=1000, rounds=15), run_child(path, "write", start=5000, rounds=15)
    store.upsert("emb", [1], np.ones((1, DIM), np.float32), [{"dataset_id": 7}])  # this process too, meanwhile
    assert result(first) == {"count": 150}
    assert result(second) == {"count": 150}
    assert store.count("emb") == 301
