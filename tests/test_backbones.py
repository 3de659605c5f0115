"""The three backbone plugins, for real: torchvision with a local weights file, ONNX files,
and the default rotation net trained once per catalog; then each of them through the
indexing pipeline. No mocks: real torch models, real ONNX exports, real onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sqlmodel import Session, select
from torch import nn

from nds.catalog.artifacts import ArtifactStore
from nds.catalog.indexing import IndexRequest, start_indexing
from nds.catalog.jobs import InlineDispatcher, get_job
from nds.catalog.model.export import export_onnx
from nds.catalog.model.nets import NetConfig, build_net
from nds.catalog.model.training import embed as torch_embed
from nds.catalog.paths import resolve_in_roots
from nds.catalog.registration import RegistrationRequest, start_registration
from nds.catalog.tables import Dataset, DatasetStatus, JobStatus, Sample
from nds.catalog.vectors import collection_name
from nds.plugins.contract import Backbone, BackboneEnv
from nds.plugins.registry import backbone_registry
from nds_client.errors import NDSError, PluginError
from tests.conftest import write_images

pytestmark = pytest.mark.slow  # trains networks or runs processes: not in `make test-fast`

SMALL = dict(image_size=32, epochs=1, width=8)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not ImageNet's: the ONNX metadata must be what is used
NARROW = NetConfig(width=8, blocks=(1, 1, 1), feature_dim=128, num_outputs=4, input_size=32)


def load(spec: str, env: BackboneEnv) -> Backbone:
    """Resolve ``NAME[:ARG]`` through the real plugin registry (the entry points in pyproject)."""
    name, sep, arg = spec.partition(":")
    return backbone_registry().get(name)(arg if sep else None, env)


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def assert_unit_rows(x: np.ndarray, n: int, dim: int) -> None:
    assert x.shape == (n, dim) and x.dtype == np.float32
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def export_plain(model: nn.Module, example: torch.Tensor, path: Path, *, dynamic: dict, metadata: dict[str, str] | None = None) -> None:
    """A generic ONNX model exported with plain torch.onnx.export (no output names)."""
    program = torch.onnx.export(
        model.eval(), (example,), dynamo=True, dynamic_shapes=(dynamic,), external_data=False, verbose=False, report=False
    )
    program.model.metadata_props.update(metadata or {})
    program.save(path, external_data=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    """Model files built once per module; tests copy them into their own data root."""
    folder = tmp_path_factory.mktemp("models")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        import torchvision

        resnet = torchvision.models.get_model("resnet18", weights=None)
        torch.save(resnet.state_dict(), folder / "resnet18.pt")

        narrow = build_net(NARROW)
        narrow.train()
        with torch.no_grad():  # non-trivial BatchNorm running statistics
            narrow(torch.randn(16, 3, 32, 32) * 2 + 0.5)
        narrow.eval()
        export_onnx(narrow, NARROW, metadata={"task": "embedding", "mean": list(MEAN), "std": list(STD), "input_size": 32}, path=folder / "narrow.onnx")

        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        side_h, side_w = torch.export.Dim("h", min=8, max=1024), torch.export.Dim("w", min=8, max=1024)
        tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        export_plain(tiny, torch.randn(2, 3, 40, 40), folder / "tiny-static.onnx", dynamic={0: batch})
        export_plain(tiny, torch.randn(2, 3, 40, 40), folder / "tiny-dynamic.onnx", dynamic={0: batch, 2: side_h, 3: side_w}, metadata={"input_size": "48"})
        gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        export_plain(gray, torch.randn(2, 1, 40, 40), folder / "gray.onnx", dynamic={0: batch})
    return SimpleNamespace(
        folder=folder, resnet_weights=folder / "resnet18.pt", narrow=narrow, narrow_onnx=folder / "narrow.onnx",
        tiny_static=folder / "tiny-static.onnx", tiny_dynamic=folder / "tiny-dynamic.onnx", gray=folder / "gray.onnx",
    )


def put(src: Path, root: Path, name: str | None = None) -> Path:
    dst = root / (name or src.name)
    shutil.copyfile(src, dst)
    return dst


def env_for(tmp_path: Path, data_root: Path, **kwargs) -> BackboneEnv:
    """An env as the catalog makes it: paths in the backbone's argument are checked against the data roots."""
    return BackboneEnv(artifacts=ArtifactStore(tmp_path / "artifacts"),
                       resolve_path=lambda raw: resolve_in_roots(raw, [data_root], field="backbone"), **kwargs)


# --------------------------------------------------------------------------- torchvision


