"""Exporting networks to ONNX: one self-contained file, checked against torch, written atomically.

The file holds input ``images`` (B, C, S, S) float32 with a dynamic batch axis and
outputs ``logits`` (B, num_outputs) and ``features`` (B, feature_dim). Its
``metadata_props`` carry whatever the caller passes (task, input size, normalisation,
label names, version, hash, ``NetConfig.to_dict()``), so a client can use it alone.

Sessions and metadata reading live in the torch-free :mod:`nds_client.runtime`.
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

from nds.catalog.model.nets import NetConfig
from nds_client.errors import ArtifactError
from nds_client.runtime import ModelSource, create_session

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "features")
EXPORT_BATCH = 2  # the dynamo exporter specialises batch size 1; 2 keeps the axis dynamic


# Parity tolerance, per output: |onnx - torch| <= PARITY_ATOL + PARITY_RTOL * max|torch output|
# (the max over all the check's inputs). Correct exports differ by a few float32 ulps of the
# largest output, so an absolute bound fails once outputs are large: at logits of 270-1500 the
# old 1e-4 rejected 7 of 108 correct exports (differences 1.1e-4 to 4.9e-4). The absolute part
# covers outputs near zero. ``python -m benchmarks.onnx_parity``, 108 exports (both heads,
# untrained and trained under bf16 autocast, 4 image kinds, 3 seeds): correct exports differ
# by at most 1.8e-6 of the outputs' scale and stay 18x below this bound; one convolution's
# weights off by a relative 1e-3 land 9x above it or more, swapped channels 600x, a dropped
# BatchNorm 5800x.
PARITY_RTOL = 2e-5
PARITY_ATOL = 1e-5


class ParityError(ArtifactError, ValueError):
    """The ONNX model's outputs differ from torch's by more than the tolerance."""

    def __init__(
        self, message: str, *, max_abs_diff: float, tolerance: float | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


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
    # torch's stubs type Module.to(memory_format=...) only alone; at runtime it takes a device and dtype with it
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]


def _float32() -> torch.autocast:
    """A region where CPU autocast is off: export and reference run in float32 even when the
    caller is inside ``torch.autocast("cpu", ...)`` (as training on bf16 CPUs is)."""
    return torch.autocast("cpu", enabled=False)


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
    atol: float = PARITY_ATOL,
    rtol: float = PARITY_RTOL,
) -> None:
    """Export ``model`` to ``path`` (dynamo exporter, dynamic batch, one file with its
    weights), store ``metadata`` in ``metadata_props``, check parity with torch at batch
    sizes 1 and 7 (:func:`check_parity`, tolerance ``atol + rtol * max|torch output|``), and
    only then move the file into place (``os.replace`` of a temp file in the same folder).
    On any error no file is left behind. Export and check run in float32 even when the
    caller is inside a CPU autocast region.

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
            with warnings.catch_warnings(), _float32():
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
            assert program is not None  # torch.onnx.export returns None only for the legacy exporter (dynamo=False)
            program.model.metadata_props.update(props)
            program.save(tmp, external_data=False)
        except (OSError, RuntimeError, ValueError, TypeError) as exc:  # OnnxExporterError is a RuntimeError
            raise ArtifactError(f"cannot export {type(model).__name__} to ONNX at {path}: {exc}") from exc
        check_parity(frozen, tmp, net_config.input_size, atol=atol, rtol=rtol)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise ArtifactError(f"cannot move the exported model to {path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def parity_differences(
    model: nn.Module,
    onnx_model: ModelSource,
    input_size: int,
    batch_sizes: Sequence[int] = (1, 7),
    seed: int = 1234,
) -> list[dict[str, Any]]:
    """Run the same random inputs (standard normal, one draw per batch size) through torch
    (eval, float32, CPU, autocast off) and onnxruntime (CPU). One dict per batch size and
    output: ``batch``, ``output`` (name), ``max_abs_diff`` and ``scale`` (max|torch output|).
    Raises ParityError when onnxruntime fails or a shape differs."""
    frozen = _frozen_copy(model)
    session = create_session(onnx_model, prefer_gpu=False)
    inputs = session.get_inputs()
    in_channels = inputs[0].shape[1] if isinstance(inputs[0].shape[1], int) else 3
    rows = []
    for i, batch in enumerate(batch_sizes):
        gen = torch.Generator().manual_seed(seed + i)
        x = torch.randn(batch, in_channels, input_size, input_size, generator=gen)  # (B, C, S, S)
        with torch.inference_mode(), _float32():
            expected = [t.float().numpy() for t in frozen(x)]
        try:
            got = session.run(list(OUTPUT_NAMES), {inputs[0].name: x.numpy()})
        except Exception as exc:  # onnxruntime's own error types
            raise ParityError(f"onnxruntime failed at batch size {batch}: {exc}", max_abs_diff=float("inf")) from exc
        for name, e, g in zip(OUTPUT_NAMES, expected, got):
            if e.shape != g.shape:
                raise ParityError(
                    f"{name} has shape {g.shape} in ONNX, {e.shape} in torch (batch size {batch})", max_abs_diff=float("inf")
                )
            diff = np.abs(e.astype(np.float64) - g.astype(np.float64))
            rows.append({
                "batch": batch,
                "output": name,
                "max_abs_diff": float(np.max(diff, initial=0.0)),
                "scale": float(np.max(np.abs(e), initial=0.0)),
            })
    return rows


