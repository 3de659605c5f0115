"""The client SDK and `nds score` against a real `nds serve` process (embedded mode).

One module-scoped server: two visually different datasets (stripes, noise), each
registered and indexed by the `nds` CLI in subprocesses (K=2 rotation experts and a label
classifier each), then `nds serve` on a free loopback port. Every test talks to it over
HTTP through :class:`nds_client.Client` or the `nds score` command.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from nds.api.local_server import LocalServer, free_port
from nds_client import (
    ClientInputError,
    IntegrityError,
    NDSClient,
    NDSClientError,
    Scores,
    ServerError,
    ServerUnreachable,
    TargetError,
)
from nds_client.errors import InvalidInputError, NDSError
from nds_client.images import list_image_files
from nds_client.preprocessing import rotations
from tests.conftest import write_images

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NDS = str(Path(sys.executable).parent / "nds")
PER_LABEL = 30
INDEX_ARGS = ["--clusters", "2", "--epochs", "8", "--image-size", "32", "--width", "8", "--min-steps", "60"]


def write_backbone(path: Path, size: int = 32) -> Path:
    """A tiny fixed ONNX feature extractor (random 3x3 conv, ReLU, global average pool) for
    ``--backbone onnx:<file>``: the embedding only drives k-means here, and this spares the
    default backbone's training (the slowest step of a first index)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).normal(0, 0.5, (16, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "w"], ["conv"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
            helper.make_node("Flatten", ["pool"], ["features"], axis=1),
        ],
        "tiny-backbone",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"input_size": json.dumps(size)})
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    data = root / "data"
    write_images(data / "stripes", n=PER_LABEL, kind="stripes", seed=0)
    write_images(data / "noise", n=PER_LABEL, kind="noise", seed=0)
    backbone = write_backbone(data / "backbone.onnx")
    env = {
        **os.environ, "NDS_HOME": str(root / "home"), "NDS_DATA_ROOTS": str(data), "NDS_DATABASE_URL": "",
        "NDS_BROKER_URL": "", "NDS_QDRANT_URL": "", "COLUMNS": "200",
    }

    def nds(*args: str) -> str:
        done = subprocess.run([NDS, *args], env=env, cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"nds {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    nds("db", "upgrade")
    for name in ("stripes", "noise"):
        nds("datasets", "add", name, str(data / name))
    results = {name: json.loads(nds("index", name, *INDEX_ARGS, "--backbone", f"onnx:{backbone}", "--json")) for name in ("stripes", "noise")}
    with LocalServer(env, root / "serve.log", cwd=root) as serving:
        yield SimpleNamespace(url=serving.url, root=root, data=data, index=results, port=serving.port)


@pytest.fixture(scope="module")
def client(server):
    with NDSClient(server.url, cache_dir=server.root / "cache") as c:
        yield c


@pytest.fixture(scope="module")
def experts(client):
    return client.pull_experts()


@pytest.fixture(scope="module")
def stripes_target(server) -> Path:
    """New stripes images (another seed): a target drawn from the stripes domain."""
    return write_images(server.root / "target-stripes", n=20, kind="stripes", seed=11)


def cli(*args: str, env: dict | None = None):
    from nds.api.cli import app
    from nds_client.cli import register

    register(app)
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **(env or {})}, catch_exceptions=False)


def flat(text: str) -> str:
    return " ".join(text.split())


