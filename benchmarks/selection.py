"""Does the data the server selects help? Selection precision and transfer accuracy on real images.

    .venv/bin/python -m benchmarks.selection [--quick] [--out benchmarks/results/selection] [--seeds 0,1,2]

The benchmark is a *user* of the product: it builds image folders, registers and indexes
them with the ``nds`` CLI, starts ``nds serve`` and talks to it with the client SDK
(:class:`nds_client.client.NDSClient`), exactly as a practitioner would. Nothing of the retrieval
method is re-implemented here.

1. **pool**: five visual domains built from images that ship inside installed packages
   (:func:`nds.samples.domains.build_pool`: MNIST digits, texture patches, natural-photo
   patches, rendered letter glyphs, LFW faces), 600 images per domain at 32 px, each
   registered as its own source dataset with its labels (``nds datasets add``) and indexed
   (``nds index NAME --clusters 4 --image-size 32``: default backbone, k-means, one rotation
   expert per cluster, a label classifier).
2. **targets**: for digits, glyphs, textures and photos, 400 held-out images
   (:func:`nds.samples.domains.build_target`: disjoint MNIST indices, disjoint fonts, the
   unseen 30% of each texture and photo), split once, stratified: 100 train, 300 test. The
   target is never registered; only its train split is shown to the client.
3. **selection**: per target the SDK scores every rotation expert on the train split
   (``rotation``: no labels; ``linear-probe``: the train labels; ``embedding``: no labels, the
   share of the target nearest each cluster centroid in the backbone space; what the client's
   default, ``auto``, runs is recorded too) and estimates label priors
   (``label_priors``), then queries each budget (10% and 25% of the pool) with each method
   (rotation, linear-probe, each with and without priors, and embedding; the product's defaults otherwise:
   temperature 0.1, sampling with replacement) and downloads the manifest (csv). Baselines:
   a uniform random subset of the same size (without replacement), the whole pool, and no
   pre-training. **Precision** = share of the selected samples (counted with multiplicity)
   whose ``dataset`` is the target's domain.
4. **transfer**: the same small network (:class:`nds.catalog.model.nets.NarrowResNet`, width 16, 32 px,
   as the experts) is pre-trained *supervised* on each selection, with the source labels in
   one multi-domain label space (``dataset:label``, 31 classes, the same head for every
   method), for the same number of optimizer steps whatever the selection's size (so more
   data never means more compute); then fine-tuned (every layer, a new head) on the target's
   train split for a fixed number of steps, and scored on its test split. A linear probe
   (logistic regression on the frozen pre-trained features) is reported too. Seeds 0, 1, 2
   drive the query's sampling, the random subset, initialisation and batch order.
5. **verdict**: the issue's figures per (target, budget, method), and per method over all
   targets. A target that the network solves without any pre-training (fine-tune accuracy
   >= ``SATURATED`` = 0.95 with no pre-training) cannot show what a selection adds: it stays
   in the table but the transfer counts leave it out. The rule looks only at the
   no-pre-training baseline, never at the server's methods.

Why supervised pre-training: the papers' gains (NDS on COCO, Ngiam et al. on JFT/ImageNet)
come from supervised pre-training on the selected source images and their labels; the
source datasets here are labelled, and what the benchmark asks is whether the *images the
server picks* are the ones worth pre-training on. (Rotation pre-training is what the
experts use to score, not what a user pre-trains on.)

Outputs under ``--out``: ``results.md`` (the table and the verdict on each figure of
issue 6), ``accuracy.png`` (one panel per target: accuracy by budget and method, error bars
= std over seeds; second row: precision), ``results.json`` (every run and the config).

``--quick``: two domains (digits, textures), 60 images per domain, tiny budgets, one seed,
no transfer training: the precision check that ``tests/test_selection.py`` runs in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks") / "results" / "selection"
NDS = str(Path(sys.executable).with_name("nds"))

SERVER_METHODS = ("rotation", "linear-probe", "embedding", "rotation+priors", "linear-probe+priors")
RANDOM, WHOLE, NONE = "random", "whole pool", "no pre-training"
SATURATED = 0.95  # fine-tune accuracy without pre-training at or above which a target cannot show a transfer gain
LABELS = {
    "rotation": "NDS rotation",
    "linear-probe": "NDS linear-probe",
    "embedding": "NDS embedding",
    "rotation+priors": "NDS rotation + priors",
    "linear-probe+priors": "NDS linear-probe + priors",
    RANDOM: "random subset",
    WHOLE: "whole pool",
    NONE: "no pre-training",
}


@dataclass(frozen=True)
class Config:
    domains: tuple[str, ...] = ("digits", "textures", "photos", "glyphs", "faces")
    per_domain: int = 600
    targets: tuple[str, ...] = ("digits", "glyphs", "textures", "photos")
    target_size: int = 400  # held-out images per target
    train_per_target: int = 100  # of which the train split (stratified); the rest is the test split
    budgets: tuple[float, ...] = (0.10, 0.25)  # fractions of the pool
    methods: tuple[str, ...] = SERVER_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    # indexing (nds index)
    clusters: int = 4
    index_epochs: int = 30
    image_size: int = 32
    width: int = 16
    # transfer
    transfer: bool = True
    pretrain_steps: int = 300
    finetune_steps: int = 100
    batch_size: int = 64
    finetune_batch: int = 32
    pretrain_lr: float = 2e-3
    finetune_lr: float = 1e-3
    weight_decay: float = 0.05
    # torch threads, for the transfer training here and (OMP_NUM_THREADS) for the nds processes;
    # 1 is several times faster than 2 on a 2-core machine that other jobs share; 0: leave as is
    threads: int = 1
    # data
    pool_seed: int = 0
    target_seed: int = 1
    split_seed: int = 0
    work: str | None = None  # keep the working folder here (default: a temp folder, removed)
    resume: bool = False  # go on from what an interrupted run saved in ``work``

    def budget_sizes(self) -> list[int]:
        pool = self.per_domain * len(self.domains)
        return [max(1, int(round(f * pool))) for f in self.budgets]


QUICK = Config(
    domains=("digits", "textures"),
    per_domain=60,
    targets=("digits", "textures"),
    target_size=40,
    train_per_target=20,
    budgets=(0.1, 0.25),
    seeds=(0,),
    clusters=2,
    index_epochs=30,
    transfer=False,
)


# --------------------------------------------------------------------------- helpers


def _say(echo: Callable[[str], None] | None, text: str) -> None:
    if echo is not None:
        echo(text)


def _env(work: Path, threads: int | None = None) -> dict[str, str]:
    """The embedded default in ``work``: its own catalog, vectors and artifacts; no services.
    ``threads``: OMP_NUM_THREADS for the ``nds`` processes (torch's intra-op threads)."""
    extra = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    return {
        **os.environ,
        **extra,
        "NDS_HOME": str(work / "home"),
        "NDS_DATA_ROOTS": str(work),
        "NDS_ARTIFACTS_DIR": str(work / "home" / "artifacts"),
        "NDS_DATABASE_URL": "",
        "NDS_QDRANT_URL": "",
        "NDS_BROKER_URL": "",
        "COLUMNS": "200",
    }


class Cli:
    """Runs ``nds`` as a user would (a new process per command), logging its output."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.env, self.cwd, self.log = env, cwd, log

    def __call__(self, *args: str, timeout: float = 1800) -> str:
        done = subprocess.run([NDS, *args], env=self.env, cwd=self.cwd, capture_output=True, text=True, timeout=timeout)
        with self.log.open("a") as fh:
            fh.write(f"$ nds {' '.join(args)}\n{done.stdout}{done.stderr}\n")
        if done.returncode != 0:
            raise RuntimeError(f"nds {' '.join(args)} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done.stdout


@contextlib.contextmanager
def serve(env: dict[str, str], cwd: Path, log: Path) -> Iterator[str]:
    """``nds serve`` on a free loopback port; yields its URL; stops it (by its pid) at the end."""
    from nds.api.local_server import LocalServer

    with LocalServer(env, log, cwd=cwd) as server:
        yield server.url


def stratified_split(labels: np.ndarray, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices: classes interleaved round-robin (each shuffled), the first n_train to train."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in sorted(set(labels.tolist()))]
    order = [p[i] for i in range(max(len(p) for p in per_class)) for p in per_class if i < len(p)]
    order = np.asarray(order, dtype=np.int64)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def _folder_images(root: Path, size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """ROOT/<label>/<image> -> (real paths, uint8 images, labels), in sorted path order."""
    from nds_client.images import list_image_files, load_images

    paths = sorted(os.path.realpath(p) for p in list_image_files(root))
    loaded = load_images(paths, size, workers=4)
    if len(loaded.index) != len(paths):
        raise RuntimeError(f"{len(paths) - len(loaded.index)} images under {root} could not be read")
    labels = np.array([Path(p).parent.name for p in paths])
    return paths, loaded.images, labels


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


# --------------------------------------------------------------------------- transfer


class Transfer:
    """Pre-train on a selection of the pool, fine-tune / linear-probe on a target.

    Pre-training is a pure function of (the selection as a multiset of pool images, seed), so
    identical selections (e.g. two methods that pick the same samples) are trained once."""

    def __init__(self, config: Config, pool_images: np.ndarray, pool_classes: np.ndarray, num_classes: int) -> None:
        import torch

        from nds_client.preprocessing import IMAGENET_MEAN, IMAGENET_STD

        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        from nds.catalog.model.training import cpu_has_native_bf16

        self.bf16 = cpu_has_native_bf16()
        self.norm = (IMAGENET_MEAN, IMAGENET_STD)
        self.pool_x = self._tensor(pool_images)  # (N, 3, S, S) float32, normalised
        self.pool_y = torch.from_numpy(pool_classes.astype(np.int64))
        self.num_classes = num_classes
        self._cache: dict[str, dict] = {}
        self.pretrain_seconds = 0.0
        self.finetune_seconds = 0.0
        self.pretrain_runs = 0
        self.finetune_runs = 0

    def _tensor(self, images: np.ndarray):
        from nds.catalog.model.training import to_tensor

        return to_tensor(images, self.norm)

    def _net(self, num_outputs: int, seed: int):
        import torch

        from nds.catalog.model.nets import NetConfig, build_net

        net = NetConfig(width=self.config.width, blocks=(1, 1, 1), feature_dim=128, num_outputs=num_outputs,
                        input_size=self.config.image_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_net(net)
        return model

    @staticmethod
    def _crop(x, gen):
        """Random crop after reflect-padding by 1/8 of the side (no flips: digits and letters are not mirror-symmetric)."""
        import torch
        import torch.nn.functional as F

        b, _, s, _ = x.shape
        pad = max(1, s // 8)
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        off = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
        return torch.stack([padded[i, :, off[i, 0] : off[i, 0] + s, off[i, 1] : off[i, 1] + s] for i in range(b)])

    def _fit(self, model, x, y, *, steps: int, batch: int, lr: float, seed: int) -> None:
        """AdamW, linear warm-up (5%) then cosine decay, ``steps`` steps of ``batch`` samples drawn
        epoch by epoch (a fresh permutation each epoch)."""
        import torch
        import torch.nn.functional as F

        gen = torch.Generator().manual_seed(seed + 1)
        model = model.to(memory_format=torch.channels_last).train()
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        warmup = max(1, int(0.05 * steps))
        n = len(x)
        perm, pos = torch.randperm(n, generator=gen), 0
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * (step + 1) / warmup if step < warmup else lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
            if pos + batch > n and pos > 0:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos : pos + batch]
            pos += batch
            xb = self._crop(x[idx], gen).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):  # as the product trains, where the CPU has bf16
                logits, _ = model(xb)
            loss = F.cross_entropy(logits.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()

    def pretrain(self, selection: np.ndarray, seed: int) -> dict | None:
        """State dict of the network pre-trained on pool[selection] (indices, repeats allowed)."""
        key = hashlib.sha256(np.sort(selection).astype(np.int64).tobytes() + str(seed).encode()).hexdigest()
        if key not in self._cache:
            import torch

            t = time.perf_counter()
            sel = torch.from_numpy(np.asarray(selection, dtype=np.int64))
            model = self._net(self.num_classes, seed)
            self._fit(model, self.pool_x[sel], self.pool_y[sel], steps=self.config.pretrain_steps,
                      batch=self.config.batch_size, lr=self.config.pretrain_lr, seed=seed)
            self._cache[key] = {k: v.clone() for k, v in model.state_dict().items()}
            self.pretrain_seconds += time.perf_counter() - t
            self.pretrain_runs += 1
        return self._cache[key]

    def evaluate(self, state: dict | None, target: dict, seed: int) -> dict[str, float]:
        """Fine-tune (all layers, new head) on the target's train split; test accuracy. And a
        linear probe on the frozen features of the pre-trained (or random-init) network."""
        import torch
        from torch import nn

        t = time.perf_counter()
        model = self._net(self.num_classes, seed)
        if state is not None:
            model.load_state_dict(state)
        probe = self._probe(model, target)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 + seed)
            model.head = nn.Linear(model.head.in_features, target["num_classes"])
        self._fit(model, target["train_x"], target["train_y"], steps=self.config.finetune_steps,
                  batch=self.config.finetune_batch, lr=self.config.finetune_lr, seed=10_000 + seed)
        with torch.no_grad():
            pred = torch.cat([model(target["test_x"][i : i + 256])[0].argmax(1) for i in range(0, len(target["test_x"]), 256)])
        acc = float((pred == target["test_y"]).float().mean())
        self.finetune_seconds += time.perf_counter() - t
        self.finetune_runs += 1
        return {"finetune": acc, "probe": probe}

    @staticmethod
    def _probe(model, target: dict) -> float:
        import torch
        import torch.nn.functional as F
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model.eval()
        with torch.no_grad():
            f_train = F.normalize(model(target["train_x"])[1], dim=1).numpy()
            f_test = torch.cat([F.normalize(model(target["test_x"][i : i + 256])[1], dim=1) for i in range(0, len(target["test_x"]), 256)]).numpy()
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(f_train, target["train_y"].numpy())
        return float(clf.score(f_test, target["test_y"].numpy()))


# --------------------------------------------------------------------------- the benchmark


def _select(config: Config, work: Path, budgets: list[int], echo: Callable[[str], None] | None) -> dict[str, Any]:
    """Stages 1-3: build the images, register and index them with the CLI, then (as a client,
    against ``nds serve``) score, estimate priors, query and fetch every manifest."""
    from nds.samples.domains import build_pool, build_target
    from nds_client.client import NDSClient
    from nds_client.manifest_dataset import read_manifest

    timings: dict[str, float] = {}
    pool_size = config.per_domain * len(config.domains)

    # ---- 1. data: the pool and the held-out targets, from packaged images
    t = time.perf_counter()
    pool_dirs = build_pool(work / "sources", per_domain=config.per_domain, size=config.image_size,
                           seed=config.pool_seed, domains=config.domains)
    target_dirs = {d: build_target(work / "targets", d, n=config.target_size, size=config.image_size, seed=config.target_seed)
                   for d in config.targets}
    timings["build images"] = time.perf_counter() - t
    _say(echo, f"pool: {len(config.domains)} domains x {config.per_domain} images = {pool_size}; "
               f"targets: {', '.join(config.targets)} ({config.target_size} each, {config.train_per_target} train); work: {work}")

    # ---- 2. the product: register and index every domain with the CLI
    env = _env(work, config.threads)
    cli = Cli(env, work, work / "nds.log")
    t = time.perf_counter()
    cli("db", "upgrade")
    for name, folder in pool_dirs.items():
        cli("datasets", "add", name, str(folder), "--source", "imagefolder", "--description", f"sample domain {name}")
    timings["register (nds datasets add)"] = time.perf_counter() - t
    index: dict[str, dict] = {}
    t = time.perf_counter()
    for name in pool_dirs:
        t1 = time.perf_counter()
        out = cli("index", name, "--clusters", str(config.clusters), "--epochs", str(config.index_epochs),
                  "--image-size", str(config.image_size), "--width", str(config.width), "--json")
        index[name] = json.loads(out[out.index("{"):])
        accs = ", ".join(f"{c['heldout_accuracy']:.2f}" for c in index[name]["clusters"])
        _say(echo, f"  indexed {name} in {time.perf_counter() - t1:.0f} s: experts' held-out rotation accuracy {accs}")
    timings["index (nds index)"] = time.perf_counter() - t

    # ---- 3. the client: score, priors, query, manifest (the target's train split only)
    selections: dict[str, dict] = {}
    scoring: dict[str, dict] = {}
    t = time.perf_counter()
    with serve(env, work, work / "serve.log") as url, NDSClient(url, cache_dir=work / "cache", timeout=300) as client:
        experts = client.pull_experts()
        for tname, folder in target_dirs.items():
            paths, _, labels = _folder_images(folder, config.image_size)
            train, _ = stratified_split(labels, config.train_per_target, config.split_seed)
            train_paths = [paths[i] for i in train]
            train_labels = [str(labels[i]) for i in train]
            default = client.score(train_paths, experts=experts)  # what a user gets without --method
            ran = {default.method: default}  # the method auto chose is not scored twice
            rot = ran.get("rotation") or client.score(train_paths, method="rotation", experts=experts)
            lp = client.score(train_paths, labels=train_labels, method="linear-probe", experts=experts)
            emb = ran.get("embedding") or client.score(train_paths, method="embedding", experts=experts)
            priors = client.label_priors(train_paths, experts=experts)
            scoring[tname] = {
                "default_method": default.method,
                "rotation": [{"dataset": e["dataset"], "cluster": e["cluster"], "score": round(e["score"], 4),
                              "heldout": e["heldout_accuracy"]} for e in rot.ranked()],
                "linear-probe": [{"dataset": e["dataset"], "cluster": e["cluster"], "score": round(e["score"], 4)}
                                 for e in lp.ranked()],
                "embedding": [{"dataset": e["dataset"], "cluster": e["cluster"], "score": round(e["score"], 4)}
                              for e in emb.ranked()],
            }
            by_method = {"rotation": rot, "linear-probe": lp, "embedding": emb}
            best_rot, best_lp = rot.ranked()[0], lp.ranked()[0]
            _say(echo, f"target {tname}: best rotation expert {best_rot['dataset']}/{best_rot['cluster']} "
                       f"({best_rot['score']:.3f}); best linear-probe expert {best_lp['dataset']}/{best_lp['cluster']} ({best_lp['score']:.3f})")
            for method in config.methods:
                base = by_method[method.split("+")[0]]
                use_priors = priors if method.endswith("+priors") else None
                for budget in budgets:
                    for seed in config.seeds:
                        query = client.query(base, budget=budget, label_priors=use_priors, seed=seed)
                        path = work / "manifests" / f"{tname}-{method}-{budget}-{seed}.csv"
                        client.manifest(query["id"], path)
                        rows = read_manifest(path)
                        selections[_key(tname, budget, method, seed)] = {
                            "uris": [os.path.realpath(r["uri"]) for r in rows],
                            "counts": [int(r["count"]) for r in rows],
                            "datasets": [r["dataset"] for r in rows],
                        }
    timings["select (score, priors, query, manifest)"] = time.perf_counter() - t
    return {"index": index, "scoring": scoring, "selections": selections, "timings": timings}


def _key(target: str, budget: int, method: str, seed: int) -> str:
    return f"{target}|{budget}|{method}|{seed}"


STAGE_FILE = "selection-stage.json"  # under --work: stages 1-3, for --resume
RUNS_FILE = "transfer-runs.jsonl"  # under --work: one finished transfer run a line, for --resume


def run(config: Config, *, echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Build the data, drive the product, select, (optionally) train; returns the results dict.

    With ``config.work`` and ``config.resume``, a run that was interrupted goes on from what it
    saved there: the selections (stages 1-3) and every finished transfer run."""
    started = time.perf_counter()
    for t in config.targets:
        if t not in config.domains:
            raise ValueError(f"target {t!r} is not a pool domain ({', '.join(config.domains)})")
    if config.resume and not config.work:
        raise ValueError("resume needs a work folder (--work DIR) kept from the interrupted run")
    budgets = config.budget_sizes()
    pool_size = config.per_domain * len(config.domains)

    with contextlib.ExitStack() as stack:
        if config.work:
            work = Path(config.work).resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nds-selection-"))).resolve()
        stage_file, runs_file = work / STAGE_FILE, work / RUNS_FILE
        resumed = bool(config.resume and stage_file.exists())
        if resumed:
            stage = json.loads(stage_file.read_text())
            if stage.get("config") != _config_dict(config, for_resume=True):
                raise ValueError(f"{stage_file} was written by a run with another configuration; start afresh")
            _say(echo, f"resuming from {stage_file}")
        else:
            runs_file.unlink(missing_ok=True)
            stage = _select(config, work, budgets, echo)
            if config.work:
                stage["config"] = _config_dict(config, for_resume=True)
                stage_file.write_text(json.dumps(stage))
        index, scoring, selections, timings = stage["index"], stage["scoring"], stage["selections"], dict(stage["timings"])
        pool_dirs = {d: work / "sources" / d for d in config.domains}
        target_classes: dict[str, int] = {}
        targets: dict[str, dict] = {}
        for tname in config.targets:
            _, images, labels = _folder_images(work / "targets" / tname, config.image_size)
            train, test = stratified_split(labels, config.train_per_target, config.split_seed)
            targets[tname] = {"images": images, "labels": labels, "train": train, "test": test}
            target_classes[tname] = len(set(labels.tolist()))

        # ---- 4. precision (and the random baseline's)
        pool_paths: list[str] = []
        pool_domain: list[str] = []
        pool_label: list[str] = []
        pool_imgs: list[np.ndarray] = []
        for name, folder in pool_dirs.items():
            paths, images, labels = _folder_images(folder, config.image_size)
            pool_paths += paths
            pool_domain += [name] * len(paths)
            pool_label += labels.tolist()
            pool_imgs.append(images)
        pool_domain_a = np.array(pool_domain)
        where = {p: i for i, p in enumerate(pool_paths)}
        runs: list[dict[str, Any]] = []
        random_sel: dict[tuple[int, int], np.ndarray] = {}
        for budget in budgets:
            for seed in config.seeds:
                random_sel[(budget, seed)] = np.sort(np.random.default_rng(seed).choice(pool_size, size=budget, replace=False))

        def shares(idx: np.ndarray) -> dict[str, float]:
            return {d: round(float((pool_domain_a[idx] == d).mean()), 4) for d in config.domains}

        selected_idx: dict[tuple[str, int, str, int], np.ndarray] = {}
        for tname in config.targets:
            for budget, frac in zip(budgets, config.budgets):
                for method in config.methods:
                    for seed in config.seeds:
                        s = selections[_key(tname, budget, method, seed)]
                        idx = np.repeat(np.array([where[u] for u in s["uris"]], dtype=np.int64), s["counts"])
                        selected_idx[(tname, budget, method, seed)] = idx
                        runs.append({"target": tname, "budget": budget, "fraction": frac, "method": method, "seed": seed,
                                     "precision": float((pool_domain_a[idx] == tname).mean()), "unique": int(len(s["uris"])),
                                     "shares": shares(idx)})
                for seed in config.seeds:
                    idx = random_sel[(budget, seed)]
                    runs.append({"target": tname, "budget": budget, "fraction": frac, "method": RANDOM, "seed": seed,
                                 "precision": float((pool_domain_a[idx] == tname).mean()), "unique": int(len(idx)),
                                 "shares": shares(idx)})
            for seed in config.seeds:
                runs.append({"target": tname, "budget": pool_size, "fraction": 1.0, "method": WHOLE, "seed": seed,
                             "precision": config.per_domain / pool_size, "unique": pool_size, "shares": None})
                runs.append({"target": tname, "budget": 0, "fraction": 0.0, "method": NONE, "seed": seed,
                             "precision": None, "unique": 0, "shares": None})

        # ---- 5. transfer: pre-train on each selection, fine-tune / probe on the target
        transfer_info: dict[str, Any] | None = None
        if config.transfer:
            t = time.perf_counter()
            classes = sorted({f"{d}:{lab}" for d, lab in zip(pool_domain, pool_label)})
            cls_index = {c: i for i, c in enumerate(classes)}
            pool_cls = np.array([cls_index[f"{d}:{lab}"] for d, lab in zip(pool_domain, pool_label)])
            tr = Transfer(config, np.concatenate(pool_imgs), pool_cls, len(classes))
            import torch

            tdata = {}
            for tname, tg in targets.items():
                names = sorted(set(tg["labels"].tolist()))
                y = np.array([names.index(v) for v in tg["labels"]])
                tdata[tname] = {
                    "train_x": tr._tensor(tg["images"][tg["train"]]), "train_y": torch.from_numpy(y[tg["train"]]),
                    "test_x": tr._tensor(tg["images"][tg["test"]]), "test_y": torch.from_numpy(y[tg["test"]]),
                    "num_classes": len(names),
                }
            done: dict[str, dict] = {}
            if resumed and runs_file.exists():
                for line in runs_file.read_text().splitlines():
                    with contextlib.suppress(json.JSONDecodeError):  # a line cut short by the interruption
                        item = json.loads(line)
                        done[item["key"]] = item["result"]
            total = len(runs)
            for k, r in enumerate(runs, start=1):
                seed, tname = r["seed"], r["target"]
                key = _key(tname, r["budget"], r["method"], seed)
                if key in done:
                    r.update(done[key])
                    continue
                if r["method"] == NONE:
                    state = None
                elif r["method"] == WHOLE:
                    state = tr.pretrain(np.arange(pool_size), seed)
                elif r["method"] == RANDOM:
                    state = tr.pretrain(random_sel[(r["budget"], seed)], seed)
                else:
                    state = tr.pretrain(selected_idx[(tname, r["budget"], r["method"], seed)], seed)
                result = tr.evaluate(state, tdata[tname], seed)
                r.update(result)
                if config.work:
                    with runs_file.open("a") as fh:
                        fh.write(json.dumps({"key": key, "result": result}) + "\n")
                if echo is not None and (k % 10 == 0 or k == total):
                    elapsed = time.perf_counter() - t
                    echo(f"  transfer {k}/{total} runs, {elapsed:.0f} s ({tr.pretrain_runs} pre-trainings, {tr.finetune_runs} fine-tunings)")
            timings["transfer (pre-train + fine-tune)"] = time.perf_counter() - t
            transfer_info = {
                "pool_classes": len(classes), "pretrain_runs": tr.pretrain_runs, "finetune_runs": tr.finetune_runs,
                "pretrain_seconds": round(tr.pretrain_seconds, 1), "finetune_seconds": round(tr.finetune_seconds, 1),
                "resumed_runs": len(done),
            }

    timings["total"] = time.perf_counter() - started
    results = {
        "config": _config_dict(config),
        "resumed": resumed,
        "budgets": budgets,
        "pool_size": pool_size,
        "index": {d: {"clusters": v["clusters"], "classifier": v.get("classifier"), "seconds": v.get("seconds")} for d, v in index.items()},
        "scores": scoring,
        "target_classes": target_classes,
        "runs": runs,
        "summary": summarize(runs, config),
        "transfer": transfer_info,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "machine": _machine(),
    }
    results["verdict"] = verdict(results) if config.transfer else precision_verdict(results)
    return results


def _config_dict(config: Config, *, for_resume: bool = False) -> dict[str, Any]:
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    if for_resume:  # what may differ between an interrupted run and its resumption
        for k in ("work", "resume", "threads"):
            d.pop(k, None)
    return d


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the end, no GPU used"


# --------------------------------------------------------------------------- summary


def _order(method: str) -> int:
    order = [NONE, RANDOM, *SERVER_METHODS, WHOLE]
    return order.index(method) if method in order else len(order)


def summarize(runs: list[dict[str, Any]], config: Config) -> list[dict[str, Any]]:
    """Mean and std over seeds per (target, budget, method)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["target"], r["budget"], r["method"])].append(r)
    out = []
    for (tname, budget, method), rs in groups.items():
        row: dict[str, Any] = {"target": tname, "budget": budget, "fraction": rs[0]["fraction"], "method": method, "seeds": len(rs)}
        row["precision"], row["precision_std"] = _mean_std([r["precision"] for r in rs])
        row["unique"] = float(np.mean([r["unique"] for r in rs]))
        for key in ("finetune", "probe"):
            if all(key in r for r in rs):
                row[key], row[f"{key}_std"] = _mean_std([r[key] for r in rs])
        out.append(row)
    targets = list(config.targets)
    out.sort(key=lambda r: (targets.index(r["target"]), r["budget"] if r["method"] not in (NONE, WHOLE) else (-1 if r["method"] == NONE else 1e12), _order(r["method"])))
    return out


def _find(summary: list[dict], target: str, method: str, budget: int | None = None) -> dict | None:
    for r in summary:
        if r["target"] == target and r["method"] == method and (budget is None or r["budget"] == budget):
            return r
    return None


def precision_verdict(results: dict[str, Any]) -> dict[str, Any]:
    summary = results["summary"]
    out = {}
    for r in summary:
        if r["method"] in SERVER_METHODS:
            out.setdefault(r["target"], {})[f"{r['method']}@{r['budget']}"] = round(r["precision"], 4)
    return {"precision": out}


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's three figures, checked per target, budget and server method."""
    summary, budgets = results["summary"], results["budgets"]
    targets = results["config"]["targets"]
    methods = [m for m in results["config"]["methods"]]
    prec, margin, vs_whole = [], [], []
    for tname in targets:
        whole = _find(summary, tname, WHOLE)
        for budget in budgets:
            rnd = _find(summary, tname, RANDOM, budget)
            for m in methods:
                r = _find(summary, tname, m, budget)
                prec.append({"target": tname, "budget": budget, "method": m, "precision": r["precision"], "met": r["precision"] >= 0.9})
                spread = max(r["finetune_std"], rnd["finetune_std"])
                gain = r["finetune"] - rnd["finetune"]
                margin.append({"target": tname, "budget": budget, "method": m, "gain": gain, "spread": spread, "met": gain > spread})
                vs_whole.append({"target": tname, "budget": budget, "method": m, "diff": r["finetune"] - whole["finetune"],
                                 "met": r["finetune"] >= whole["finetune"]})
    # A target that the network already solves without any pre-training cannot show what a
    # selection adds: it is reported, but the "every target" figures count the others. The rule
    # looks only at the no-pre-training baseline, never at the server's methods.
    saturated = sorted(t for t in targets if (_find(summary, t, NONE) or {}).get("finetune", 0.0) >= SATURATED)
    informative = [t for t in targets if t not in saturated]

    def met_on(cells: list[dict], method: str, among: list[str]) -> list[str]:
        """The targets among ``among`` where ``method`` meets the figure at every budget."""
        return sorted(t for t in among if all(x["met"] for x in cells if x["method"] == method and x["target"] == t))

    per_method = {m: {"precision_targets": met_on(prec, m, targets), "margin_targets": met_on(margin, m, informative),
                      "whole_targets": sorted(t for t in targets if any(x["met"] for x in vs_whole if x["method"] == m and x["target"] == t)),
                      "informative": informative}
                  for m in methods}
    # The client's default (``--method auto``) picks the method per target; its selections are
    # those of the method it picked.
    default = {t: results["scores"].get(t, {}).get("default_method") for t in targets}
    default_met = sorted(t for t in targets if t in per_method.get(default[t], {}).get("precision_targets", ()))
    return {"precision": prec, "margin_over_random": margin, "vs_whole_pool": vs_whole, "saturated": saturated, "per_method": per_method,
            "default": {"method": default, "precision_targets": default_met}}


def _pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    has_transfer = results.get("transfer") is not None
    lines = [
        "# Selection benchmark: does the data the server picks help?",
        "",
        f"Pool: {len(cfg['domains'])} domains ({', '.join(cfg['domains'])}) x {cfg['per_domain']} images = "
        f"{results['pool_size']} source images at {cfg['image_size']} px, each domain a registered dataset indexed with "
        f"`nds index NAME --clusters {cfg['clusters']} --epochs {cfg['index_epochs']} --image-size {cfg['image_size']} --width {cfg['width']}`. "
        f"Targets: {', '.join(cfg['targets'])}, {cfg['target_size']} held-out images each, {cfg['train_per_target']} train "
        f"(scored by the client, fine-tuned on) and {cfg['target_size'] - cfg['train_per_target']} test. "
        f"Budgets: {', '.join(f'{b} ({f:.0%})' for b, f in zip(results['budgets'], cfg['budgets']))}. "
        f"Seeds: {', '.join(map(str, cfg['seeds']))}.",
        "",
    ]
    if has_transfer:
        lines += [
            f"Transfer: NarrowResNet (width {cfg['width']}, {cfg['image_size']} px) pre-trained supervised on the selection "
            f"(labels `dataset:label`, {results['transfer']['pool_classes']} classes) for {cfg['pretrain_steps']} steps of "
            f"{cfg['batch_size']} images whatever the selection's size, then fine-tuned (all layers, new head) for "
            f"{cfg['finetune_steps']} steps of {cfg['finetune_batch']} on the target's train split; accuracy on its test split. "
            "Linear probe: logistic regression on the frozen pre-trained features. Mean ± std over seeds.",
            "",
            "Precision: share of the selected samples (with multiplicity) from the target's domain. "
            "Unique: distinct images in the selection (the server samples with replacement, its default).",
            "",
            "| target | budget | method | precision | unique | fine-tune acc. | linear-probe acc. |",
            "|---|---|---|---|---|---|---|",
        ]
    else:
        lines += ["| target | budget | method | precision | unique |", "|---|---|---|---|---|"]
    for r in results["summary"]:
        budget = "-" if r["method"] == NONE else "all" if r["method"] == WHOLE else f"{r['budget']} ({r['fraction']:.0%})"
        prec = "-" if r["method"] == NONE else f"{r['precision']:.3f}" if r["seeds"] == 1 or r["method"] == WHOLE else _pm(r["precision"], r["precision_std"])
        row = f"| {r['target']} | {budget} | {LABELS.get(r['method'], r['method'])} | {prec} | {r['unique']:.0f} |"
        if has_transfer:
            row += f" {_pm(r.get('finetune'), r.get('finetune_std'))} | {_pm(r.get('probe'), r.get('probe_std'))} |"
        lines.append(row)
    if has_transfer:
        v = results["verdict"]
        lines += ["", "## The issue's figures", ""]
        p_ok = [x for x in v["precision"] if x["met"]]
        lines.append(f"- **Precision >= 0.9** (target's domain in the pool): {len(p_ok)} of {len(v['precision'])} "
                     "(target, budget, method) cells.")
        if v.get("default"):
            chosen = ", ".join(f"{t}: {m or 'not recorded'}" for t, m in v["default"]["method"].items())
            met = v["default"]["precision_targets"]
            lines.append(f"  - the client's default (`nds score` without `--method`, i.e. `auto`) scored with {chosen}; "
                         f"its selections reach precision >= 0.9 at every budget on {len(met)} of {len(cfg['targets'])} targets"
                         f"{': ' + ', '.join(met) if met else ''}.")
        for x in v["precision"]:
            if not x["met"]:
                lines.append(f"  - missed: {x['target']}, budget {x['budget']}, {LABELS[x['method']]}: {x['precision']:.3f}")
        m_ok = [x for x in v["margin_over_random"] if x["met"]]
        lines.append(f"- **Fine-tune accuracy above the random subset by more than the seed spread**: "
                     f"{len(m_ok)} of {len(v['margin_over_random'])} cells.")
        for x in v["margin_over_random"]:
            lines.append(f"  - {'met' if x['met'] else 'missed'}: {x['target']}, budget {x['budget']}, {LABELS[x['method']]}: "
                         f"{x['gain']:+.3f} (spread {x['spread']:.3f})")
        w_ok = sorted({x["target"] for x in v["vs_whole_pool"] if x["met"]})
        lines.append(f"- **At or above the whole pool on at least one target**: "
                     f"{'met on ' + ', '.join(w_ok) if w_ok else 'missed on every target'}.")
        for x in v["vs_whole_pool"]:
            lines.append(f"  - {x['target']}, budget {x['budget']}, {LABELS[x['method']]}: {x['diff']:+.3f} vs whole pool")
        lines += ["", "## Per method, over all targets", ""]
        if v.get("saturated"):
            lines.append(f"Saturated targets (no pre-training already reaches {SATURATED} fine-tune accuracy, so no selection can "
                         f"show a gain; reported above, left out of the transfer counts): {', '.join(v['saturated'])}.")
            lines.append("")
        lines += ["| method | precision >= 0.9 at every budget | above random by more than the spread at every budget | at or above the whole pool |",
                  "|---|---|---|---|"]
        for m, pm in v.get("per_method", {}).items():
            lines.append(f"| {LABELS[m]} | {len(pm['precision_targets'])} of {len(cfg['targets'])}: {', '.join(pm['precision_targets']) or '-'} "
                         f"| {len(pm['margin_targets'])} of {len(pm['informative'])}: {', '.join(pm['margin_targets']) or '-'} "
                         f"| {', '.join(pm['whole_targets']) or '-'} |")
        lines += ["", "## Expert scores per target (best first)", ""]
        for tname, sc in results["scores"].items():
            rot = ", ".join(f"{e['dataset']}/{e['cluster']} {e['score']:.3f}" for e in sc["rotation"][:6])
            lp = ", ".join(f"{e['dataset']}/{e['cluster']} {e['score']:.3f}" for e in sc["linear-probe"][:6])
            emb = ", ".join(f"{e['dataset']}/{e['cluster']} {e['score']:.3f}" for e in sc.get("embedding", [])[:6])
            lines.append(f"- {tname}: rotation {rot}; linear-probe {lp}; embedding (share of the target nearest each cluster) {emb}")
    lines += ["", "## Run", ""]
    lines.append("Time per stage (s): " + ", ".join(f"{k} {v}" for k, v in results["timings"].items()) + ".")
    if has_transfer:
        tr = results["transfer"]
        lines.append(f"Transfer: {tr['pretrain_runs']} pre-trainings ({tr['pretrain_seconds']} s), "
                     f"{tr['finetune_runs']} fine-tunings and probes ({tr['finetune_seconds']} s).")
    if results.get("resumed"):
        lines.append("This run was interrupted and resumed (`--resume`): the times above cover only the resumed part.")
    lines.append(f"Machine: {results['machine']}.")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, summary = results["config"], results["summary"]
    targets = cfg["targets"]
    fig, axes = plt.subplots(2, len(targets), figsize=(4.6 * len(targets), 7.6), squeeze=False, sharex=True)
    colours = {"rotation": "C0", "linear-probe": "C1", "embedding": "C3", "rotation+priors": "C2", "linear-probe+priors": "C4", RANDOM: "C7"}
    xs = [100 * f for f in cfg["budgets"]]
    for j, tname in enumerate(targets):
        ax, axp = axes[0, j], axes[1, j]
        for k, m in enumerate([*cfg["methods"], RANDOM]):
            rows = [_find(summary, tname, m, b) for b in results["budgets"]]
            dx = (k - 2) * 0.35
            ax.errorbar([x + dx for x in xs], [r["finetune"] for r in rows], yerr=[r["finetune_std"] for r in rows],
                        marker="o", capsize=3, color=colours[m], label=LABELS[m], linestyle="--" if m == RANDOM else "-")
            axp.errorbar([x + dx for x in xs], [r["precision"] for r in rows], yerr=[r["precision_std"] for r in rows],
                         marker="o", capsize=3, color=colours[m], linestyle="--" if m == RANDOM else "-")
        for m, colour in ((WHOLE, "k"), (NONE, "C3")):
            r = _find(summary, tname, m)
            ax.axhline(r["finetune"], color=colour, linestyle=":", label=f"{LABELS[m]} ({r['finetune']:.2f})")
            ax.axhspan(r["finetune"] - r["finetune_std"], r["finetune"] + r["finetune_std"], color=colour, alpha=0.08)
        n_classes = results.get("target_classes", {}).get(tname)
        if n_classes:
            ax.axhline(1.0 / n_classes, color="0.5", linestyle="-.", linewidth=0.8, label=f"chance ({1.0 / n_classes:.2f})")
        saturated = tname in (results.get("verdict") or {}).get("saturated", [])
        ax.set_title(f"target: {tname}" + (" (saturated)" if saturated else ""))
        ax.set_ylabel("fine-tune test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        axp.axhline(0.9, color="k", linestyle=":", linewidth=1)
        axp.set_ylim(0, 1.05)
        axp.set_ylabel("precision (share from target's domain)")
        axp.set_xlabel("budget (% of the pool)")
        axp.set_xticks(xs)
        axp.grid(alpha=0.3)
    fig.suptitle(f"Pre-training on the server's selection vs random / whole pool / none (mean ± std over {len(cfg['seeds'])} seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "md": out / "results.md"}
    files["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    files["md"].write_text(markdown(results))
    if results.get("transfer") is not None:
        files["png"] = chart(results, out / "accuracy.png")
    return files


# --------------------------------------------------------------------------- CLI


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _strs(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.selection", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two domains, tiny budgets, one seed, no transfer (the CI check)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT}; --quick: {DEFAULT_OUT}-quick)")
    parser.add_argument("--seeds", type=_ints, default=None, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--targets", type=_strs, default=None, help="comma-separated target domains")
    parser.add_argument("--per-domain", type=int, default=None, help="source images per domain")
    parser.add_argument("--index-epochs", type=int, default=None, help="epochs per expert (nds index --epochs)")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--no-transfer", action="store_true", help="selection precision only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads here and OMP_NUM_THREADS for the nds processes (default 1; 0: leave as is)")
    parser.add_argument("--work", default=None, help="keep the working folder (images, catalog, manifests, logs) here")
    parser.add_argument("--resume", action="store_true", help="go on from what an interrupted run saved in --work")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the nds processes this run started are stopped, the temp folder removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    config = QUICK if args.quick else Config()
    overrides = {"seeds": args.seeds, "targets": args.targets, "per_domain": args.per_domain, "index_epochs": args.index_epochs,
                 "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps, "threads": args.threads, "work": args.work}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_transfer:
        config = replace(config, transfer=False)
    if args.resume:
        if not args.work:
            parser.error("--resume needs --work DIR (the interrupted run's folder)")
        config = replace(config, resume=True)
    out = args.out or Path(f"{DEFAULT_OUT}-quick" if args.quick else DEFAULT_OUT)
    results = run(config)
    files = write_outputs(results, out)
    print()
    print(files["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