def parity_tolerances(rows: Sequence[dict[str, Any]], atol: float = PARITY_ATOL, rtol: float = PARITY_RTOL) -> dict[str, tuple[float, float]]:
    """Per output name in ``rows`` (from :func:`parity_differences`): ``(scale, tolerance)``,
    the scale being max|torch output| over every row of that output (all batch sizes: one
    sample's logits can be small while the network's are not) and the tolerance ``atol +
    rtol * scale``."""
    scales: dict[str, float] = {}
    for row in rows:
        scales[row["output"]] = max(scales.get(row["output"], 0.0), row["scale"])
    return {name: (scale, atol + rtol * scale) for name, scale in scales.items()}


def check_parity(
    model: nn.Module,
    onnx_model: ModelSource,
    input_size: int,
    batch_sizes: Sequence[int] = (1, 7),
    atol: float = PARITY_ATOL,
    seed: int = 1234,
    rtol: float = PARITY_RTOL,
) -> float:
    """Check that onnxruntime reproduces torch on fresh random inputs at each batch size
    (:func:`parity_differences`): for each output, ``max|onnx - torch| <= atol + rtol *
    max|torch output|``, the max taken over all the batch sizes (:func:`parity_tolerances`).
    The bound scales with the outputs because float32 rounding does: the two runtimes order
    and fuse their sums differently (the exporter folds each BatchNorm into its convolution),
    and a trained classifier's logits reach 10-100. Returns the largest absolute difference
    over both outputs. Raises ParityError, naming the difference and the tolerance, when an
    output is above its bound, or when torch's outputs are not finite."""
    rows = parity_differences(model, onnx_model, input_size, batch_sizes, seed)
    bounds = parity_tolerances(rows, atol, rtol)
    worst = 0.0
    for row in rows:
        name, batch, diff = row["output"], row["batch"], row["max_abs_diff"]
        scale, tolerance = bounds[name]
        if not np.isfinite(scale):
            raise ParityError(
                f"torch's {name} is not finite at batch size {batch}: parity cannot be checked",
                max_abs_diff=float("inf"),
                hint="the network overflows on standard normal inputs",
            )
        if not diff <= tolerance:  # also catches NaN
            raise ParityError(
                f"ONNX and torch {name} differ by up to {diff:.3g} at batch size {batch}, above the tolerance "
                f"{tolerance:.3g} ({atol:.3g} + {rtol:.3g} x max|{name}| {scale:.3g}); relative difference {diff / max(scale, 1e-30):.3g}",
                max_abs_diff=diff,
                tolerance=tolerance,
                hint="the model may do something in eval mode that the exporter cannot capture",
            )
        worst = max(worst, diff)
    return worst
