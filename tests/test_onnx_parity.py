"""The ONNX parity check: correct exports always pass, corrupted ones are always caught.

The tolerance is relative to the outputs' scale (``PARITY_ATOL + PARITY_RTOL * max|out|``);
``python -m benchmarks.onnx_parity`` measures the distributions it was set from.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from nds.catalog.model.export import ParityError, check_parity, export_onnx, parity_differences, parity_tolerances
from nds.catalog.model.nets import NetConfig, build_net
from nds.catalog.model.training import TrainConfig, cpu_has_native_bf16, train_classifier, train_rotation

pytestmark = pytest.mark.slow  # trains and exports dozens of networks: not in `make test-fast`

NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
TINY = NetConfig(width=4, blocks=(1, 1), feature_dim=16, input_size=16)  # exports in about a second
EXTRA_DRAWS = (1, 7, 1, 7)  # beyond the export's own check: more fresh inputs per export


def two_class_images(seed: int, n: int = 16, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 90, (n, size, size, 3)).astype(np.uint8)
    images[labels == 0, :, :, 0] += 160
    images[labels == 1, :, :, 2] += 160
    return images, labels


def trained(seed: int, head: str, steps: int) -> torch.nn.Module:
    """A tiny network as indexing trains it (TrainConfig defaults: bf16 autocast on CPUs with
    native bf16), a few steps so its BatchNorms hold real statistics; untrained when steps == 0."""
    config = TINY if head == "rotation" else replace(TINY, num_outputs=2)
    if steps == 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_net(config).eval()
    images, labels = two_class_images(seed)
    cfg = TrainConfig(epochs=100, batch_size=8, seed=seed, max_steps=steps)
    if head == "rotation":
        result = train_rotation(images, config, cfg, normalization=NORM)
    else:
        result = train_classifier(images, labels, 2, config, cfg, normalization=NORM)
    if result.device == "cpu":  # the path this test means to cover where the CPU has it
        assert result.precision == ("bfloat16" if cpu_has_native_bf16() else "float32")
    return result.model


def scale_logits(model: torch.nn.Module, target: float) -> float:
    """Scale the head so that max|logits| on N(0, 1) inputs is about ``target`` (a confident
    classifier: trained ones reach 10-100); returns the factor."""
    with torch.no_grad():
        logits, _ = model(torch.randn(8, 3, TINY.input_size, TINY.input_size, generator=torch.Generator().manual_seed(7)))
        factor = target / float(logits.abs().max())
        model.head.weight.mul_(factor)
        model.head.bias.mul_(factor)
    return factor


def worst_ratio(model: torch.nn.Module, source, seed: int = 99) -> float:
    """The largest difference / tolerance over fresh inputs other than the check's own."""
    rows = parity_differences(model, source, TINY.input_size, batch_sizes=EXTRA_DRAWS, seed=seed)
    bounds = parity_tolerances(rows)
    return max(r["max_abs_diff"] / bounds[r["output"]][1] for r in rows)


# -- correct exports never fail ---------------------------------------------------------------

CASES = [(seed, head, steps, target) for seed, (head, steps, target) in enumerate(
    [("classifier", 4, 50.0), ("rotation", 4, 200.0), ("classifier", 0, 20.0), ("rotation", 2, 500.0), ("classifier", 2, 100.0)] * 2
)]  # 10 exports: both heads, untrained and trained, logits of scale 20-500 (a trained classifier's
# reach 50 on these inputs, and the old absolute 1e-4 rejected correct exports from about 300 up)


@pytest.mark.parametrize(("seed", "head", "steps", "target"), CASES)
def test_correct_exports_pass(tmp_path: Path, seed: int, head: str, steps: int, target: float) -> None:
    model = trained(seed, head, steps)
    scale_logits(model, target)
    path = tmp_path / "expert.onnx"
    export_onnx(model, model.config, metadata={}, path=path)  # raises ParityError on a failed check
    assert os.listdir(tmp_path) == ["expert.onnx"]
    # more fresh inputs than the export's own check: every difference well inside the bound
    assert worst_ratio(model, path) < 0.5