def test_torchvision_with_a_local_weights_file(models, data_root, tmp_path):
    weights = put(models.resnet_weights, data_root)
    backbone = load("torchvision:resnet18", env_for(tmp_path, data_root, weights=weights))
    assert backbone.version == f"torchvision-resnet18-file-{sha12(weights)}"
    assert (backbone.dim, backbone.input_size) == (512, 224)
    assert collection_name(backbone.version) == "emb-" + backbone.version
    images = random_images(3, 224)
    first = backbone.embed(images)
    assert_unit_rows(first, 3, 512)
    np.testing.assert_array_equal(first, backbone.embed(images))  # deterministic (eval mode)
    np.testing.assert_allclose(backbone.embed(images[1:2]), first[1:2], atol=1e-5)  # independent of the batch
    assert not np.allclose(first[0], first[1])
    assert backbone.embed(images[:0]).shape == (0, 512)
    # the same file loaded again is the same embedding space
    again = load("torchvision:resnet18", env_for(tmp_path, data_root, weights=weights))
    assert again.version == backbone.version
    np.testing.assert_allclose(again.embed(images), first, atol=1e-6)


def test_torchvision_bad_requests(models, data_root, tmp_path):
    with pytest.raises(PluginError, match="no model 'resnet1000'"):
        load("torchvision:resnet1000", env_for(tmp_path, data_root))
    with pytest.raises(PluginError, match="name the architecture") as info:
        load("torchvision", env_for(tmp_path, data_root))
    assert "resnet18" in info.value.hint

    garbage = data_root / "garbage.pt"
    garbage.write_bytes(b"these are not weights" * 100)
    with pytest.raises(PluginError, match="cannot load weights for resnet18") as info:
        load("torchvision:resnet18", env_for(tmp_path, data_root, weights=garbage))
    assert "torch.save(model.state_dict(), path)" in info.value.hint

    # a real state dict, but of another architecture
    wrong = data_root / "wrong.pt"
    torch.save(nn.Linear(3, 2).state_dict(), wrong)
    with pytest.raises(PluginError, match="cannot load weights for resnet18"):
        load("torchvision:resnet18", env_for(tmp_path, data_root, weights=wrong))


