"""The one normalisation: how uint8 images become network inputs, for training, backbones and the client.

Every network the server trains or publishes takes float32 NCHW input ``(x / 255 - mean) / std``
per channel, with ImageNet's mean and std unless its ONNX metadata says otherwise. The server's
training (:mod:`nds.catalog.model.training`) applies the same formula to torch tensors on the
device and is tested against :func:`to_nchw`; everything else calls this module. Only numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def to_nchw(images: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """uint8 (B, S, S, C) -> float32 (B, C, S, S), ``(x / 255 - mean) / std``."""
    x = images.astype(np.float32) / np.float32(255.0)  # a division, as training's torch version does
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def rotations(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, C) -> (4B, H, W, C): block k is every image rotated k * 90 degrees
    counter-clockwise, exactly what training's ``torch.rot90(x, k, dims=(2, 3))`` does on NCHW."""
    return np.concatenate([np.rot90(images, k, axes=(1, 2)) for k in range(4)], axis=0)


def normalize_rows(x: np.ndarray, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """(N, ...) -> (N, D) rows of unit length in ``dtype`` (zero rows stay zero)."""
    x = np.asarray(x, dtype=dtype)
    x = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))  # not (len(x), -1): that fails for 0 rows
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
