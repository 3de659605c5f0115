"""Client cost: 1,000 target images against 50 experts, on this machine's CPU.

    .venv/bin/python -m benchmarks.client [--quick] [--images 1000] [--experts 50] [--r18-images 1000]

1. **target**: ``--images`` handwritten digits (``nds.samples.domains.build_domain("digits",
   n, size=32)``) written as PNGs.
2. **experts**: ``--experts`` rotation networks exactly as the indexing pipeline makes them
   (``nds.catalog.model.nets.NarrowResNet``, width 16, blocks (1, 1, 1), 64 px input, random init: cost
   does not depend on the weights), exported with :func:`nds.catalog.model.export.export_onnx`
   into a temporary cache as ``<sha256>.onnx``.
3. **our client**: :meth:`nds_client.client.NDSClient.score` (method ``rotation``) on the PNG folder,
   timed by its progress events: opening the sessions, (a) preprocessing (decode + centre
   crop + resize to 64 px, once per image, shared by every expert) and (b) inference
   (4 rotations x images x experts, batches of 256 images). Target: (a) + (b) under 60 s.
4. **the original's experts**: ONE torchvision ResNet-18 (random init) at 224 px, exported
   the same way and run through the same client code (onnxruntime, batches of 32 images),
   on the first ``--r18-images`` images x 4 rotations, in the same run; its preprocessing
   (to 224 px) and inference are extrapolated linearly to every image and to 50 experts,
   and the ratio to ours is reported.
5. **download size**: the 50 ONNX experts on disk, next to the original's 2.2 GB (and 50
   ResNet-18 files).

``--quick``: 200 images, 10 experts, 50 images through ResNet-18 (about a minute).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 150)

TARGET_S = 60.0
ORIGINAL_DOWNLOAD_BYTES = 2.2e9  # NDS (Yan et al. 2020): 50 ResNet-18 experts for one dataset
EXPERT_SIZE = 64


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()} with {os.cpu_count()} cores, load average {load:.1f} at the start"


def make_target(work: Path, n: int) -> Path:
    from nds.samples.domains import build_domain, write_image_folder

    return write_image_folder(build_domain("digits", n, size=32, seed=0, variant="target"), work / "target")


def _export(model, net, meta: dict, cache: Path, atol: float = 1e-4) -> tuple[str, Path]:
    import json

    from nds.catalog.model.export import export_onnx

    tmp = cache / "exporting.onnx"
    export_onnx(model, net, metadata={k: json.dumps(v) for k, v in meta.items()}, path=tmp, atol=atol)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = cache / f"{sha}.onnx"
    os.replace(tmp, path)
    return sha, path


def export_experts(cache: Path, k: int):
    """k rotation experts as the indexing pipeline exports them; LocalExpert records for the client."""
    import torch

    from nds.catalog.indexing import EXPERT_MEAN, EXPERT_STD
    from nds.catalog.model.nets import NetConfig, build_net
    from nds_client.scores import LocalExpert

    net = NetConfig(width=16, blocks=(1, 1, 1), feature_dim=128, num_outputs=4, input_size=EXPERT_SIZE)
    experts = []
    for i in range(k):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            model = build_net(net).eval()
        meta = {"task": "rotation", "format_version": 1, "input_size": EXPERT_SIZE, "mean": list(EXPERT_MEAN), "std": list(EXPERT_STD),
                "label_names": [], "dataset": "bench", "dataset_id": 1, "cluster": i, "net_config": net.to_dict(), "outputs": ["logits", "features"]}
        sha, path = _export(model, net, meta, cache)
        experts.append(LocalExpert(id=i + 1, kind="rotation", dataset_id=1, dataset="bench", cluster=i, sha256=sha, path=path,
                                   input_size=EXPERT_SIZE, mean=tuple(EXPERT_MEAN), std=tuple(EXPERT_STD), label_names=(),
                                   heldout_accuracy=None, index_version=1, byte_size=path.stat().st_size))
    return experts


def export_resnet18(cache: Path):
    """A torchvision ResNet-18 (random init, 4 outputs) at 224 px, with the experts' (logits, features) interface."""
    import torch
    import torchvision
    from torch import nn

    from nds.catalog.indexing import EXPERT_MEAN, EXPERT_STD
    from nds.catalog.model.nets import NetConfig
    from nds_client.scores import LocalExpert

    class ResNet18Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = torchvision.models.resnet18(weights=None, num_classes=4)
            self.body = nn.Sequential(*list(base.children())[:-1])  # up to the global average pool
            self.fc = base.fc

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = torch.flatten(self.body(x), 1)  # (B, 512)
            return self.fc(features), features

    torch.manual_seed(0)
    model = ResNet18Expert().eval()
    net = NetConfig(input_size=224)  # only the example input's shape is read from it
    meta = {"task": "rotation", "input_size": 224, "mean": list(EXPERT_MEAN), "std": list(EXPERT_STD), "label_names": []}
    sha, path = _export(model, net, meta, cache, atol=1e-3)
    return LocalExpert(id=10_000, kind="rotation", dataset_id=1, dataset="resnet18", cluster=0, sha256=sha, path=path, input_size=224,
                       mean=tuple(EXPERT_MEAN), std=tuple(EXPERT_STD), label_names=(), heldout_accuracy=None, byte_size=path.stat().st_size)


