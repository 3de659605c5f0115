"""What an embedding backbone is.

A backbone embeds uint8 images ``(N, S, S, 3)`` at its ``input_size`` into L2-normalised
float32 vectors ``(N, dim)``. Its ``version`` names its embedding space: one version is one
vector collection, and changing the backbone of a dataset re-embeds it there.

A backbone plugin is a callable ``load(arg, env) -> Backbone`` registered under the
``nds.backbones`` entry-point group; ``--backbone NAME[:ARG]`` picks it (``default``,
``torchvision:resnet18``, ``onnx:/models/encoder.onnx``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nds.catalog.artifacts import ArtifactStore
from nds.catalog.vectors import collection_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneEnv:
    """What a backbone may use while loading."""

    artifacts: ArtifactStore
    data_roots: Sequence[Path] = ()
    weights: Path | None = None  # a local weights file, already checked to be inside the data roots
    #: (max_images, size) -> uint8 (N, size, size, 3): a sample of the registered sources
    training_images: Callable[[int, int], np.ndarray] | None = None
    progress: Callable[[float], None] | None = None
    extra: dict = field(default_factory=dict)


class Backbone(ABC):
    version: str
    dim: int
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: a self-contained ONNX file of the network (input NCHW float32 at input_size, normalised
    #: with mean/std); when there is one, indexing publishes it so that clients can embed their
    #: own images in this space (the ``embedding`` scoring method)
    onnx_path: Path | None = None

    @abstractmethod
    def embed(self, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, input_size, input_size, 3) -> float32 (N, dim), rows of unit length."""

    def describe(self) -> dict:
        return {"version": self.version, "dim": self.dim, "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}

    @property
    def collection(self) -> str:
        """The vector collection of this embedding space."""
        return collection_name(self.version)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    x = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))  # not (len(x), -1): that fails for 0 rows
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def to_nchw(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC -> normalised float32 NCHW."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
