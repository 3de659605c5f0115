"""``default``: a small CNN trained once, self-supervised, on a sample of the registered sources.

Needs no downloads. The first index job that asks for it trains a narrow ResNet to
predict image rotation on up to 2,000 images drawn from every registered dataset,
exports it to ONNX and records it in ``backbones/default.json`` in the artifact store;
every later job loads that same version, so all datasets share one embedding space.
Delete the pointer file (and re-index) to train a new version.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np

from nds.plugins.contract import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneEnv, PluginError, normalize_rows, sha256_file, to_nchw
from nds_client.runtime import create_session, run

POINTER = "backbones/default.json"
INPUT_SIZE = 64
TRAIN_IMAGES = 2000
TRAIN_EPOCHS = 6


class RotNetBackbone(Backbone):
    def __init__(self, path: Path, meta: dict) -> None:
        self.path = self.onnx_path = path
        self.meta = meta
        self.version = meta["version"]
        self.dim = int(meta["dim"])
        self.input_size = int(meta["input_size"])
        self.mean = tuple(meta["mean"])
        self.std = tuple(meta["std"])
        self.session = create_session(path)

    def embed(self, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        out = np.zeros((len(images), self.dim), np.float32)
        for start in range(0, len(images), batch_size):
            _, features = run(self.session, to_nchw(images[start : start + batch_size], self.mean, self.std))
            out[start : start + batch_size] = features
        return normalize_rows(out)

    def describe(self) -> dict:
        return {**super().describe(), "trained_on": self.meta.get("trained_on"), "heldout_rotation_accuracy": self.meta.get("heldout_accuracy")}


def load(arg: str | None, env: BackboneEnv) -> Backbone:
    """Load the default backbone, training it first if this catalog has none yet."""
    if arg:
        raise PluginError(f"the default backbone takes no argument, got {arg!r}")
    lock_path = env.artifacts.path("backbones/.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock:  # one process trains; the others wait and load its result
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not env.artifacts.exists(POINTER):
                _train(env)
            meta = json.loads(env.artifacts.open_path(POINTER).read_text())
            return RotNetBackbone(env.artifacts.open_path(meta["artifact"]), meta)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _train(env: BackboneEnv) -> None:
    from nds.catalog.model.export import export_onnx
    from nds.catalog.model.nets import NetConfig
    from nds.catalog.model.training import TrainConfig, train_rotation

    if env.training_images is None:
        raise PluginError("the default backbone needs registered images to train on")
    images = env.training_images(TRAIN_IMAGES, INPUT_SIZE)
    if len(images) < 2:
        raise PluginError("the default backbone needs at least 2 registered images to train on")
    net = NetConfig(width=16, blocks=(1, 1, 1), feature_dim=128, num_outputs=4, input_size=INPUT_SIZE)
    train = TrainConfig(epochs=TRAIN_EPOCHS, seed=0)
    result = train_rotation(images, net, train, normalization=(IMAGENET_MEAN, IMAGENET_STD), progress=env.progress)
    tmp_key = f"backbones/rotnet-training-{os.getpid()}.onnx"
    tmp_path = env.artifacts.path(tmp_key)
    meta = {
        "task": "embedding",
        "input_size": INPUT_SIZE,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "dim": net.feature_dim,
        "net_config": net.to_dict(),
        "training_config": train.to_dict(),
        "trained_on": int(len(images)),
        "heldout_accuracy": round(result.heldout_accuracy, 4),
    }
    export_onnx(result.model, net, metadata=meta, path=tmp_path)
    digest = sha256_file(tmp_path)
    key = f"backbones/rotnet-{digest[:16]}.onnx"
    env.artifacts.write_with(key, lambda p: os.replace(tmp_path, p))  # published by the store (rename, or an upload)
    meta.update(version=f"rotnet-{digest[:12]}", artifact=key, sha256=digest)
    env.artifacts.write_bytes(POINTER, json.dumps(meta, indent=2).encode())
