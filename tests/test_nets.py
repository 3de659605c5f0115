"""Model code: nets, training, ONNX export and the torch-free runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nds.catalog.model.export import ParityError, check_parity, export_onnx
from nds.catalog.model.nets import NetConfig, build_net
from nds.catalog.model.training import DEFAULT_NORMALIZATION, TrainConfig, embed, rotate_batch, to_tensor, train_classifier, train_rotation
from nds_client.errors import ArtifactError, InvalidInputError
from nds_client.preprocessing import IMAGENET_MEAN, IMAGENET_STD, to_nchw
from nds_client.runtime import active_provider, create_session, read_metadata, run

NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
SMALL = NetConfig(width=8, input_size=32)  # fast enough for training tests on 2 cores


def oriented_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Images with an unmistakable "up": dark top, bright bottom, a blob in the upper left."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        base = 40 + 170 * yy * rng.uniform(0.6, 1.0)
        cy, cx = rng.uniform(0.1, 0.4, 2)
        base = base + 80 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.01)
        img = np.stack([base * rng.uniform(0.7, 1.0) for _ in range(3)], -1) + rng.normal(0, 10, (size, size, 3))
        out[i] = np.clip(img, 0, 255)
    return out


def perturbed_net(config: NetConfig, seed: int = 0) -> torch.nn.Module:
    """A net whose BatchNorm statistics are not the identity, so eval mode matters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net(config)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


# -- nets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [NetConfig(), NetConfig(num_outputs=10, width=8, blocks=(2, 1), input_size=32)])
@pytest.mark.parametrize("batch", [1, 5])
def test_forward_shapes(config: NetConfig, batch: int) -> None:
    net = build_net(config).eval()
    with torch.no_grad():
        logits, features = net(torch.randn(batch, 3, config.input_size, config.input_size))
    assert logits.shape == (batch, config.num_outputs)
    assert features.shape == (batch, config.feature_dim)


def test_config_round_trip() -> None:
    config = NetConfig(width=12, blocks=(2, 1, 1), feature_dim=64, num_outputs=7, input_size=48)
    restored = NetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert isinstance(restored.blocks, tuple)
    assert NetConfig.from_dict({}) == NetConfig()
    with pytest.raises(InvalidInputError):
        NetConfig.from_dict({"width": 16, "depth": 3})
    with pytest.raises(InvalidInputError):
        NetConfig(width=0)
    assert TrainConfig(epochs=3).to_dict()["epochs"] == 3


# -- training -----------------------------------------------------------------------------


def test_rotate_batch() -> None:
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, 0, 3] = 1.0  # image 0: top-right pixel
    x[1, 0, 3, 3] = 1.0  # image 1: bottom-right pixel
    x4, y4 = rotate_batch(x)
    assert x4.shape == (8, 1, 4, 4)
    assert y4.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # image 0 goes top-right -> top-left (90 ccw) -> bottom-left (180) -> bottom-right (270)
    spots = [tuple(int(v) for v in (x4[k * 2, 0] == 1).nonzero()[0]) for k in range(4)]
    assert spots == [(0, 3), (0, 0), (3, 0), (3, 3)]
    for k in range(4):
        assert torch.equal(x4[k * 2 + 1], torch.rot90(x[1], k, dims=(1, 2)))


def test_to_tensor() -> None:
    images = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    images[1] = 0
    x = to_tensor(images, NORM)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((3, 4, 4), 2.0)) and torch.allclose(x[1], torch.full((3, 4, 4), -2.0))
    with pytest.raises(InvalidInputError):
        to_tensor(images.astype(np.float32), NORM)


@pytest.mark.parametrize("normalization", [None, NORM, ((0.1, 0.7, 0.3), (0.9, 0.3, 0.4))])
def test_to_tensor_is_the_client_normalisation(normalization) -> None:
    """Training's on-device normalisation and nds_client.preprocessing.to_nchw (backbones, the
    client) are one formula, with one default (ImageNet's mean and std)."""
    images = np.random.default_rng(7).integers(0, 256, (5, 9, 7, 3), dtype=np.uint8)
    if normalization is None:
        got, expected = to_tensor(images), to_nchw(images)
        assert DEFAULT_NORMALIZATION == (IMAGENET_MEAN, IMAGENET_STD)
    else:
        got, expected = to_tensor(images, normalization), to_nchw(images, *normalization)
    assert expected.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_train_rotation_learns_orientation() -> None:
    images = oriented_images(128)
    seen: list[float] = []
    result = train_rotation(images, SMALL, TrainConfig(epochs=6, batch_size=16), normalization=NORM, progress=seen.append)
    assert result.heldout_accuracy > 0.5, result.history  # chance is 0.25
    assert (result.num_train, result.num_heldout) == (102, 26) and not result.heldout_is_train
    assert len(result.history) == 6 and result.history[-1]["heldout_accuracy"] == result.heldout_accuracy
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    assert not result.model.training and next(result.model.parameters()).device.type == "cpu"