def timed_score(images, experts, batch_size: int) -> dict:
    """NDSClient.score on ``images``, split by its progress events into sessions / preprocessing / inference."""
    from nds_client.client import NDSClient

    first: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in first:
            first[stage], cpu[stage] = time.perf_counter(), time.process_time()

    with NDSClient("http://127.0.0.1:9", cache_dir=None) as client:  # no server needed: the experts are local
        t0 = time.perf_counter()
        scores = client.score(images, method="rotation", experts=experts, batch_size=batch_size, progress=progress)
        t1, c1 = time.perf_counter(), time.process_time()
    return {
        "inference_cpu": c1 - cpu["score"],
        "preprocess_cpu": cpu["score"] - cpu["preprocess"],
        "sessions": first["preprocess"] - t0,
        "preprocess": first["score"] - first["preprocess"],
        "inference": t1 - first["score"],
        "total": t1 - t0,
        "provider": scores.provider,
        "num_images": scores.num_images,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--experts", type=int, default=50)
    parser.add_argument("--r18-images", type=int, default=1000, help="images run through ResNet-18 (extrapolated to --images)")
    parser.add_argument("--quick", action="store_true", help="200 images, 10 experts, 50 ResNet-18 images")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.experts, args.r18_images = 200, 10, 50
    args.r18_images = min(args.r18_images, args.images)
    console.print(f"client benchmark on {_machine()}", highlight=False)

    with tempfile.TemporaryDirectory(prefix="nds-bench-client-") as tmp:
        work = Path(tmp)
        cache = work / "cache"
        cache.mkdir()
        t = time.perf_counter()
        target = make_target(work, args.images)
        made_s = time.perf_counter() - t
        t = time.perf_counter()
        experts = export_experts(cache, args.experts)
        export_s = time.perf_counter() - t
        r18 = export_resnet18(work)
        console.print(f"setup: {args.images} PNGs in {made_s:.1f} s, {args.experts} experts exported in {export_s:.1f} s", highlight=False)

        ours = timed_score(target, experts, batch_size=256)
        from nds_client.images import list_image_files

        subset = list_image_files(target)[: args.r18_images]
        theirs = timed_score(subset, [r18], batch_size=32)
        expert_bytes = sum(e.path.stat().st_size for e in experts)
        r18_bytes = r18.path.stat().st_size

    n, k = args.images, args.experts
    ours_total = ours["preprocess"] + ours["inference"]
    scale = n / args.r18_images
    r18_pre = theirs["preprocess"] * scale
    r18_inf_one = theirs["inference"] * scale
    r18_total = r18_pre + r18_inf_one * k
    forward = 4 * n * k

    table = Table(title=f"client cost: {n:,} target images x {k} experts x 4 rotations ({forward:,} forward passes), {ours['provider']}")
    for col, justify in (("step", "left"), ("ours: NarrowResNet 64 px", "right"), ("original: ResNet-18 224 px", "right"), ("ratio", "right")):
        table.add_column(col, justify=justify)
    table.add_row("open sessions", f"{ours['sessions']:.2f} s", f"{theirs['sessions'] * k:.2f} s (x{k})", "")
    table.add_row("(a) preprocessing: decode + resize, once", f"{ours['preprocess']:.2f} s", f"{r18_pre:.2f} s", f"{r18_pre / ours['preprocess']:.1f}x")
    table.add_row("(b) inference", f"{ours['inference']:.2f} s", f"{r18_inf_one * k:.1f} s", f"{r18_inf_one * k / ours['inference']:.1f}x")
    table.add_row("    per expert", f"{ours['inference'] / k:.2f} s", f"{r18_inf_one:.2f} s", "")
    table.add_row("    CPU time of (b), all threads", f"{ours['inference_cpu']:.1f} s", f"{theirs['inference_cpu'] * scale * k:.0f} s", "")
    table.add_row("    forward passes / s", f"{forward / ours['inference']:,.0f}", f"{4 * n / r18_inf_one:,.0f}", "")
    table.add_row("[bold](a) + (b)[/]", f"[bold]{ours_total:.1f} s[/]", f"{r18_total:.0f} s", f"[bold]{r18_total / ours_total:.0f}x[/]")
    cores = os.cpu_count() or 1
    ours_cpu = ours["preprocess_cpu"] + ours["inference_cpu"]
    r18_cpu = (theirs["preprocess_cpu"] + theirs["inference_cpu"] * k) * scale
    table.add_row(f"    CPU time of (a) + (b) / {cores} cores", f"{ours_cpu / cores:.1f} s", f"{r18_cpu / cores:.0f} s",
                  f"{r18_cpu / ours_cpu:.0f}x")
    table.add_row("download: experts on disk", f"{expert_bytes / 1e6:.1f} MB", f"{r18_bytes * k / 1e9:.2f} GB (the paper: 2.2 GB)",
                  f"{r18_bytes * k / expert_bytes:.0f}x")
    table.add_row("    per expert", f"{expert_bytes / k / 1e6:.2f} MB", f"{r18_bytes / 1e6:.1f} MB", "")
    console.print(table)
    console.print(
        f"ResNet-18 measured on {args.r18_images} images x 4 rotations "
        f"({theirs['preprocess']:.2f} s preprocessing, {theirs['inference']:.1f} s inference), extrapolated linearly to {n} images and {k} experts.",
        highlight=False,
    )

    summary = Table(title="summary")
    for col in ("benchmark", "figure", "target", "met?"):
        summary.add_column(col)
    summary.add_row(f"score {n:,} images x {k} experts (preprocessing + inference)", f"{ours_total:.1f} s", f"< {TARGET_S:.0f} s",
                    "yes" if ours_total < TARGET_S else "NO")
    summary.add_row("    the same, CPU time / cores (what an idle machine takes)", f"{ours_cpu / cores:.1f} s", f"< {TARGET_S:.0f} s",
                    "yes" if ours_cpu / cores < TARGET_S else "NO")
    summary.add_row(f"vs {k} ResNet-18 experts at 224 px", f"{r18_total / ours_total:.0f}x faster", "", "")
    summary.add_row(f"download of {k} experts", f"{expert_bytes / 1e6:.1f} MB", f"vs {ORIGINAL_DOWNLOAD_BYTES / 1e9:.1f} GB",
                    f"{ORIGINAL_DOWNLOAD_BYTES / expert_bytes:.0f}x smaller" if k == 50 else "")
    console.print(summary)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    console.print(f"load average {load:.1f} at the end: other processes on this machine slow every wall-clock figure above", highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
