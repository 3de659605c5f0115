"""``onnx:<file>``: any ONNX feature extractor taking float32 NCHW images.

The input size is read from the model's input shape (or its ``input_size`` metadata,
default 224); normalisation from its ``mean``/``std`` metadata (JSON lists), else
ImageNet's. The output named ``features`` is used when there is one, else the first.
The file must lie inside the data roots: the path goes through ``env.resolve_path``, which the
catalog provides.
"""

from __future__ import annotations

import json

import numpy as np

from nds.plugins.contract import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArtifactError,
    Backbone,
    BackboneEnv,
    InvalidInputError,
    PluginError,
    normalize_rows,
    sha256_file,
    to_nchw,
)
from nds_client.runtime import create_session, read_metadata


class OnnxBackbone(Backbone):
    def __init__(self, path, meta: dict[str, str]) -> None:  # noqa: ANN001 - Path
        self.onnx_path = path
        self.session = create_session(path)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "features" if "features" in outputs else outputs[0]
        shape = inp.shape
        try:
            size = shape[-1] if len(shape) == 4 and isinstance(shape[-1], int) else int(meta.get("input_size", 224))
            self.input_size = int(size)
            self.mean = tuple(float(v) for v in json.loads(meta["mean"])) if "mean" in meta else IMAGENET_MEAN
            self.std = tuple(float(v) for v in json.loads(meta["std"])) if "std" in meta else IMAGENET_STD
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            raise PluginError(f"{path}: bad input_size/mean/std metadata: {exc}", hint="store them JSON-encoded, e.g. mean = [0.485, 0.456, 0.406]") from exc
        self.version = f"onnx-{sha256_file(path)[:12]}"
        try:  # onnxruntime raises its own types (InvalidArgument, Fail, ...) for a model that does not fit
            probe = self._run(np.zeros((2, self.input_size, self.input_size, 3), np.uint8))
        except Exception as exc:  # noqa: BLE001 - translated here, once
            raise PluginError(
                f"{path} does not run on float32 images (N, 3, {self.input_size}, {self.input_size}): {exc}",
                hint="export a feature extractor with input (N, 3, S, S) and a dynamic batch axis",
            ) from exc
        self.dim = int(probe.shape[1])

    def _run(self, images: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output_name], {self.input_name: to_nchw(images, self.mean, self.std)})
        return np.asarray(out, np.float32).reshape(len(images), -1)

    def embed(self, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        parts = [self._run(images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
        return normalize_rows(np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32))


def load(arg: str | None, env: BackboneEnv) -> Backbone:
    if not arg:
        raise PluginError("name the model file: onnx:<path>")
    try:
        path = env.resolve_path(arg)
    except InvalidInputError as exc:
        raise PluginError(exc.message, hint=exc.hint) from exc
    try:
        return OnnxBackbone(path, read_metadata(path))
    except ArtifactError as exc:  # not an ONNX file, or one onnxruntime cannot load
        raise PluginError(exc.message, hint=exc.hint or "check that the file is an ONNX model") from exc