class Counting(httpx.HTTPTransport):
    """A real transport that records the path of every request."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return super().handle_request(request)

    def downloads(self) -> int:
        return sum(p.endswith("/model.onnx") for p in self.paths)


# --------------------------------------------------------------------------- light import, no pickle


def test_import_is_light():
    code = (
        "import sys, nds_client.client, nds_client.cli\n"
        "heavy = [m for m in ('torch', 'sqlalchemy', 'sqlmodel', 'fastapi', 'celery', 'sklearn') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing the client pulled in {done.stdout.strip()}"


def test_no_pickle_anywhere():
    for name in sorted(str(p.relative_to(REPO)) for p in (REPO / "client" / "nds_client").rglob("*.py")):
        tree = ast.parse((REPO / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not any(m.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib", "shelve") for m in modules), name
            if isinstance(node, ast.keyword):
                assert node.arg != "allow_pickle", name


def test_rotations_match_training():
    torch = pytest.importorskip("torch")
    from nds.catalog.model.training import rotate_batch

    u8 = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    x4, y4 = rotate_batch(torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous())  # NCHW, blocks of k * 90 degrees
    ours = rotations(u8).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ours, x4.numpy())
    assert y4.tolist() == [k for k in range(4) for _ in range(3)]


def test_error_hierarchy():
    assert issubclass(ServerError, NDSClientError) and issubclass(ServerUnreachable, NDSClientError)
    assert issubclass(TargetError, InvalidInputError) and issubclass(TargetError, NDSClientError)
    assert issubclass(NDSClientError, NDSError)
    with pytest.raises(ClientInputError, match="http"):
        NDSClient("localhost:8000")


def test_token_is_sent_as_bearer():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"data": [], "count": 0})

    with NDSClient("http://nds.test", token="s3cret", transport=httpx.MockTransport(handler)) as c:
        assert c.datasets() == []
    with NDSClient("http://nds.test", transport=httpx.MockTransport(handler)) as c:
        c.experts()
    assert seen == ["Bearer s3cret", None]


# --------------------------------------------------------------------------- catalog and downloads


def test_datasets_and_experts(client, server):
    names = {d["name"] for d in client.datasets()}
    assert names == {"stripes", "noise"}
    listed = client.experts()
    assert sorted((e["kind"], e["cluster"]) for e in listed) == sorted([("rotation", 0), ("rotation", 1), ("classifier", None)] * 2)
    assert {e["kind"] for e in client.experts(kind="classifier")} == {"classifier"}
    assert client.expert(listed[0]["id"])["sha256"] == listed[0]["sha256"]


def test_pull_experts_downloads_reuses_and_repairs(server, tmp_path):
    transport = Counting()
    with NDSClient(server.url, cache_dir=tmp_path / "cache", transport=transport) as c:
        first = c.pull_experts()
        assert len(first) == 6 and transport.downloads() == 6 and all(e.downloaded for e in first)
        for e in first:
            assert e.path == tmp_path / "cache" / f"{e.sha256}.onnx"
            assert hashlib.sha256(e.path.read_bytes()).hexdigest() == e.sha256
            assert e.input_size == 32 and len(e.mean) == 3 and e.dataset in ("stripes", "noise")
        assert {tuple(e.label_names) for e in first if e.kind == "classifier"} == {("a", "b")}

        again = c.pull_experts()
        assert transport.downloads() == 6 and not any(e.downloaded for e in again)

        victim = first[0].path
        victim.write_bytes(b"not an onnx file any more")
        repaired = c.pull_experts()
        assert transport.downloads() == 7
        assert [e.downloaded for e in repaired] == [e.id == first[0].id for e in repaired]
        assert hashlib.sha256(victim.read_bytes()).hexdigest() == first[0].sha256
        assert not list((tmp_path / "cache").glob(".*"))  # no temp files left behind


def test_download_that_does_not_match_its_hash_is_refused(server, tmp_path):
    class Corrupting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            if request.url.path.endswith("/model.onnx"):
                response.read()
                return httpx.Response(200, content=b"tampered" + response.content[8:])
            return response

    with NDSClient(server.url, cache_dir=tmp_path / "cache", transport=Corrupting()) as c:
        with pytest.raises(IntegrityError, match="sha256"):
            c.pull_experts(kind="rotation")
    assert not list((tmp_path / "cache").iterdir())


# --------------------------------------------------------------------------- scoring


def test_rotation_ranks_the_source_domain_first(client, experts, stripes_target):
    scores = client.score(stripes_target, method="rotation", experts=experts)
    assert scores.method == "rotation" and scores.num_images == 40 and scores.skipped == 0
    assert len(scores.scores) == 4 and all(0.0 <= s <= 1.0 for s in scores.scores.values())
    ranked = scores.ranked()
    assert ranked[0]["dataset"] == "stripes", ranked
    best = {name: max(e["score"] for e in ranked if e["dataset"] == name) for name in ("stripes", "noise")}
    assert best["stripes"] > best["noise"], best
    for e in ranked:
        assert {"id", "dataset_id", "dataset", "cluster", "sha256", "score", "target_accuracy", "heldout_accuracy"} <= set(e)
        assert len(e["details"]["by_rotation"]) == 4
    assert scores.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert scores.server == client.base_url


def test_embedding_votes_for_the_source_domain_and_backbones_are_published(client, experts, stripes_target, server, tmp_path):
    spaces = client.backbones()
    assert len(spaces) == 1 and spaces[0]["downloadable"] and spaces[0]["version"].startswith("onnx-")
    space = spaces[0]
    assert set(space["datasets"]) == {d["id"] for d in client.datasets()} and space["dim"] == 16 and space["input_size"] == 32
    clusters = client.clusters(space["datasets"][0])
    assert all(len(c["centroid"]) == 16 for c in clusters)
    scores = client.score(stripes_target, method="embedding", experts=experts)
    assert scores.method == "embedding" and scores.num_images == 40 and len(scores.scores) == 4
    assert abs(sum(scores.scores.values()) - 1.0) < 1e-9  # every image votes for one cluster
    stripes = sum(e["score"] for e in scores.experts if e["dataset"] == "stripes")
    assert stripes >= 0.9, scores.ranked()
    assert scores.ranked()[0]["details"]["backbone"] == space["version"]
    cached = server.root / "cache" / f"{space['sha256']}.onnx"
    assert cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == space["sha256"]
    url = f"{server.url}/v1/backbones/{space['version']}/model.onnx"
    assert httpx.get(url, headers={"If-None-Match": f'"{space["sha256"]}"'}).status_code == 304
    assert httpx.get(f"{server.url}/v1/backbones/onnx-000000000000/model.onnx").status_code == 404
    assert httpx.get(f"{server.url}/v1/backbones/..%2F..%2Fcatalog.db/model.onnx").status_code == 404
    # the scores are sent like any others; the selection follows the votes
    query = client.query(scores, budget=50, seed=1)
    assert query["summary"]["datasets"][0]["dataset"] == "stripes"
    assert query["summary"]["recommendation"]["recipe"] in ("linear-probe", "linear-probe-early-layers", "fine-tune")
    out = tmp_path / "scores.json"
    result = cli("score", str(stripes_target), "--server", server.url, "--cache-dir", str(server.root / "cache"),
                 "--method", "embedding", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert Scores.load(out).method == "embedding"


def test_auto_uses_embedding_where_the_backbone_is_published_else_rotation(client, experts, stripes_target, server, tmp_path):
    auto = client.score(stripes_target, experts=experts)  # the default method
    assert auto.method == "embedding"
    assert auto.scores == client.score(stripes_target, method="embedding", experts=experts).scores
    # scoring by embedding downloads the backbone only, not the experts it does not run
    transport = Counting()
    with NDSClient(server.url, cache_dir=tmp_path / "fresh", transport=transport) as fresh:
        assert fresh.score(stripes_target).scores == auto.scores
        assert [p for p in transport.paths if p.endswith("/model.onnx")] == [p for p in transport.paths if p.startswith("/v1/backbones/")]
        assert transport.downloads() == 1 and len(list((tmp_path / "fresh").glob("*.onnx"))) == 1
        assert transport.paths.count("/v1/datasets") == 1  # one listing serves the expert names and their spaces
        with_priors = fresh.score(stripes_target, priors=True)  # the classifiers run: they are fetched
        assert with_priors.method == "embedding" and with_priors.label_priors
        assert transport.downloads() == 1 + 2  # one classifier per dataset
        rotation = fresh.score(stripes_target, method="rotation")
        assert transport.downloads() == 3 + 4 and rotation.method == "rotation"
    # a catalog whose datasets were indexed before backbones were published lists none to download
    sidecars = list((server.root / "home" / "artifacts" / "backbones" / "published").glob("*.json"))
    assert len(sidecars) == 1
    hidden = sidecars[0].with_suffix(".hidden")
    sidecars[0].rename(hidden)
    try:
        assert not any(s["downloadable"] for s in client.backbones())
        fallback = client.score(stripes_target, experts=experts)
        assert fallback.method == "rotation"
        assert fallback.scores == client.score(stripes_target, method="rotation", experts=experts).scores
        with pytest.raises(NDSClientError, match="publishes no backbone"):
            client.score(stripes_target, method="embedding", experts=experts)
    finally:
        hidden.rename(sidecars[0])


def test_folder_list_and_array_give_the_same_scores(client, experts, stripes_target):
    files = list_image_files(stripes_target)
    array = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    by_folder = client.score(stripes_target, experts=experts, batch_size=16)
    by_list = client.score([str(f) for f in files], experts=experts, batch_size=16)
    by_array = client.score(array, experts=experts, batch_size=16)
    assert by_folder.scores == by_list.scores == by_array.scores
    gray = client.score(array[..., 0], experts=experts)  # (N, H, W) grayscale is accepted
    assert gray.num_images == len(files)


def test_linear_probe_with_labels(client, experts, stripes_target):
    scores = client.score(stripes_target, labels="imagefolder", method="linear-probe", experts=experts)
    assert scores.method == "linear-probe" and scores.labels == {"a": 20, "b": 20}
    assert set(scores.scores) == {e.id for e in experts if e.kind == "rotation"}
    assert all(0.0 <= s <= 1.0 for s in scores.scores.values())
    assert all(e["details"]["folds"] == 5 for e in scores.experts)
    files = list_image_files(stripes_target)  # labels as a list, one per image, give the same result
    as_list = client.score(files, labels=[f.parent.name for f in files], method="linear-probe", experts=experts)
    assert as_list.scores == scores.scores
    array = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])  # an array and a numpy label vector
    as_array = client.score(array, labels=np.array([f.parent.name for f in files]), method="linear-probe", experts=experts)
    assert as_array.scores == scores.scores


def _skewed(root: Path, kind: str, major: str, n_major: int, n_minor: int, seed: int) -> Path:
    """A target of ``kind`` images with ``n_major`` of label ``major`` and ``n_minor`` of the other."""
    write_images(root, n=max(n_major, n_minor), kind=kind, seed=seed)
    minor = "b" if major == "a" else "a"
    for label, keep in ((major, n_major), (minor, n_minor)):
        for f in sorted((root / label).iterdir(), key=lambda p: int(p.stem))[keep:]:
            f.unlink()
    return root


def test_label_priors_follow_a_skewed_target(client, experts, server):
    classifiers = [e for e in experts if e.kind == "classifier"]
    assert {e.dataset_id for e in classifiers} == {d["id"] for d in client.datasets()}
    # the dataset whose classifier tells "a" from "b" apart best (both are trained; one is enough)
    best = max(classifiers, key=lambda e: e.heldout_accuracy)
    assert best.heldout_accuracy >= 0.75, [(e.dataset, e.heldout_accuracy) for e in classifiers]
    mostly_a = _skewed(server.root / "skew-a", best.dataset, "a", 27, 3, seed=21)
    mostly_b = _skewed(server.root / "skew-b", best.dataset, "b", 27, 3, seed=22)
    pa = client.label_priors(mostly_a, experts=experts)
    pb = client.label_priors(mostly_b, temperature=2.0, experts=experts)
    assert set(pa) == {e.dataset_id for e in classifiers}
    for dist in (*pa.values(), *pb.values()):
        assert set(dist) == {"a", "b"} and abs(sum(dist.values()) - 1.0) < 1e-9
    assert pa[best.dataset_id]["a"] > pa[best.dataset_id]["b"]
    assert pb[best.dataset_id]["b"] > pb[best.dataset_id]["a"]
    # a higher temperature flattens the estimate
    flat_pa = client.label_priors(mostly_a, temperature=50.0, experts=experts)
    assert abs(flat_pa[best.dataset_id]["a"] - 0.5) < abs(pa[best.dataset_id]["a"] - 0.5)
    # score(priors=True) computes the same in one pass
    both = client.score(mostly_a, experts=experts, priors=True)
    assert both.label_priors == pa and both.temperature == 2.0
    with pytest.raises(ClientInputError, match="temperature"):
        client.label_priors(mostly_a, temperature=0, experts=experts)


def test_scores_are_plain_json(client, experts, stripes_target, tmp_path):
    scores = client.score(stripes_target, experts=experts, priors=True)
    path = scores.save(tmp_path / "scores.json")
    raw = json.loads(path.read_text())  # plain JSON
    assert raw["format"] == "nds.scores/v1" and raw["method"] == "embedding"  # what "auto" chose
    assert set(raw["scores"]) == {str(k) for k in scores.scores}
    loaded = Scores.load(path)
    assert loaded == scores
    assert Scores.from_json(scores.to_json()) == scores
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ClientInputError, match="not an NDS scores file"):
        Scores.load(tmp_path / "bad.json")


# --------------------------------------------------------------------------- bad input (SDK)


def test_empty_folder(client, experts, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TargetError, match="no image files"):
        client.score(tmp_path / "empty", experts=experts)
    with pytest.raises(TargetError, match="empty"):
        client.score([], experts=experts)
    with pytest.raises(TargetError, match="does not exist"):
        client.score(tmp_path / "missing", experts=experts)


def test_unreadable_images_are_skipped_and_counted(client, experts, tmp_path):
    folder = write_images(tmp_path / "t", n=5, kind="stripes", seed=3)
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "b" / "empty.jpg").write_bytes(b"")
    scores = client.score(folder, experts=experts)
    assert (scores.num_images, scores.skipped) == (10, 2)
    assert {Path(s["image"]).name for s in scores.skipped_files} == {"broken.png", "empty.jpg"}

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(TargetError, match="none of the 3 target images could be read"):
        client.score(bad, experts=experts)


def test_linear_probe_needs_two_labels_with_two_images_each(client, experts, tmp_path):
    one_label = write_images(tmp_path / "one", labels=("a",), n=6, kind="stripes")
    with pytest.raises(TargetError) as info:
        client.score(one_label, labels="imagefolder", method="linear-probe", experts=experts)
    assert "at least 2 labels with at least 2 images each" in str(info.value) and "found 1 label" in str(info.value)
    one_each = write_images(tmp_path / "single", labels=("a", "b"), n=1, kind="stripes")
    with pytest.raises(TargetError, match="at least 2 images each.*'a': 1, 'b': 1"):
        client.score(one_each, labels="imagefolder", method="linear-probe", experts=experts)
    with pytest.raises(TargetError, match="needs labels"):
        client.score(one_each, method="linear-probe", experts=experts)
    with pytest.raises(ClientInputError, match="unknown method"):
        client.score(one_each, method="fine-tune", experts=experts)


def test_labels_that_do_not_match_the_images(client, experts, stripes_target, tmp_path):
    files = list_image_files(stripes_target)
    with pytest.raises(TargetError, match="must match one to one"):
        client.score(files, labels=["a"] * (len(files) - 1), method="linear-probe", experts=experts)
    labels = {f: f.parent.name for f in files}
    labels[tmp_path / "elsewhere.png"] = "a"
    with pytest.raises(TargetError, match="not among the target images"):
        client.score(stripes_target, labels=labels, method="linear-probe", experts=experts)
    partial = dict(list(labels.items())[:5])
    with pytest.raises(TargetError, match="have no label"):
        client.score(stripes_target, labels=partial, method="linear-probe", experts=experts)


def test_server_down_names_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with NDSClient(url, cache_dir=tmp_path) as c:
        with pytest.raises(ServerUnreachable) as info:
            c.experts()
    assert url in str(info.value) and info.value.url.startswith(url)
    assert "refused" in info.value.reason.lower() or info.value.reason


def test_server_error_carries_detail(client):
    with pytest.raises(ServerError) as info:
        client.expert(987654)
    err = info.value
    assert err.status_code == 404 and "no expert with id 987654" in err.detail
    assert err.url.endswith("/v1/experts/987654") and "404" in str(err) and err.hint
    with pytest.raises(ServerError) as info:
        client._json("GET", "/v1/experts", params={"limit": 0})  # the server's validation error
    assert info.value.status_code == 422 and info.value.field == "limit"


# --------------------------------------------------------------------------- nds score


def test_cli_score_writes_json_and_prints_a_ranked_table(server, stripes_target, tmp_path):
    out = tmp_path / "scores.json"
    result = cli("score", str(stripes_target), "--server", server.url, "--cache-dir", str(server.root / "cache"),
                 "--priors", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "rank" in result.stdout and "held-out acc." in result.stdout and "label priors for stripes" in result.stdout
    assert "scoring experts" in result.stderr  # the progress bar
    scores = Scores.load(out)
    assert scores.method == "embedding" and scores.num_images == 40 and scores.label_priors
    assert "ranked by embedding (auto) score" in flat(result.stdout)
    top = scores.ranked()[0]
    first_row = next(line for line in result.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    assert str(top["id"]) in first_row and top["dataset"] in first_row


def test_cli_linear_probe_with_labels_csv(server, stripes_target, tmp_path):
    csv_path = tmp_path / "labels.csv"
    rows = ["path,label"] + [f"{f},{f.parent.name}" for f in list_image_files(stripes_target)]
    csv_path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "probe.json"
    result = cli("score", str(stripes_target), "--server", server.url, "--cache-dir", str(server.root / "cache"),
                 "--labels", str(csv_path), "--method", "linear-probe", "-q", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert Scores.load(out).labels == {"a": 20, "b": 20}
    result = cli("score", str(stripes_target), "--server", server.url, "--cache-dir", str(server.root / "cache"),
                 "--imagefolder", "--method", "linear-probe", "-q", "-o", str(out))
    assert result.exit_code == 0, result.output


def test_cli_bad_input(server, tmp_path):
    cache = str(server.root / "cache")
    common = ["--server", server.url, "--cache-dir", cache, "-q", "-o", str(tmp_path / "s.json")]
    (tmp_path / "empty").mkdir()
    result = cli("score", str(tmp_path / "empty"), *common)
    assert result.exit_code == 1 and "no image files" in flat(result.stderr)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    result = cli("score", str(bad), *common)
    assert result.exit_code == 1 and "could be read" in flat(result.stderr)

    one = write_images(tmp_path / "one", labels=("a",), n=4, kind="stripes")
    result = cli("score", str(one), "--imagefolder", "--method", "linear-probe", *common)
    assert result.exit_code == 1 and "at least 2 labels with at least 2 images each" in flat(result.stderr)

    result = cli("score", str(one), "--method", "linear-probe", *common)
    assert result.exit_code == 1 and "needs labels" in flat(result.stderr)

    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\none/a/0.png,a\nnot-there.png,b\n")
    result = cli("score", str(one), "--labels", str(csv_path), "--method", "linear-probe", *common)
    assert result.exit_code == 1 and "not among the target images" in flat(result.stderr)

    (tmp_path / "nocols.csv").write_text("file,class\nx.png,a\n")
    result = cli("score", str(one), "--labels", str(tmp_path / "nocols.csv"), *common)
    assert result.exit_code == 1 and "'path' and 'label'" in flat(result.stderr)

    down = f"http://127.0.0.1:{free_port()}"
    result = cli("score", str(one), "--server", down, "--cache-dir", cache, "-q", "-o", str(tmp_path / "s.json"))
    assert result.exit_code == 1 and down in result.stderr
    assert "cannot reach the server" in flat(result.stderr)

    wrong = f"{server.url}/not-nds"  # a server that answers, with an error
    result = cli("score", str(one), "--server", wrong, "--cache-dir", cache, "-q", "-o", str(tmp_path / "s.json"))
    assert result.exit_code == 1 and f"{wrong}/v1/" in result.stderr and "404" in result.stderr
    assert not (tmp_path / "s.json").exists()


def test_register_is_idempotent():
    from nds.api.cli import app
    from nds_client.cli import register

    register(app)
    register(app)
    assert sum(1 for c in app.registered_commands if c.name == "score") == 1


# --------------------------------------------------------------------------- retrieval wrappers


def test_query_and_manifest_wrappers_send_the_agreed_shapes(tmp_path):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            return httpx.Response(201, json={"id": "q1", "budget": 10})
        return httpx.Response(200, content=b"uri,label\n/a.png,a\n")

    scores = Scores(method="rotation", num_images=3, skipped=0, scores={4: 0.5, 7: 0.25}, experts=[],
                    label_priors={1: {"a": 0.9, "b": 0.1}})
    with NDSClient("http://nds.test", transport=httpx.MockTransport(handler)) as c:
        answer = c.query(scores, budget=10, replacement=False, temperature=0.1, datasets=[1], seed=3)
        path = c.manifest("q1", tmp_path / "m.csv")
        with pytest.raises(ClientInputError, match="format"):
            c.manifest("q1", tmp_path / "m.txt")
    assert answer["id"] == "q1"
    body = json.loads(seen[0].content)
    assert body == {"expert_scores": {"4": 0.5, "7": 0.25}, "label_priors": {"1": {"a": 0.9, "b": 0.1}}, "budget": 10,
                    "replacement": False, "temperature": 0.1, "datasets": [1], "seed": 3,
                    "target_size": 3, "score_method": "rotation"}
    assert seen[0].url.path == "/v1/queries"
    assert seen[1].url.path == "/v1/queries/q1/manifest" and seen[1].url.params["format"] == "csv"
    assert path.read_text() == "uri,label\n/a.png,a\n"


def test_query_against_the_server(client, experts, stripes_target, tmp_path):
    paths = client._json("GET", "/openapi.json")["paths"]
    if "/v1/queries" not in paths:
        pytest.skip("the retrieval endpoints (POST /v1/queries) are not in this server yet")
    scores = client.score(stripes_target, experts=experts, priors=True)
    answer = client.query(scores, budget=20, seed=1)
    assert answer["id"] and answer["request"]["expert_scores"], answer
    path = client.manifest(answer["id"], tmp_path / "m.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert sum(r["count"] for r in rows) == 20  # with replacement: one row per sample, with its count
    # temperature 0.01 (the original's): the budget goes to the domain whose experts scored best
    sharp = client.query(scores.scores, budget=50, temperature=0.01, seed=1)
    rows = [json.loads(line) for line in client.manifest(sharp["id"], tmp_path / "sharp.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in rows} == {"stripes"}, rows[:3]
    csv_text = client.manifest(answer["id"], tmp_path / "m.csv").read_text()
    assert csv_text.splitlines()[0].startswith("key,uri") or "uri" in csv_text.splitlines()[0]
    with pytest.raises(ServerError) as info:
        client.manifest("no-such-query", tmp_path / "x.csv")
    assert info.value.status_code == 404 and not (tmp_path / "x.csv").exists()
