"""How far onnxruntime's outputs are from torch's, for correct exports and for corrupted ones.

    .venv/bin/python -m benchmarks.onnx_parity [--quick] [--seeds 0,1,2,3] [--steps 0,30,150] [--out DIR]

Trains networks as indexing does (:func:`nds.catalog.model.training.train_rotation` and
:func:`~nds.catalog.model.training.train_classifier` with ``TrainConfig`` defaults: bfloat16 autocast
on CPUs that compute it natively, AdamW, augmentation; width 16, 64 px, one block per stage)
on 2 labels x 20 images of several kinds (``stripes``: the binary grey stripes of the tests'
PNGs, ``noise``, ``digits`` and ``photos`` from :mod:`nds.samples.domains`), for several
seeds, untrained (0 steps), briefly and as long as indexing's ``min_steps`` (150). Each
classifier is also exported with its head scaled x30 (``cls x30``: logits of 30-300, a
confident classifier). Every network goes through :func:`nds.catalog.model.export.export_onnx`
(with the check turned off, so every export is measured) and then through the check's own
measurement (:func:`nds.catalog.model.export.parity_differences`, fresh N(0, 1) inputs at batch
sizes 1 and 7) 4 times: with the check's inputs and 3 other draws.

For each output (``logits``, ``features``) it reports the distribution over exports of the
worst absolute difference and of the worst difference relative to the outputs' scale
(``max|onnx - torch| / max|torch output|``, the max over both batch sizes, as the check
takes it): min, median, p99, max; then the distribution of difference / tolerance per
export (its worst output and draw). Beside it, the same for
corrupted exports of the same networks, made by editing the exported graph's initializers:

- ``conv x(1+1e-3)``: one convolution's weights (the first of stage 2) scaled by 1 + 1e-3;
- ``weight x(1+1e-2)``: the largest weight of that convolution scaled by 1 + 1e-2;
- ``channels swapped``: output channels 0 and 1 of the first block's first convolution;
- ``BN dropped``: the stem's BatchNorm removed (the exporter folds it into the convolution:
  the raw convolution weights and no bias); trained networks only, since an untrained
  BatchNorm is the identity.

Columns ``fail old`` / ``fail new``: how many exports the old rule (``max|diff| <= 1e-4``
absolute) and the current one (``|diff| <= PARITY_ATOL + PARITY_RTOL * max|out|`` per output,
:func:`nds.catalog.model.export.parity_tolerances`) reject. A correct export must never fail and a corrupted one always should.

``--quick``: width 8, 32 px, stripes and digits, 2 seeds, 0 and 20 steps (about a minute).
``--out DIR`` writes ``results.md`` (the tables) and ``results.json`` (every measurement).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 160)

OLD_ATOL = 1e-4  # the absolute rule this benchmark replaced
DRAWS = 4  # draws of (batch 1, batch 7) per export
HEAD_SCALE = 30.0
KINDS = ("stripes", "noise", "digits", "photos")
CORRUPTIONS = ("conv x(1+1e-3)", "weight x(1+1e-2)", "channels swapped", "BN dropped")


@dataclass(frozen=True)
class Plan:
    kinds: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: tuple[int, ...]
    width: int
    size: int
    per_label: int = 20


def _machine() -> str:
    import torch

    from nds.catalog.model.training import cpu_has_native_bf16

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()} with {os.cpu_count()} cores ({platform.processor() or 'cpu'}), native bf16: {cpu_has_native_bf16()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, load average {load:.1f} at the start"
    )


def images_for(kind: str, n_per_label: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (2n, S, S, 3) images and int labels (2n,) in {0, 1}."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(2), n_per_label)
    if kind == "stripes":  # as tests/conftest.py writes its PNGs
        out = np.zeros((2 * n_per_label, size, size, 3), np.uint8)
        for i, li in enumerate(labels):
            out[i, :, :: 4 + 4 * li] = 255
            out[i] = np.roll(out[i], int(rng.integers(0, 8)), axis=1)
        return out, labels
    if kind == "noise":
        scale = np.where(labels == 0, 255, 128)[:, None, None, None]
        return (rng.random((2 * n_per_label, size, size, 3)) * scale).astype(np.uint8), labels
    from nds.samples.domains import build_domain

    domain = build_domain(kind, 4 * n_per_label, size=size, seed=seed)
    names = sorted(set(domain.labels.tolist()))[:2]
    picks = np.concatenate([np.flatnonzero(domain.labels == name)[:n_per_label] for name in names])
    return domain.images[picks], (domain.labels[picks] == names[1]).astype(np.int64)


# -- corruptions ---------------------------------------------------------------------------


def corrupt(onnx_bytes: bytes, how: str, raw_stem_weight: np.ndarray) -> bytes:
    """A copy of the exported model with one planted error (see the module docstring)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(onnx_bytes)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]

    def get(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]).copy()

    def put(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    if how in ("conv x(1+1e-3)", "weight x(1+1e-2)"):
        w_name = convs[3].input[1]  # stem, block 1 conv1, conv2, then stage 2's first conv
        w = get(w_name)
        if how.startswith("conv"):
            w *= 1 + 1e-3
        else:
            flat = w.reshape(-1)
            flat[np.argmax(np.abs(flat))] *= 1 + 1e-2
        put(w_name, w)
    elif how == "channels swapped":
        for name in convs[1].input[1:]:  # weight and (folded) bias of block 1's first conv
            v = get(name)
            v[[0, 1]] = v[[1, 0]]
            put(name, v)
    elif how == "BN dropped":
        bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
        if bns:  # not folded: turn the first BatchNormalization into an Identity
            bn = bns[0]
            bn.op_type, bn.domain = "Identity", ""
            del bn.input[1:]
            del bn.attribute[:]
        else:  # folded into the stem conv: put back its raw weights, no bias
            put(convs[0].input[1], raw_stem_weight)
            if len(convs[0].input) > 2:
                put(convs[0].input[2], np.zeros_like(get(convs[0].input[2])))
    else:
        raise ValueError(f"unknown corruption {how!r}")
    return proto.SerializeToString()


# -- measuring -------------------------------------------------------------------------------


def measure(model, onnx_source, size: int) -> dict[str, dict]:
    """Per output, over ``DRAWS`` checks (batch 1 and 7 each, the first with the export's own
    inputs): the worst absolute difference, the scale (max|torch output|), the worst
    relative difference, and difference / tolerance under the current and the old rule."""
    from nds.catalog.model.export import ParityError, parity_differences, parity_tolerances

    out: dict[str, dict] = {name: {"abs": 0.0, "scale": 0.0, "rel": 0.0, "ratio": 0.0, "ratio_old": 0.0, "draws": []} for name in ("logits", "features")}
    for k in range(DRAWS):
        try:
            rows = parity_differences(model, onnx_source, size, batch_sizes=(1, 7), seed=1234 + 2 * k)
        except ParityError:
            inf = float("inf")
            return {name: {"abs": inf, "scale": inf, "rel": inf, "ratio": inf, "ratio_old": inf, "draws": []} for name in out}
        bounds = parity_tolerances(rows)
        for r in rows:
            o, (scale, tolerance) = out[r["output"]], bounds[r["output"]]
            o["abs"] = max(o["abs"], r["max_abs_diff"])
            o["scale"] = max(o["scale"], scale)
            o["rel"] = max(o["rel"], r["max_abs_diff"] / max(scale, 1e-30))
            o["ratio"] = max(o["ratio"], r["max_abs_diff"] / tolerance)  # above 1: the check rejects it
            o["ratio_old"] = max(o["ratio_old"], r["max_abs_diff"] / OLD_ATOL)
            o["draws"].append((r["batch"], r["max_abs_diff"], r["scale"]))
    return out


def run(plan: Plan, work: Path) -> list[dict]:
    import torch

    from nds.catalog.indexing import EXPERT_MEAN, EXPERT_STD
    from nds.catalog.model.export import export_onnx
    from nds.catalog.model.nets import NetConfig, build_net
    from nds.catalog.model.training import TrainConfig, train_classifier, train_rotation

    norm = (EXPERT_MEAN, EXPERT_STD)
    records: list[dict] = []
    for kind in plan.kinds:
        for seed in plan.seeds:
            images, labels = images_for(kind, plan.per_label, plan.size, seed)
            for steps in plan.steps:
                for head in ("rotation", "classifier"):
                    t0 = time.perf_counter()
                    net = NetConfig(width=plan.width, blocks=(1, 1, 1), feature_dim=128, num_outputs=4 if head == "rotation" else 2, input_size=plan.size)
                    if steps == 0:
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(seed)
                            model, precision = build_net(net).eval(), "untrained"
                    else:
                        cfg = TrainConfig(epochs=1000, seed=seed, max_steps=steps)
                        if head == "rotation":  # one cluster: the images of one label
                            result = train_rotation(images[labels == 0], net, cfg, normalization=norm)
                        else:
                            result = train_classifier(images, labels, 2, net, cfg, normalization=norm)
                        model, precision = result.model, result.precision
                    variants = [(head, model)]
                    if head == "classifier":
                        scaled = copy.deepcopy(model)
                        with torch.no_grad():
                            scaled.head.weight.mul_(HEAD_SCALE)
                            scaled.head.bias.mul_(HEAD_SCALE)
                        variants.append((f"cls x{HEAD_SCALE:g}", scaled))
                    for label, m in variants:
                        path = work / f"{kind}-{seed}-{steps}-{label.replace(' ', '')}.onnx"
                        export_onnx(m, net, metadata={}, path=path, atol=float("inf"))  # measure every export
                        data = path.read_bytes()
                        raw_stem = m.stem[0].weight.detach().numpy()
                        base = {"kind": kind, "seed": seed, "steps": steps, "head": label, "precision": precision}
                        records.append({**base, "case": "correct", **{"outputs": measure(m, data, plan.size)}})
                        for how in CORRUPTIONS:
                            if how == "BN dropped" and steps == 0:  # an untrained BatchNorm is the identity
                                continue
                            records.append({**base, "case": how, "outputs": measure(m, corrupt(data, how, raw_stem), plan.size)})
                        path.unlink()
                    per_export = 1 + len(CORRUPTIONS) - (steps == 0)
                    console.print(
                        f"  {kind:8s} seed {seed} {steps:4d} steps {head:10s} ({precision}): "
                        + ", ".join(
                            f"{r['head']} max|logits| {r['outputs']['logits']['scale']:.3g} rel {r['outputs']['logits']['rel']:.2g}"
                            for r in records[-len(variants) * per_export :: per_export]
                        )
                        + f"  {time.perf_counter() - t0:.1f} s",
                        highlight=False,
                    )
    return records


# -- reporting -------------------------------------------------------------------------------


def _q(values: Sequence[float]) -> tuple[float, float, float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.min()), float(np.median(a)), float(np.percentile(a, 99)), float(a.max())


def summary(records: list[dict]) -> list[dict]:
    rows = []
    for case in ("correct", *CORRUPTIONS):
        for name in ("logits", "features"):
            picked = [r["outputs"][name] for r in records if r["case"] == case]
            if not picked:
                continue
            n_exports = len(picked)
            mine = [r for r in records if r["case"] == case]
            rows.append({
                "case": case,
                "output": name,
                "n": n_exports,
                "abs": _q([p["abs"] for p in picked]),
                "rel": _q([p["rel"] for p in picked]),
                "scale": _q([p["scale"] for p in picked]),
                # an export fails when either output does: count per export, shown on both rows
                "fail_old": sum(_ratio(r, "ratio_old") > 1 for r in mine),
                "fail_new": sum(_ratio(r, "ratio") > 1 for r in mine),
            })
    return rows


def _ratio(record: dict, key: str) -> float:
    """Difference / tolerance of one export: its worst output and draw."""
    return max(o[key] for o in record["outputs"].values())


def gap(records: list[dict]) -> list[dict]:
    """Per case, the distribution over exports of difference / tolerance (the current rule)."""
    out = []
    for case in ("correct", *CORRUPTIONS):
        ratios = [_ratio(r, "ratio") for r in records if r["case"] == case]
        if ratios:
            out.append({"case": case, "n": len(ratios), "ratio": _q(ratios), "rejected": sum(v > 1 for v in ratios),
                        "rejected_old": sum(_ratio(r, "ratio_old") > 1 for r in records if r["case"] == case)})
    return out


def _g(v: float) -> str:
    return "inf" if v == float("inf") else f"{v:.2e}"


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("case", "output", "n", "max|out| median", "abs min", "abs median", "abs p99", "abs max",
                "rel min", "rel median", "rel p99", "rel max", "fail old", "fail new"):
        t.add_column(col, justify="left" if col in ("case", "output") else "right")
    for r in rows:
        t.add_row(r["case"], r["output"], str(r["n"]), _g(r["scale"][1]), *(_g(v) for v in r["abs"]), *(_g(v) for v in r["rel"]),
                  f"{r['fail_old']}/{r['n']}", f"{r['fail_new']}/{r['n']}")
    return t


def gap_table(rows: list[dict], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("case", "exports", "diff/tol min", "diff/tol median", "diff/tol p99", "diff/tol max", "rejected (old rule)", "rejected"):
        t.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        t.add_row(r["case"], str(r["n"]), *(_g(v) for v in r["ratio"]), f"{r['rejected_old']}/{r['n']}", f"{r['rejected']}/{r['n']}")
    return t


def gap_markdown(rows: list[dict], title: str) -> str:
    lines = [title, "", "| case | exports | diff/tol min | diff/tol median | diff/tol p99 | diff/tol max | rejected (old rule) | rejected |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join([r["case"], str(r["n"]), *(_g(v) for v in r["ratio"]), f"{r['rejected_old']}/{r['n']}", f"{r['rejected']}/{r['n']}"]) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| case | output | n | max\\|out\\| median | abs min | abs median | abs p99 | abs max | rel min | rel median | rel p99 | rel max | fail old | fail new |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["case"], r["output"], str(r["n"]), _g(r["scale"][1]), *(_g(v) for v in r["abs"]), *(_g(v) for v in r["rel"]),
                 f"{r['fail_old']}/{r['n']}", f"{r['fail_new']}/{r['n']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="width 8, 32 px, 2 kinds, 2 seeds, 0 and 20 steps")
    parser.add_argument("--seeds", type=_ints, default=None, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--steps", type=_ints, default=None, help="comma-separated training steps (default 0,30,150)")
    parser.add_argument("--kinds", default=None, help=f"comma-separated image kinds (default {','.join(KINDS)})")
    parser.add_argument("--out", type=Path, default=None, help="write results.md and results.json here")
    args = parser.parse_args(argv)

    from nds.catalog.model.export import PARITY_ATOL, PARITY_RTOL

    if args.quick:
        plan = Plan(kinds=("stripes", "digits"), seeds=(0, 1), steps=(0, 20), width=8, size=32)
    else:
        plan = Plan(kinds=KINDS, seeds=(0, 1, 2), steps=(0, 30, 150), width=16, size=64)
    plan = Plan(
        kinds=tuple(args.kinds.split(",")) if args.kinds else plan.kinds,
        seeds=args.seeds or plan.seeds,
        steps=args.steps if args.steps is not None else plan.steps,
        width=plan.width,
        size=plan.size,
    )
    console.print(f"machine: {_machine()}", highlight=False)
    console.print(f"plan: {plan}; rule: |diff| <= {PARITY_ATOL:g} + {PARITY_RTOL:g} x max|out| per output (old: |diff| <= {OLD_ATOL:g})", highlight=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nds-onnx-parity-") as tmp:
        records = run(plan, Path(tmp))
    rows = summary(records)
    gaps = gap(records)
    title = (f"{sum(r['case'] == 'correct' for r in records)} exports, {DRAWS} draws of batch 1 and 7 each "
             f"({time.perf_counter() - start:.0f} s); rel = max|onnx - torch| / max|torch output|")
    gap_title = (f"difference / tolerance per export (worst output and draw; tolerance {PARITY_ATOL:g} + {PARITY_RTOL:g} x max|out|; "
                 f"old rule: {OLD_ATOL:g} absolute)")
    console.print(table(rows, title))
    console.print(gap_table(gaps, gap_title))
    worst_correct = next(g["ratio"][3] for g in gaps if g["case"] == "correct")
    verdict = [f"correct exports: the worst is {1 / worst_correct:.1f}x below the tolerance"]
    for g in gaps[1:]:
        verdict.append(f"'{g['case']}': caught {g['rejected']}/{g['n']}, the least visible at {g['ratio'][0]:.3g}x the tolerance")
    for line in verdict:
        console.print(line, highlight=False)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        header = f"# ONNX parity\n\nMachine: {_machine()}\n\nPlan: {plan}\n\n{title}\n"
        text = markdown(rows, header) + "\n" + gap_markdown(gaps, gap_title) + "\n" + "\n".join(f"- {v}" for v in verdict) + "\n"
        (args.out / "results.md").write_text(text)
        (args.out / "results.json").write_text(json.dumps({"plan": plan.__dict__, "records": records}, indent=1, default=str) + "\n")
    return 0 if gaps[0]["rejected"] == 0 else 1  # a correct export rejected: the rule is wrong


if __name__ == "__main__":
    raise SystemExit(main())
