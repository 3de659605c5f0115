"""Indexing: embedding throughput, vector upsert, k-means, and `nds index` of 10,000 images end to end.

    .venv/bin/python -m benchmarks.indexing [--images 10000] [--quick]

1. **embedding**: the default backbone's network (a random-init ``NarrowResNet``, width 16,
   blocks (1, 1, 1), feature_dim 128, 64 px) over the same 2,000 random 64x64 images at batch
   256, exported with :func:`nds.catalog.model.export.export_onnx` and run with onnxruntime
   (:func:`nds_client.runtime.create_session` + ``run``, what the server does) versus torch
   eager (:func:`nds.catalog.model.training.embed`), in the same run.
2. **vector upsert**: 100,000 points of dim 128 into a fresh :class:`nds.catalog.vectors.EdgeVectorStore`
   (the points of :mod:`benchmarks.vectors`). Target: under 5 s.
3. **k-means** of 100,000 random unit vectors of dim 128 with faiss, as
   :func:`nds.catalog.indexing.partition` does it (spherical, 25 iterations, then one assignment
   search), for K = 8 and K = 64; next to it scikit-learn's ``KMeans`` (the naive way).
4. **`nds index`** of a 10,000-image, 10-label dataset with K = 8 and the CLI defaults (image
   size 64, epochs 8, width 16), in a fresh ``NDS_HOME``, each command a new process as a user
   runs it: ``nds db upgrade``, ``nds datasets add``, ``nds index NAME --clusters 8 --json``.
   The default backbone is trained on first use: its time is the ``backbone`` step of the job's
   ``seconds``. Target: under 10 minutes for the three commands.

``--quick`` shrinks everything (1,000 images, 20,000 points, 2 expert epochs) for a smoke test
of about a minute. A summary table (benchmark, figure, target, met?) comes last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from benchmarks.vectors import points as vector_points

console = Console(width=None if sys.stdout.isatty() else 150)  # files and pipes: wide enough not to wrap

UPSERT_TARGET_S = 5.0
INDEX_TARGET_S = 600.0
KMEANS_NITER = 25


def _machine() -> str:
    return f"{platform.machine()} with {os.cpu_count()} cores"


# --------------------------------------------------------------------------- 1. embedding


def bench_embedding(work: Path, n_images: int, batch: int = 256, repeats: int = 3) -> dict:
    import onnxruntime as ort
    import torch

    from nds.catalog.model.export import export_onnx
    from nds.catalog.model.nets import NetConfig, build_net
    from nds.catalog.model.training import embed
    from nds_client.preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalize_rows, to_nchw
    from nds_client.runtime import active_provider, create_session, run

    net = NetConfig(width=16, blocks=(1, 1, 1), feature_dim=128, num_outputs=4, input_size=64)
    torch.manual_seed(0)
    model = build_net(net).eval()
    images = np.random.default_rng(0).integers(0, 256, (n_images, 64, 64, 3), dtype=np.uint8)
    path = work / "backbone.onnx"
    t = time.perf_counter()
    export_onnx(model, net, metadata={"task": "embedding"}, path=path)
    export_s = time.perf_counter() - t
    session = create_session(path, prefer_gpu=False)

    def onnx_embed(x: np.ndarray) -> np.ndarray:  # what RotNetBackbone.embed does
        out = np.zeros((len(x), net.feature_dim), np.float32)
        for lo in range(0, len(x), batch):
            _, features = run(session, to_nchw(x[lo : lo + batch], IMAGENET_MEAN, IMAGENET_STD))
            out[lo : lo + batch] = features
        return normalize_rows(out)

    def torch_embed(x: np.ndarray) -> np.ndarray:
        return embed(model, x, (IMAGENET_MEAN, IMAGENET_STD), batch_size=batch)

    # warm up both once, then alternate runs so machine noise hits both alike; keep the best
    onnx_embed(images[:batch])
    torch_embed(images[:batch])
    onnx_times, torch_times = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a = onnx_embed(images)
        onnx_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = torch_embed(images)
        torch_times.append(time.perf_counter() - t)
    return {
        "images": n_images,
        "batch": batch,
        "onnx_s": min(onnx_times),
        "torch_s": min(torch_times),
        "max_diff": float(np.abs(a - b).max()),
        "export_s": export_s,
        "provider": active_provider(session),
        "torch_threads": torch.get_num_threads(),
        "ort_version": ort.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }


# --------------------------------------------------------------------------- 2. vector upsert


def bench_upsert(work: Path, n: int, dim: int = 128) -> dict:
    from nds.catalog.vectors import EdgeVectorStore

    ids, vectors, payloads = vector_points(n, dim)
    store = EdgeVectorStore(work / "edge")
    store.ensure_collection("bench", dim)
    t = time.perf_counter()
    store.upsert("bench", ids, vectors, payloads)
    seconds = time.perf_counter() - t
    count = store.count("bench")
    store.close()
    if count != n:
        raise SystemExit(f"edge store holds {count} points, {n} were upserted")
    return {"points": n, "dim": dim, "seconds": seconds}


# --------------------------------------------------------------------------- 3. k-means


def _unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_kmeans(x: np.ndarray, k: int, **extra) -> tuple[float, float]:
    """Seconds for train + assignment search, the way nds.catalog.indexing.partition does it; and the objective."""
    import faiss

    t = time.perf_counter()
    km = faiss.Kmeans(x.shape[1], k, niter=KMEANS_NITER, seed=1, spherical=True, min_points_per_centroid=1, verbose=False, **extra)
    km.train(x)
    sims, _ = km.index.search(x, 1)
    return time.perf_counter() - t, float(sims[:, 0].mean())


def sklearn_kmeans(x: np.ndarray, k: int) -> tuple[float, float, int]:
    from sklearn.cluster import KMeans

    t = time.perf_counter()
    km = KMeans(n_clusters=k, n_init=1, max_iter=KMEANS_NITER, random_state=1).fit(x)
    seconds = time.perf_counter() - t
    centroids = km.cluster_centers_ / np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True)
    sims = (x * centroids[km.labels_]).sum(axis=1)
    return seconds, float(sims.mean()), int(km.n_iter_)


def bench_kmeans(n: int, dim: int = 128, repeats: int = 3) -> dict:
    """Each variant ``repeats`` times, alternating, keeping the fastest (the machine is shared)."""
    import faiss

    x = _unit_vectors(n, dim)
    out: dict = {"points": n, "dim": dim, "faiss_threads": faiss.omp_get_max_threads(), "repeats": repeats}
    runs = {
        "faiss8": lambda: faiss_kmeans(x, 8),
        "faiss64": lambda: faiss_kmeans(x, 64),
        # faiss trains on at most 256 points per centroid by default (2,048 for K=8): the same on every point
        "faiss8_all": lambda: faiss_kmeans(x, 8, max_points_per_centroid=(n + 7) // 8),
        "sklearn8": lambda: sklearn_kmeans(x, 8),
    }
    for _ in range(repeats):
        for name, call in runs.items():
            got = call()
            if name not in out or got[0] < out[name][0]:
                out[name] = got
    return out


# --------------------------------------------------------------------------- 4. nds index


def write_dataset(root: Path, n_images: int, size: int = 32) -> dict:
    """10 labels; label k holds MNIST digit k and glyph letter 'ABCDEFGHIJ'[k] (40% / 60%)."""
    from nds.samples.domains import GLYPH_LETTERS, build_domain

    per_label = n_images // 10
    n_digits = min(400, round(per_label * 0.4))  # MNIST source variant: 400 images per digit
    n_glyphs = per_label - n_digits
    digits = build_domain("digits", n_digits * 10, size=size, seed=0)
    glyphs = build_domain("glyphs", n_glyphs * 10, size=size, seed=0)
    folders = {}
    for k in range(10):
        letter = GLYPH_LETTERS[k]
        folder = root / f"{k}{letter}"
        folder.mkdir(parents=True, exist_ok=True)
        folders[str(k)] = folders[letter] = folder
    counts: dict[str, int] = {}
    for domain in (digits, glyphs):
        for i, (img, label) in enumerate(zip(domain.images, domain.labels.tolist())):
            folder = folders[label]
            Image.fromarray(img).save(folder / f"{domain.name}-{i:05d}.png", compress_level=1)
            counts[folder.name] = counts.get(folder.name, 0) + 1
    return {"images": sum(counts.values()), "labels": len(counts), "digits_per_label": n_digits, "glyphs_per_label": n_glyphs, "size": size}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _nds(args: list[str], env: dict, cpu: dict[str, float] | None = None, shown: str | None = None) -> tuple[float, str]:
    """Run one nds command in a new process; wall seconds and stdout (its CPU seconds into ``cpu``)."""
    nds = Path(sys.executable).with_name("nds")
    cpu0 = _children_cpu_s()
    t = time.perf_counter()
    proc = subprocess.run([str(nds), *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if cpu is not None:
        cpu[shown or "nds " + " ".join(args)] = _children_cpu_s() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"nds {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def bench_index(work: Path, n_images: int, *, clusters: int, epochs: int | None) -> dict:
    folder = work / "data" / "ten-labels"
    t = time.perf_counter()
    made = write_dataset(folder, n_images)
    made["write_s"] = time.perf_counter() - t
    env = {**os.environ, "NDS_HOME": str(work / "home"), "NDS_DATA_ROOTS": str(work / "data"), "NDS_DATABASE_URL": "", "NDS_BROKER_URL": ""}
    env.pop("NDS_QDRANT_URL", None)
    env.pop("NDS_ARTIFACTS_DIR", None)
    walls: dict[str, float] = {}
    cpu: dict[str, float] = {}
    add_args = ["datasets", "add", "bench", str(folder), "--json"]
    index_args = ["index", "bench", "--clusters", str(clusters), "--json"] + (["--epochs", str(epochs)] if epochs else [])
    for args, shown in ((["db", "upgrade"], "nds db upgrade"), (add_args, "nds datasets add bench FOLDER"), (index_args, "nds " + " ".join(index_args))):
        walls[shown], stdout = _nds(args, env, cpu, shown)
    result = json.loads(stdout)
    (work / "index-result.json").write_text(stdout)
    return {"dataset": made, "walls": walls, "cpu": cpu, "result": result, "train_s": expert_train_seconds(work / "home" / "artifacts"), "epochs": epochs or 8}


def expert_train_seconds(artifacts: Path) -> dict[int | None, float]:
    """{cluster (None: the classifier): training seconds}, read from the exported models' metadata
    (no catalog access, so a schema change by someone else meanwhile cannot break the report)."""
    from nds_client.runtime import read_metadata

    out: dict[int | None, float] = {}
    for path in sorted(artifacts.glob("experts/*/*.onnx")):
        meta = {k: json.loads(v) for k, v in read_metadata(path).items()}
        out[meta.get("cluster")] = float(meta.get("train_seconds") or 0.0)
    return out


# --------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="images of the dataset indexed end to end (default 10,000; 1,000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="shrink everything for a smoke test of about a minute")
    args = parser.parse_args(argv)
    quick = args.quick
    n_images = args.images or (1_000 if quick else 10_000)
    if n_images < 20:
        parser.error("--images must be at least 20")
    n_embed = 500 if quick else 2_000
    n_points = 20_000 if quick else 100_000
    epochs = 2 if quick else None  # None: the CLI default (8)
    clusters = 8
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    summary: list[tuple[str, str, str, str]] = []

    with tempfile.TemporaryDirectory(prefix="nds-bench-indexing-") as tmp:
        work = Path(tmp)

        # 1. embedding
        emb = bench_embedding(work, n_embed)
        onnx_rate, torch_rate = emb["images"] / emb["onnx_s"], emb["images"] / emb["torch_s"]
        table = Table(title=f"1. embedding throughput, default backbone net (random init), {emb['images']:,} images 64x64, batch {emb['batch']}, on {_machine()}")
        for col in ("runtime", "seconds", "images/s", "vs torch"):
            table.add_column(col, justify="left" if col == "runtime" else "right")
        table.add_row(f"onnxruntime {emb['ort_version']} ({emb['provider']})", f"{emb['onnx_s']:.2f}", f"{onnx_rate:,.0f}", f"{onnx_rate / torch_rate:.2f}x")
        table.add_row(f"torch {emb['torch_version']} eager, no_grad ({emb['torch_threads']} threads)", f"{emb['torch_s']:.2f}", f"{torch_rate:,.0f}", "1.00x")
        table.caption = f"best of 3 alternating runs; L2-normalised features differ by at most {emb['max_diff']:.1e}; ONNX export + parity check took {emb['export_s']:.1f} s"
        console.print(table)
        summary.append(("embedding, onnxruntime vs torch eager (64 px, batch 256)", f"{onnx_rate:,.0f} vs {torch_rate:,.0f} images/s ({onnx_rate / torch_rate:.2f}x)", "-", "-"))

        # 2. vector upsert
        ups = bench_upsert(work, n_points)
        met = ups["seconds"] < UPSERT_TARGET_S
        table = Table(title=f"2. vector upsert into a fresh EdgeVectorStore (Qdrant Edge), on {_machine()}")
        for col in ("points", "dim", "seconds", "points/s", "target"):
            table.add_column(col, justify="right")
        table.add_row(f"{ups['points']:,}", str(ups["dim"]), f"{ups['seconds']:.2f}", f"{ups['points'] / ups['seconds']:,.0f}", f"< {UPSERT_TARGET_S:g} s " + ("met" if met else "MISSED"))
        console.print(table)
        summary.append((f"vector upsert, {ups['points']:,} x {ups['dim']}", f"{ups['seconds']:.2f} s ({ups['points'] / ups['seconds']:,.0f} points/s)", f"< {UPSERT_TARGET_S:g} s", "yes" if met else "NO"))

        # 3. k-means
        km = bench_kmeans(n_points)
        table = Table(title=f"3. k-means of {km['points']:,} random unit vectors x {km['dim']}, {KMEANS_NITER} iterations, on {_machine()}")
        for col in ("method", "K", "seconds", "mean cosine to centroid", "vs faiss K=8"):
            table.add_column(col, justify="left" if col == "method" else "right")
        base = km["faiss8"][0]
        table.add_row("faiss.Kmeans spherical + assignment search, as partition()", "8", f"{km['faiss8'][0]:.3f}", f"{km['faiss8'][1]:.4f}", "1.0x")
        table.add_row("same", "64", f"{km['faiss64'][0]:.3f}", f"{km['faiss64'][1]:.4f}", f"{km['faiss64'][0] / base:.1f}x")
        table.add_row("same, trained on every point (max_points_per_centroid=N/K)", "8", f"{km['faiss8_all'][0]:.3f}", f"{km['faiss8_all'][1]:.4f}", f"{km['faiss8_all'][0] / base:.1f}x")
        table.add_row(f"scikit-learn KMeans(n_init=1, max_iter=25), naive ({km['sklearn8'][2]} iter.)", "8",
                      f"{km['sklearn8'][0]:.3f}", f"{km['sklearn8'][1]:.4f}", f"{km['sklearn8'][0] / base:.1f}x")
        table.caption = (f"best of {km['repeats']} alternating runs; faiss uses {km['faiss_threads']} OpenMP threads and by default trains on a sample of 256 points per centroid "
                         f"({min(256 * 8, km['points']):,} for K=8, {min(256 * 64, km['points']):,} for K=64), then assigns every point")
        console.print(table)
        summary.append((f"k-means {km['points']:,} x {km['dim']}, faiss, K=8 / K=64", f"{km['faiss8'][0]:.2f} s / {km['faiss64'][0]:.2f} s", "-", "-"))
        summary.append((f"k-means {km['points']:,} x {km['dim']}, scikit-learn (naive), K=8", f"{km['sklearn8'][0]:.2f} s ({km['sklearn8'][0] / base:.0f}x faiss)", "-", "-"))

        # 4. nds index end to end
        idx = bench_index(work, n_images, clusters=clusters, epochs=epochs)
        ds, result, walls = idx["dataset"], idx["result"], idx["walls"]
        secs = result["seconds"]
        total = sum(walls.values())
        index_wall = list(walls.values())[-1]
        title = (f"4. indexing {ds['images']:,} images ({ds['labels']} labels, {ds['size']}x{ds['size']} PNGs) with K={clusters}, "
                 f"image size 64, epochs {idx['epochs']}, width 16, fresh NDS_HOME, on {_machine()}")
        cpu = idx["cpu"]
        table = Table(title=title)
        table.add_column("step")
        table.add_column("seconds", justify="right")
        table.add_column("share", justify="right")
        table.add_column("CPU seconds (user+sys)", justify="right")
        for name, value in walls.items():
            if name.startswith("nds index"):
                for step, s in secs.items():
                    label = {"backbone": "  backbone (default net trained on first use)"}.get(step, f"  {step}")
                    table.add_row(label, f"{s:.2f}", f"{s / index_wall:.0%}", "")
                accounted = sum(secs.values())
                table.add_row("  rest (process start, imports, commit, ...)", f"{index_wall - accounted:.2f}", f"{(index_wall - accounted) / index_wall:.0%}", "")
            table.add_row(f"[bold]{name}[/bold] (wall)", f"{value:.2f}", "", f"{cpu.get(name, 0):.1f}")
        table.add_row("[bold]total, three commands[/bold]", f"[bold]{total:.2f}[/bold]", "", f"{sum(cpu.values()):.1f}")
        table.caption = (f"label k = MNIST digit k ({ds['digits_per_label']} images) + glyph letter k of A..J "
                         f"({ds['glyphs_per_label']} images) in one folder per label; writing the PNGs took {ds['write_s']:.1f} s, not counted. "
                         f"Shares are of the nds index wall time.")
        console.print(table)

        train_s = idx["train_s"]
        table = Table(title=f"clusters of {result['name']} (index version {result['index_version']}, backbone {result['backbone']['version']})")
        for col in ("cluster", "size", "expert held-out rotation acc.", "train s"):
            table.add_column(col, justify="right")
        for c in result["clusters"]:
            table.add_row(str(c["cluster"]), f"{c['size']:,}", f"{c['heldout_accuracy']:.3f}", f"{train_s.get(c['cluster']) or 0:.1f}")
        classifier = result.get("classifier")
        if classifier:
            table.add_row("label classifier", f"{ds['images']:,}", f"{classifier['heldout_accuracy']:.3f} (label acc., {len(classifier['labels'])} labels)", f"{train_s.get(None) or 0:.1f}")
        backbone = result["backbone"]
        table.caption = (f"default backbone: trained on {backbone.get('trained_on')} images, held-out rotation accuracy "
                         f"{backbone.get('heldout_rotation_accuracy')}; experts step {secs.get('experts', 0):.1f} s of which training "
                         f"{sum(v or 0 for k, v in train_s.items() if k is not None):.1f} s (the rest: ONNX export + parity checks)")
        console.print(table)

        met = total < INDEX_TARGET_S
        summary.append((f"nds db upgrade + datasets add + index, {ds['images']:,} images, {ds['labels']} labels, K={clusters}, epochs {idx['epochs']}",
                        f"{total:.0f} s (index {index_wall:.0f} s, of it backbone {secs.get('backbone', 0):.0f} s)", f"< {INDEX_TARGET_S / 60:g} min", "yes" if met else "NO"))

    table = Table(title=f"summary ({'--quick, ' if quick else ''}{_machine()}, {time.perf_counter() - started:.0f} s for this script)")
    table.caption = f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (above {os.cpu_count()}: other work competed for the CPU)"
    for col in ("benchmark", "figure", "target", "met?"):
        table.add_column(col)
    for row in summary:
        table.add_row(*row)
    console.print(table)
    return 0 if all(row[3] in ("yes", "-") for row in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