def test_large_outputs_need_a_relative_tolerance(tmp_path: Path) -> None:
    """At max|logits| ~ 1e4 one float32 ulp is ~1e-3: torch and onnxruntime, which fold and
    order their sums differently, cannot agree within an absolute 1e-4, yet the export is right."""
    model = trained(0, "classifier", 4)
    scale_logits(model, 1e4)
    path = tmp_path / "expert.onnx"
    export_onnx(model, model.config, metadata={}, path=path)
    rows = parity_differences(model, path, TINY.input_size, batch_sizes=EXTRA_DRAWS)
    logits = [r for r in rows if r["output"] == "logits"]
    assert max(r["scale"] for r in logits) > 5e3
    assert max(r["max_abs_diff"] for r in logits) > 1e-4  # what the old absolute rule rejected
    assert worst_ratio(model, path) < 0.5


def test_export_inside_cpu_autocast_is_float32(tmp_path: Path) -> None:
    """Training on bf16 CPUs runs under autocast; an export called inside such a region must
    still trace and check in float32 (else bf16 leaks into the graph or the reference)."""
    model = trained(1, "rotation", 2)
    path = tmp_path / "expert.onnx"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        export_onnx(model, model.config, metadata={}, path=path)
        check_parity(model, path, TINY.input_size)
    types = {t.data_type for t in onnx.load(path).graph.initializer}
    assert onnx.TensorProto.BFLOAT16 not in types and worst_ratio(model, path) < 0.5


# -- corrupted exports are always caught ------------------------------------------------------


def _tampered(source: Path, how: str) -> bytes:
    proto = onnx.load(source)
    inits = {t.name: t for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]

    def edit(name: str, fn) -> None:
        value = numpy_helper.to_array(inits[name]).copy()
        inits[name].CopyFrom(numpy_helper.from_array(fn(value).astype(np.float32), name))

    if how == "conv x(1+1e-3)":  # one convolution's weights off by a relative 1e-3
        edit(convs[3].input[1], lambda w: w * (1 + 1e-3))
    elif how == "weight x(1+1e-2)":  # a single weight (the largest of that convolution) off by 1%
        def one(w: np.ndarray) -> np.ndarray:
            flat = w.reshape(-1)
            flat[np.argmax(np.abs(flat))] *= 1 + 1e-2
            return w

        edit(convs[3].input[1], one)
    elif how == "channels swapped":
        for name in convs[1].input[1:]:
            edit(name, lambda v: v[[1, 0, *range(2, len(v))]])
    else:
        raise ValueError(how)
    return proto.SerializeToString()


@pytest.mark.parametrize("target", [0.0, 50.0])  # 0: the network's own (small) logits
def test_tampered_graphs_are_caught(tmp_path: Path, target: float) -> None:
    model = trained(2, "classifier", 4)
    if target:
        scale_logits(model, target)
    path = tmp_path / "expert.onnx"
    export_onnx(model, model.config, metadata={}, path=path)
    for how in ("conv x(1+1e-3)", "weight x(1+1e-2)", "channels swapped"):
        with pytest.raises(ParityError) as info:
            check_parity(model, _tampered(path, how), TINY.input_size)
        err = info.value
        assert err.max_abs_diff > err.tolerance > 0, how
        assert f"{err.max_abs_diff:.3g}" in str(err) and f"tolerance {err.tolerance:.3g}" in str(err), str(err)
        # the planted error is far above the bound, not just over it
        assert worst_ratio(model, _tampered(path, how)) > 5, how


class _ExportsPerturbed(torch.nn.Module):
    """Runs ``net`` in torch but exports it with one convolution's weights scaled by 1 + 1e-3:
    an export that is slightly wrong."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.config = net.config

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_exporting():
            params = dict(self.net.named_parameters()) | dict(self.net.named_buffers())
            params["stages.1.0.conv1.weight"] = params["stages.1.0.conv1.weight"] * (1 + 1e-3)
            return torch.func.functional_call(self.net, params, (x,))
        return self.net(x)


@pytest.mark.parametrize("target", [0.0, 100.0])
def test_slightly_wrong_export_leaves_no_file(tmp_path: Path, target: float) -> None:
    model = trained(3, "classifier", 4)
    if target:
        scale_logits(model, target)
    path = tmp_path / "expert.onnx"
    with pytest.raises(ParityError) as info:
        export_onnx(_ExportsPerturbed(model), model.config, metadata={}, path=path)
    assert info.value.max_abs_diff > 5 * info.value.tolerance
    assert "tolerance" in str(info.value)
    assert not path.exists() and os.listdir(tmp_path) == []