@pytest.fixture
def network_timeout():
    """torchvision's download has no timeout of its own: bound every socket of this test."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    yield
    socket.setdefaulttimeout(old)


@pytest.mark.timeout(120)
def test_torchvision_without_weights_offline_points_to_weights(tmp_path, data_root, monkeypatch, network_timeout):
    # no cached weights, and a proxy that refuses connections: the download fails quickly
    # even on a machine with internet access (on this one, name resolution fails at once)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    try:
        backbone = load("torchvision:resnet18", env_for(tmp_path, data_root))
    except PluginError as exc:
        assert "cannot fetch the resnet18 weights" in exc.message
        assert "--weights" in exc.hint
    else:  # pragma: no cover - only where the download got through anyway
        assert backbone.dim == 512
        pytest.skip("the weights could be downloaded on this machine: the offline failure was not exercised")


# --------------------------------------------------------------------------- onnx


def test_onnx_feature_extractor_matches_torch(models, data_root, tmp_path):
    path = put(models.narrow_onnx, data_root)
    backbone = load(f"onnx:{path}", env_for(tmp_path, data_root))
    assert backbone.version == f"onnx-{sha12(path)}" and collection_name(backbone.version) == f"emb-onnx-{sha12(path)}"
    assert backbone.input_size == 32  # from the model's input shape
    assert backbone.dim == 128  # the output named "features", not the 4 logits
    assert backbone.mean == pytest.approx(MEAN) and backbone.std == pytest.approx(STD)
    assert backbone.describe()["mean"] == pytest.approx(list(MEAN))
    images = random_images(9, 32, seed=3)
    got = backbone.embed(images, batch_size=4)  # several batches, the last one short
    assert_unit_rows(got, 9, 128)
    expected = torch_embed(models.narrow, images, (MEAN, STD))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_array_equal(got, backbone.embed(images, batch_size=4))
    assert backbone.embed(images[:0]).shape == (0, 128)


def test_onnx_generic_model_with_one_unnamed_output(models, data_root, tmp_path):
    static = load(f"onnx:{put(models.tiny_static, data_root)}", env_for(tmp_path, data_root))
    assert (static.dim, static.input_size) == (4, 40)
    assert static.output_name != "features"
    assert (static.mean, static.std) == (Backbone.mean, Backbone.std)  # no metadata: ImageNet's
    assert_unit_rows(static.embed(random_images(5, 40)), 5, 4)

    # spatial axes dynamic: the size comes from the "input_size" metadata
    dynamic = load(f"onnx:{put(models.tiny_dynamic, data_root)}", env_for(tmp_path, data_root))
    assert (dynamic.dim, dynamic.input_size) == (4, 48)
    assert_unit_rows(dynamic.embed(random_images(3, 48)), 3, 4)
    assert dynamic.version != static.version


def test_onnx_bad_files_are_project_errors(models, data_root, tmp_path):
    env = env_for(tmp_path, data_root)
    with pytest.raises(PluginError, match="name the model file"):
        load("onnx", env)
    with pytest.raises(PluginError, match="name the model file"):
        load("onnx:", env)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(PluginError, match="outside the data roots") as info:
        load(f"onnx:{put(models.narrow_onnx, outside)}", env)
    assert "NDS_DATA_ROOTS" in info.value.hint
    link = data_root / "link.onnx"  # a symlink does not lead out of the roots either
    link.symlink_to(outside / "narrow.onnx")
    with pytest.raises(PluginError, match="outside the data roots"):
        load(f"onnx:{link}", env)
    with pytest.raises(PluginError, match="does not exist"):
        load(f"onnx:{data_root / 'missing.onnx'}", env)

    garbage = data_root / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model at all" * 10)
    truncated = data_root / "truncated.onnx"
    data = models.narrow_onnx.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for bad in (garbage, truncated, models.gray):  # gray: a valid model that does not take RGB images
        bad = bad if bad.parent == data_root else put(bad, data_root)
        with pytest.raises(NDSError) as info:  # never a raw onnx/onnxruntime exception
            load(f"onnx:{bad}", env)
        assert isinstance(info.value, PluginError), (bad, type(info.value))
        assert str(bad) in info.value.message


# --------------------------------------------------------------------------- default (rotnet)


class CountingImages:
    """``training_images`` for a BackboneEnv: a synthetic sample, counting the calls."""

    def __init__(self, n: int = 40) -> None:
        self.n, self.calls, self.lock = n, [], threading.Lock()

    def __call__(self, max_images: int, size: int) -> np.ndarray:
        with self.lock:
            self.calls.append((max_images, size))
        return random_images(min(self.n, max_images), size, seed=7)


@pytest.fixture(scope="module")
def trained_default(tmp_path_factory) -> SimpleNamespace:
    """Two threads load the default backbone at once into a fresh artifact store (module-
    scoped: training takes seconds). The file lock must let exactly one of them train."""
    store = ArtifactStore(tmp_path_factory.mktemp("default") / "artifacts")
    images = CountingImages()
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = load("default", BackboneEnv(artifacts=store, training_images=images))
        except BaseException as exc:  # noqa: BLE001 - reported by the tests
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    return SimpleNamespace(store=store, images=images, results=results, calls_after_first_load=list(images.calls))


def test_default_concurrent_loads_train_once(trained_default):
    store, results = trained_default.store, trained_default.results
    assert all(isinstance(r, Backbone) for r in results), results
    assert trained_default.calls_after_first_load == [(2000, 64)]  # one training, asking for up to 2,000 images at 64 px
    assert results[0].version == results[1].version
    assert len(list((store.root / "backbones").glob("rotnet-*.onnx"))) == 1
    assert not list((store.root / "backbones").glob("rotnet-training-*"))
    assert not list(store.root.rglob(".*.tmp"))


def test_default_writes_its_pointer_and_model(trained_default):
    store, first = trained_default.store, trained_default.results[0]
    assert first.version.startswith("rotnet-") and (first.dim, first.input_size) == (128, 64)
    assert first.describe()["trained_on"] == 40
    pointer = json.loads(store.open_path("backbones/default.json").read_text())
    assert pointer["version"] == first.version and pointer["dim"] == 128 and pointer["trained_on"] == 40
    assert sorted(p.name for p in (store.root / "backbones").glob("rotnet-*.onnx")) == [Path(pointer["artifact"]).name]
    model = store.open_path(pointer["artifact"])
    assert hashlib.sha256(model.read_bytes()).hexdigest() == pointer["sha256"]
    assert first.version == "rotnet-" + pointer["sha256"][:12]
    probe = random_images(5, 64, seed=11)
    vectors = first.embed(probe, batch_size=2)
    assert_unit_rows(vectors, 5, 128)
    assert first.embed(probe[:0]).shape == (0, 128)


def test_default_second_load_does_not_train_again(trained_default):
    store, first, images = trained_default.store, trained_default.results[0], trained_default.images
    onnx_files = sorted((store.root / "backbones").glob("rotnet-*.onnx"))
    calls = len(images.calls)
    second = load("default", BackboneEnv(artifacts=store, training_images=images))
    assert len(images.calls) == calls  # not called: nothing was trained
    assert second.version == first.version
    probe = random_images(5, 64, seed=11)
    np.testing.assert_allclose(second.embed(probe), first.embed(probe), atol=1e-6)
    assert sorted((store.root / "backbones").glob("rotnet-*.onnx")) == onnx_files


def test_default_takes_no_argument_and_needs_images(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    images = CountingImages()
    with pytest.raises(PluginError, match="takes no argument"):
        load("default:anything", BackboneEnv(artifacts=store, training_images=images))
    with pytest.raises(PluginError, match="needs registered images"):
        load("default", BackboneEnv(artifacts=store))
    with pytest.raises(PluginError, match="at least 2"):
        load("default", BackboneEnv(artifacts=store, training_images=CountingImages(n=1)))
    assert images.calls == [] and not store.exists("backbones/default.json")


# --------------------------------------------------------------------------- through indexing


def register(ctx, name: str, folder: Path) -> int:
    dataset, job = start_registration(ctx, RegistrationRequest(name=name, path=str(folder)))
    InlineDispatcher(ctx).submit(job)
    return dataset.id


def index(ctx, dataset_id: int, **kwargs):
    job = start_indexing(ctx, dataset_id, IndexRequest(**{**SMALL, "clusters": 1, **kwargs}))
    InlineDispatcher(ctx).submit(job)
    with Session(ctx.engine) as session:
        return get_job(session, job.id)


def backbone_of(ctx, dataset_id: int) -> str:
    with Session(ctx.engine) as session:
        ds = session.get(Dataset, dataset_id)
        assert ds.status == DatasetStatus.indexed
        return ds.backbone


def test_index_with_onnx_then_default_moves_the_vectors(ctx, data_root, models, trained_default):
    # one label each: no label classifier to train, only one rotation expert per job
    stripes = register(ctx, "stripes", write_images(data_root / "stripes", labels=("a",), n=20, kind="stripes"))
    noise = register(ctx, "noise", write_images(data_root / "noise", labels=("a",), n=20, kind="noise"))
    model = put(models.narrow_onnx, data_root, "encoder.onnx")
    onnx_version = f"onnx-{sha12(model)}"
    onnx_collection = f"emb-{onnx_version}"

    for did in (stripes, noise):
        job = index(ctx, did, backbone=f"onnx:{model}")
        assert job.status == JobStatus.succeeded, job.error
        assert job.result["backbone"]["version"] == onnx_version and job.result["backbone"]["dim"] == 128
        assert backbone_of(ctx, did) == onnx_version
        assert ctx.vectors.count(onnx_collection, dataset_id=did) == 20
    assert not ctx.artifacts.exists("backbones/default.json")  # the onnx backbone trained nothing

    # the default backbone, already trained for this catalog (copied from the module's store;
    # training it through an index job is covered by tests/test_indexing.py): loaded, not retrained
    shutil.copytree(trained_default.store.root / "backbones", ctx.artifacts.root / "backbones", dirs_exist_ok=True)
    job = index(ctx, stripes)
    assert job.status == JobStatus.succeeded, job.error
    default_version = backbone_of(ctx, stripes)
    assert default_version == trained_default.results[0].version == job.result["backbone"]["version"]
    assert ctx.vectors.count(onnx_collection, dataset_id=stripes) == 0  # never a mix of two spaces
    assert ctx.vectors.count(f"emb-{default_version}", dataset_id=stripes) == 20
    # the other dataset keeps its onnx vectors and backbone
    assert backbone_of(ctx, noise) == onnx_version
    assert ctx.vectors.count(onnx_collection, dataset_id=noise) == 20
    assert ctx.vectors.count(f"emb-{default_version}", dataset_id=noise) == 0

    # a model file outside the data roots fails the job with the plugin's message
    outside = data_root.parent / "outside"
    outside.mkdir()
    job = index(ctx, noise, backbone=f"onnx:{put(models.narrow_onnx, outside)}")
    assert job.status == JobStatus.failed and "outside the data roots" in job.error
    assert backbone_of(ctx, noise) == onnx_version


def test_index_with_torchvision_and_local_weights(ctx, data_root, models):
    did = register(ctx, "stripes", write_images(data_root / "stripes", labels=("a",), n=12, kind="stripes"))
    weights = put(models.resnet_weights, data_root)
    job = index(ctx, did, backbone="torchvision:resnet18", weights=str(weights))
    assert job.status == JobStatus.succeeded, job.error
    version = f"torchvision-resnet18-file-{sha12(weights)}"
    assert job.result["backbone"]["version"] == version and job.result["backbone"]["dim"] == 512
    assert backbone_of(ctx, did) == version
    collection = f"emb-{version}"
    assert ctx.vectors.count(collection, dataset_id=did) == 12
    with Session(ctx.engine) as session:
        sample_ids = list(session.exec(select(Sample.id).where(Sample.dataset_id == did).order_by(Sample.position).limit(3)).all())
    vectors = ctx.vectors.fetch_vectors(collection, sample_ids)
    assert_unit_rows(vectors, 3, 512)
