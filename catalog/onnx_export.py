"""Exporting networks to ONNX: one self-contained file, checked against torch, written atomically.

The file holds input ``images`` (B, C, S, S) float32 with a dynamic batch axis and
outputs ``logits`` (B, num_outputs) and ``features`` (B, feature_dim). Its
``metadata_props`` carry whatever the caller passes (task, input size, normalisation,
label names, version, hash, ``NetConfig.to_dict()``), so a client can use it alone.

Sessions and metadata reading live in the torch-free :mod:`catalog.onnx_runtime`.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from catalog.errors import ArtifactError
from catalog.nets import NetConfig
from catalog.onnx_runtime import ModelSource, active_provider, create_session, read_metadata  # noqa: F401 (re-exported)

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "features")
EXPORT_BATCH = 2  # the dynamo exporter specialises batch size 1; 2 keeps the axis dynamic


class ParityError(ArtifactError, ValueError):
    """The ONNX model's outputs differ from torch's by more than the tolerance."""

    def __init__(self, message: str, *, max_abs_diff: float, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.max_abs_diff = max_abs_diff


def _metadata_strings(metadata: dict[str, Any]) -> dict[str, str]:
    """All values as strings: strings stay, everything else is JSON-encoded."""
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise ArtifactError(f"metadata keys must be strings, got {key!r}")
        out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def _frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode float32 CPU copy; the caller's model (mode, device) is left untouched."""
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format).eval()


def _example(net_config: NetConfig, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = net_config.input_size
    return torch.randn(batch, net_config.in_channels, s, s, generator=gen)  # (B, C, S, S)


def export_onnx(
    model: nn.Module,
    net_config: NetConfig,
    *,
    metadata: dict[str, Any],
    path: Path,
    atol: float = 1e-4,
) -> None:
    """Export ``model`` to ``path`` (dynamo exporter, dynamic batch, one file with its
    weights), store ``metadata`` in ``metadata_props``, check parity with torch at batch
    sizes 1 and 7, and only then move the file into place (``os.replace`` of a temp file in
    the same folder). On any error no file is left behind.

    Raises ArtifactError when export or writing fails, ParityError when outputs differ."""
    path = Path(path)
    props = _metadata_strings(metadata)
    frozen = _frozen_copy(model)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ArtifactError(f"cannot write to {path.parent}: {exc}", hint="check the folder exists and is writable") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter warns about things we do not use
                program = torch.onnx.export(
                    frozen,
                    (_example(net_config, EXPORT_BATCH, seed=0),),
                    dynamo=True,
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 20)},),
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                    external_data=False,
                    verbose=False,
                    report=False,
                )
            program.model.metadata_props.update(props)
            program.save(tmp, external_data=False)
        except (OSError, RuntimeError, ValueError, TypeError) as exc:  # OnnxExporterError is a RuntimeError
            raise ArtifactError(f"cannot export {type(model).__name__} to ONNX at {path}: {exc}") from exc
        check_parity(frozen, tmp, net_config.input_size, atol=atol)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise ArtifactError(f"cannot move the exported model to {path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def check_parity(
    model: nn.Module,
    onnx_model: ModelSource,
    input_size: int,
    batch_sizes: Sequence[int] = (1, 7),
    atol: float = 1e-4,
    seed: int = 1234,
) -> float:
    """Run the same random inputs through torch (eval, float32, CPU) and onnxruntime (CPU)
    for each batch size; return the largest absolute difference over both outputs. Raises
    ParityError when it is above ``atol``."""
    frozen = _frozen_copy(model)
    session = create_session(onnx_model, prefer_gpu=False)
    inputs = session.get_inputs()
    in_channels = inputs[0].shape[1] if isinstance(inputs[0].shape[1], int) else 3
    worst = 0.0
    for i, batch in enumerate(batch_sizes):
        gen = torch.Generator().manual_seed(seed + i)
        x = torch.randn(batch, in_channels, input_size, input_size, generator=gen)  # (B, C, S, S)
        with torch.inference_mode():
            expected = [t.numpy() for t in frozen(x)]
        try:
            got = session.run(list(OUTPUT_NAMES), {inputs[0].name: x.numpy()})
        except Exception as exc:  # onnxruntime's own error types
            raise ParityError(f"onnxruntime failed at batch size {batch}: {exc}", max_abs_diff=float("inf")) from exc
        for name, e, g in zip(OUTPUT_NAMES, expected, got):
            if e.shape != g.shape:
                raise ParityError(
                    f"{name} has shape {g.shape} in ONNX, {e.shape} in torch (batch size {batch})", max_abs_diff=float("inf")
                )
            worst = max(worst, float(np.max(np.abs(e - g), initial=0.0)))
    if not worst <= atol:  # also catches NaN
        raise ParityError(
            f"ONNX and torch outputs differ by up to {worst:.3g} (tolerance {atol:.3g})",
            max_abs_diff=worst,
            hint="the model may do something in eval mode that the exporter cannot capture",
        )
    return worst
