"""Running downloaded experts over the decoded target images.

:class:`Sessions` opens one onnxruntime session per expert file and keeps it for the
client's lifetime; each expert's preprocessing (input size, mean, std, label names) comes
from its own ONNX metadata. :func:`forward` runs many experts over every image in batches;
a batch is rotated and normalised once per (input size, mean, std) and shared by every
expert that reads it.

CPU sessions are single-threaded and run side by side, one expert per core, over chunks
of :data:`CPU_CHUNK` inputs: on a few cores that beats one multi-threaded session at a
time (no synchronisation inside each small convolution, activations stay in cache), and
it degrades gracefully when other processes share the cores. GPU sessions run one after
the other on whole batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from nds_client import runtime as onnx_runtime
from nds_client.preprocessing import rotations, to_nchw
from nds_client.scores import LocalExpert, ProgressFn
from nds_client.targets import Decoded

CPU_CHUNK = 128  # inputs per onnxruntime call on the CPU (32 images x 4 rotations)


@dataclass
class Runner:
    """An expert with its open session and the preprocessing its file declares."""

    expert: LocalExpert
    session: Any
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_names: tuple[str, ...]
    provider: str
    threads: int | None = None  # intra-op threads of a CPU session (fewer than the cores: runs beside others)


def _decoded_metadata(session: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        try:
            out[key] = json.loads(value)  # every value is JSON-encoded by the indexing pipeline
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


class Sessions:
    """The open sessions of the experts run so far, by file and thread count."""

    def __init__(self) -> None:
        self._open: dict[str, Runner] = {}

    def clear(self) -> None:
        self._open.clear()

    def runners(self, experts: Sequence[LocalExpert]) -> list[Runner]:
        """A runner per expert (sessions reused).

        On the CPU the cores are shared out: with at least as many experts as cores each
        session gets one thread and the experts run side by side (see :func:`forward`);
        a single expert gets them all. With a usable GPU, the CUDA provider runs each one."""
        cores = os.cpu_count() or 1
        cpu_threads = max(1, cores // max(1, len(experts)))
        return [self._runner(e, cpu_threads) for e in experts]

    def _runner(self, expert: LocalExpert, cpu_threads: int) -> Runner:
        key = f"{expert.sha256}:{expert.path}:{cpu_threads}"
        if key not in self._open:
            gpu = onnx_runtime.cuda_usable() is not False
            threads = None if gpu else cpu_threads
            session = onnx_runtime.create_session(expert.path, prefer_gpu=gpu, intra_op_num_threads=threads)
            if gpu and onnx_runtime.active_provider(session) != onnx_runtime.CUDA:  # CUDA did not come up
                threads = cpu_threads
                session = onnx_runtime.create_session(expert.path, prefer_gpu=False, intra_op_num_threads=threads)
            meta = _decoded_metadata(session)
            self._open[key] = Runner(
                expert=expert, session=session, input_size=int(meta.get("input_size", expert.input_size)),
                mean=tuple(float(v) for v in meta.get("mean", expert.mean)), std=tuple(float(v) for v in meta.get("std", expert.std)),
                label_names=tuple(str(v) for v in meta.get("label_names", expert.label_names) or ()),
                provider=onnx_runtime.active_provider(session), threads=threads,
            )
        runner = self._open[key]
        return runner if runner.expert == expert else dataclasses.replace(runner, expert=expert)


def provider_of(providers: Iterable[str]) -> str | None:
    """The execution providers that ran, as one string (comma-separated when several), or None."""
    return ",".join(sorted(set(providers))) or None


def _run_chunked(runner: Runner, x: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """One expert over a prepared batch; on the CPU in chunks that stay in cache."""
    if runner.provider != onnx_runtime.CPU or len(x) <= chunk:
        return onnx_runtime.run(runner.session, x)
    parts = [onnx_runtime.run(runner.session, x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def forward(
    runners: Sequence[Runner], decoded: Decoded, *, rotate: bool, batch_size: int, keep_features: bool, keep_logits: bool,
    progress: ProgressFn | None, stage: str,
) -> dict[int, dict[str, Any]]:
    """Run every expert over every image in batches; per expert id: ``correct``, the rotation
    predictions that were right (by angle, when ``rotate``), and the lists of ``features``
    and ``logits`` batches when asked for."""
    n = len(decoded)
    batch_size = max(1, int(batch_size))
    batches = math.ceil(n / batch_size)
    total, done = batches * len(runners), 0
    out: dict[int, dict[str, Any]] = {r.expert.id: {"correct": np.zeros(4, np.int64), "features": [], "logits": []} for r in runners}
    cpu = [r for r in runners if r.provider == onnx_runtime.CPU and r.threads is not None]
    workers = min(len(cpu), max(1, (os.cpu_count() or 1) // max([r.threads or 1 for r in cpu], default=1)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nds-expert") if workers > 1 else None
    if progress is not None:
        progress(stage, 0, total)
    try:
        for start in range(0, n, batch_size):
            shared: dict[tuple, np.ndarray] = {}
            for r in runners:
                key = (r.input_size, r.mean, r.std)
                if key not in shared:
                    u8 = decoded.arrays[r.input_size][start : start + batch_size]
                    shared[key] = to_nchw(rotations(u8) if rotate else u8, r.mean, r.std)

            def one(r: Runner) -> tuple[Runner, np.ndarray, np.ndarray]:
                return (r, *_run_chunked(r, shared[(r.input_size, r.mean, r.std)], CPU_CHUNK))

            parallel = pool.map(one, cpu) if pool is not None else map(one, cpu)
            sequential = map(one, [r for r in runners if r not in cpu])
            for r, logits, features in (*parallel, *sequential):
                acc = out[r.expert.id]
                if rotate:
                    pred = logits.argmax(axis=1).reshape(4, len(logits) // 4)
                    acc["correct"] += (pred == np.arange(4)[:, None]).sum(axis=1)
                if keep_features:
                    acc["features"].append(np.asarray(features, np.float32))
                if keep_logits:
                    acc["logits"].append(np.asarray(logits, np.float32))
                done += 1
                if progress is not None:
                    progress(stage, done, total)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return out