def test_train_rotation_tiny_inputs_and_determinism() -> None:
    images = oriented_images(3, size=16)
    config = replace(SMALL, width=4, input_size=16)
    one = train_rotation(images[:1], config, TrainConfig(epochs=1), normalization=NORM)
    assert one.heldout_is_train and one.num_train == 1 and one.num_heldout == 0
    a = train_rotation(images, config, TrainConfig(epochs=2, seed=3), normalization=NORM)
    b = train_rotation(images, config, TrainConfig(epochs=2, seed=3), normalization=NORM)
    assert a.num_heldout == 1 and a.num_train == 2
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    with pytest.raises(InvalidInputError):
        train_rotation(images, replace(config, num_outputs=3), TrainConfig(epochs=1), normalization=NORM)
    with pytest.raises(InvalidInputError):  # wrong size
        train_rotation(oriented_images(2, size=20), config, TrainConfig(epochs=1), normalization=NORM)


def test_train_classifier_separates_two_classes() -> None:
    rng = np.random.default_rng(1)
    n = 60
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
    images[labels == 0, :, :, 0] += 150  # reddish
    images[labels == 1, :, :, 2] += 150  # bluish
    config = replace(SMALL, num_outputs=2)
    result = train_classifier(images, labels, 2, config, TrainConfig(epochs=4, batch_size=16), normalization=NORM)
    assert result.heldout_accuracy > 0.9, result.history
    assert (result.num_train, result.num_heldout) == (48, 12)  # 6 of each class held out
    with pytest.raises(InvalidInputError):
        train_classifier(images, labels + 1, 2, config, TrainConfig(epochs=1), normalization=NORM)


def test_embed_is_normalised_and_deterministic() -> None:
    net = perturbed_net(SMALL).train()
    images = oriented_images(10)
    a = embed(net, images, NORM, batch_size=4)
    b = embed(net, images, NORM)
    assert a.shape == (10, SMALL.feature_dim) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert net.training  # mode restored
    assert embed(net, images[:0], NORM).shape == (0, SMALL.feature_dim)


# -- ONNX ---------------------------------------------------------------------------------


def test_export_parity_metadata_and_size(tmp_path: Path) -> None:
    config = NetConfig()  # width 16, blocks (1, 1, 1), 64 px, feature_dim 128
    net = perturbed_net(config)
    path = tmp_path / "expert.onnx"
    metadata = {"task": "rotation", "net_config": config.to_dict(), "normalization": NORM, "version": "1"}
    export_onnx(net, config, metadata=metadata, path=path)

    assert os.listdir(tmp_path) == ["expert.onnx"]  # no temp file left
    assert path.stat().st_size < 1_000_000
    assert check_parity(net, path, config.input_size, batch_sizes=(1, 7)) < 1e-4
    stored = read_metadata(path)
    assert stored["task"] == "rotation" and stored["version"] == "1"
    assert NetConfig.from_dict(json.loads(stored["net_config"])) == config
    assert json.loads(stored["normalization"]) == [list(v) for v in NORM]
    assert read_metadata(path.read_bytes()) == stored

    session = create_session(path.read_bytes(), prefer_gpu=True)
    assert active_provider(session) in session.get_providers()
    x = to_tensor(oriented_images(3, size=64), NORM).numpy()
    logits, features = run(session, x)
    assert logits.shape == (3, 4) and features.shape == (3, 128)
    with torch.no_grad():
        expected = net(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


class _ExportOnlyOffset(torch.nn.Module):
    """Differs from its own ONNX export: the parity check must catch it."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.net = build_net(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.net(x)
        if torch.compiler.is_exporting():
            logits = logits + 1.0
        return logits, features


def test_export_failures_leave_no_file(tmp_path: Path) -> None:
    config = NetConfig(width=4, input_size=16)
    with pytest.raises(ParityError) as info:
        export_onnx(_ExportOnlyOffset(config), config, metadata={}, path=tmp_path / "bad.onnx")
    assert info.value.max_abs_diff > 0.5 and isinstance(info.value, ValueError)
    assert os.listdir(tmp_path) == []

    with pytest.raises(ArtifactError):
        export_onnx(build_net(config), config, metadata={}, path=tmp_path / "missing" / "x.onnx")
    assert os.listdir(tmp_path) == []

    if os.geteuid() != 0:  # root ignores directory permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ArtifactError):
            export_onnx(build_net(config), config, metadata={}, path=locked / "x.onnx")
        assert os.listdir(locked) == []


def test_runtime_errors_and_no_torch_import(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    with pytest.raises(ArtifactError):
        create_session(garbage)
    with pytest.raises(ArtifactError):
        read_metadata(garbage)
    code = "import sys, nds_client.runtime; sys.exit(int(any(m in sys.modules for m in ('torch', 'sqlalchemy'))))"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
