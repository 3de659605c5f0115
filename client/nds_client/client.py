"""The client SDK: score the server's experts on private target images, locally.

The user's images never leave their machine; only numbers do::

    from nds_client.client import NDSClient

    with NDSClient("http://127.0.0.1:8000") as client:
        scores = client.score("my_images/")                      # auto: embedding votes, or rotation accuracy
        scores = client.score("my_images/", labels="imagefolder", method="linear-probe")
        priors = client.label_priors("my_images/")               # {dataset_id: {label: P_t(label)}}
        scores.save("scores.json")                               # plain JSON, never a pickle

Light on purpose: it imports httpx, numpy, onnxruntime, pillow and the small torch-free
project modules :mod:`nds_client.images` (the exact preprocessing the server trained the
experts with), :mod:`nds_client.runtime` and :mod:`nds_client.errors`; scikit-learn is
imported only by the ``linear-probe`` method.

Experts are cached at ``cache_dir/<sha256>.onnx`` (default ``~/.cache/nds/experts``);
every file is checked against the sha256 the server lists, before use and after download,
and replaced atomically. Each image is decoded and resized once per distinct expert input
size; the arrays (and their four rotations) are shared by every expert of that size.

Errors::

    NDSError
    +-- NDSClientError            anything the client reports
        +-- ServerError           the server answered an error (url, status_code, detail, field, hint)
        +-- ServerUnreachable     no answer: connection refused, DNS, timeout (url, reason)
        +-- IntegrityError        a downloaded expert does not hash to what the server lists
        +-- ClientInputError      a bad argument (also an InvalidInputError, with ``field``)
            +-- TargetError       bad target images or labels
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from nds_client import runtime as onnx_runtime
from nds_client.errors import InvalidInputError, NDSError
from nds_client.images import list_image_files, load_images, square_resize

__all__ = [
    "AUTO",
    "METHODS",
    "ClientInputError",
    "IntegrityError",
    "LocalExpert",
    "NDSClient",
    "NDSClientError",
    "Scores",
    "ServerError",
    "ServerUnreachable",
    "TargetError",
    "imagefolder_labels",
    "read_labels_csv",
    "rotations",
]

#: The default scoring method: ``embedding`` where the server publishes the backbone of every
#: scored dataset's embedding space, else ``rotation`` (both need no labels).
AUTO = "auto"
METHODS = (AUTO, "rotation", "linear-probe", "embedding")
SCORES_FORMAT = "nds.scores/v1"
MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
_SHA256 = re.compile(r"[0-9a-f]{64}")
CPU_CHUNK = 128  # inputs per onnxruntime call on the CPU (32 images x 4 rotations)
_PAGE = 1000
_MAX_ROWS = 1_000_000  # a listing longer than this is taken for a server that never stops paging

#: ``progress(stage, done, total)``; stages: "download", "preprocess", "score", "priors".
ProgressFn = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- errors


class NDSClientError(NDSError):
    """Base class of every error the client raises."""


class ServerError(NDSClientError):
    """The server answered with an error status; carries its JSON body's detail, field and hint."""

    def __init__(self, message: str, *, url: str, status_code: int, detail: str, field: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.url, self.status_code, self.detail, self.field = url, status_code, detail, field


class ServerUnreachable(NDSClientError):
    """No answer from the server (connection refused, unknown host, timeout, broken connection)."""

    def __init__(self, message: str, *, url: str, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.url, self.reason = url, reason


class IntegrityError(NDSClientError):
    """A downloaded expert's bytes do not hash to the sha256 the server lists."""


class ClientInputError(NDSClientError, InvalidInputError):
    """A bad argument; ``field`` names it."""


class TargetError(ClientInputError):
    """Bad target images or labels (empty, unreadable, mismatched, too few per label)."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LocalExpert:
    """An expert whose ONNX file is in the local cache, verified against its sha256."""

    id: int
    kind: str  # "rotation" or "classifier"
    dataset_id: int
    dataset: str
    cluster: int | None
    sha256: str
    path: Path
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_names: tuple[str, ...]
    heldout_accuracy: float | None
    index_version: int | None = None
    byte_size: int | None = None
    downloaded: bool = False  # fetched by this call (False: reused from the cache)


@dataclass
class Scores:
    """What ``score`` returns and ``nds score -o`` writes: plain JSON, never a pickle.

    ``scores`` maps expert id -> score (what ``query`` sends); ``experts`` has one entry per
    expert: id, kind, dataset_id, dataset, cluster, index_version, sha256, score,
    target_accuracy, heldout_accuracy and method-specific ``details``."""

    method: str
    num_images: int
    skipped: int
    scores: dict[int, float]
    experts: list[dict[str, Any]]
    label_priors: dict[int, dict[str, float]] | None = None
    temperature: float | None = None
    labels: dict[str, int] | None = None  # images per label (when labels were given)
    skipped_files: list[dict[str, str]] = field(default_factory=list)  # up to 100 {"image", "reason"}
    server: str | None = None
    provider: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format: str = SCORES_FORMAT

    def ranked(self) -> list[dict[str, Any]]:
        """The expert entries, best score first (ties: lower id first)."""
        return sorted(self.experts, key=lambda e: (-float(e["score"]), int(e["id"])))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scores"] = {str(k): float(v) for k, v in self.scores.items()}
        if self.label_priors is not None:
            data["label_priors"] = {str(k): {str(lab): float(p) for lab, p in v.items()} for k, v in self.label_priors.items()}
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any) -> Scores:
        def bad(why: str) -> ClientInputError:
            return ClientInputError(f"not an NDS scores file: {why}", field="scores", hint="write one with `nds score TARGET -o scores.json`")

        if not isinstance(data, dict):
            raise bad("the top level is not a JSON object")
        if data.get("format", SCORES_FORMAT) != SCORES_FORMAT:
            raise bad(f"unknown format {data.get('format')!r} (expected {SCORES_FORMAT})")
        for key in ("method", "num_images", "scores", "experts"):
            if key not in data:
                raise bad(f"missing key {key!r}")
        try:
            scores = {int(k): float(v) for k, v in dict(data["scores"]).items()}
            priors = data.get("label_priors")
            priors = None if priors is None else {int(k): {str(lab): float(p) for lab, p in dict(v).items()} for k, v in dict(priors).items()}
            known = {f for f in cls.__dataclass_fields__}
            kwargs = {k: v for k, v in data.items() if k in known}
            kwargs.update(scores=scores, label_priors=priors, num_images=int(data["num_images"]), skipped=int(data.get("skipped", 0)))
            if not isinstance(kwargs["experts"], list):
                raise TypeError("experts is not a list")
            return cls(**kwargs)
        except (TypeError, ValueError, AttributeError) as exc:
            raise bad(str(exc)) from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Scores:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ClientInputError(f"not an NDS scores file: invalid JSON ({exc})", field="scores") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON to ``path`` (a temp file in the same folder, then renamed)."""
        path = Path(path)
        _atomic_write(path, lambda fh: fh.write(self.to_json().encode() + b"\n"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ClientInputError(f"cannot read scores file {path}: {exc.strerror or exc}", field="scores") from None
        return cls.from_json(text)


# --------------------------------------------------------------------------- helpers


#: the fields of a GET /v1/experts row the client relies on, and their JSON types
_EXPERT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": int, "kind": str, "dataset_id": int, "cluster": (int, type(None)), "sha256": str, "input_size": int,
}
_TYPE_NAMES = {int: "an integer", str: "a string", type(None): "null"}


def _short(value: Any, limit: int = 60) -> str:
    """A JSON value for an error message, cut to ``limit`` characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Call ``write(binary file)`` on a temp file next to ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rotations(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, C) -> (4B, H, W, C): block k is every image rotated k * 90 degrees
    counter-clockwise, exactly what training's ``torch.rot90(x, k, dims=(2, 3))`` does on NCHW."""
    return np.concatenate([np.rot90(images, k, axes=(1, 2)) for k in range(4)], axis=0)


def _normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S), ``(x / 255 - mean) / std`` as in training."""
    x = images.astype(np.float32) * np.float32(1.0 / 255.0)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def read_labels_csv(path: str | os.PathLike) -> dict[Path, str]:
    """A ``path,label`` CSV (with that header) -> {resolved image path: label}; paths relative to the CSV."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if "path" not in columns or "label" not in columns:
                raise TargetError(
                    f"labels file {path} needs the columns 'path' and 'label', found {', '.join(columns) or 'none'}",
                    field="labels", hint="first line: path,label",
                )
            reader.fieldnames = columns
            out: dict[Path, str] = {}
            for line, row in enumerate(reader, start=2):
                image, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                if not image or not label:
                    raise TargetError(f"labels file {path}, line {line}: empty path or label", field="labels")
                resolved = (path.parent / image).resolve() if not Path(image).is_absolute() else Path(image).resolve()
                if resolved in out and out[resolved] != label:
                    raise TargetError(f"labels file {path}, line {line}: {image} has two labels", field="labels")
                out[resolved] = label
    except OSError as exc:
        raise TargetError(f"cannot read labels file {path}: {exc.strerror or exc}", field="labels") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TargetError(f"cannot parse labels file {path}: {exc}", field="labels") from None
    if not out:
        raise TargetError(f"labels file {path} has no rows", field="labels")
    return out


def imagefolder_labels(folder: str | os.PathLike) -> dict[Path, str]:
    """Labels from an image folder ``FOLDER/<label>/<image>`` -> {resolved path: label}."""
    folder = Path(folder)
    files = list_image_files(folder) if folder.is_dir() else []
    out = {p.resolve(): p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) >= 2}
    if files and len(out) < len(files):
        loose = [str(p.relative_to(folder)) for p in files if len(p.relative_to(folder).parts) < 2]
        raise TargetError(
            f"{len(loose)} images directly under {folder} have no label folder (e.g. {loose[0]})",
            field="labels", hint="--imagefolder expects TARGET/<label>/<image>",
        )
    return out


# --------------------------------------------------------------------------- target images


@dataclass
class _Target:
    paths: list[Path] | None  # file inputs, in order (None for an array)
    array: np.ndarray | None  # uint8 (N, H, W, C) for array inputs
    labels: list[str] | None  # aligned with the inputs
    description: str

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.array)

    def name(self, i: int) -> str:
        return str(self.paths[i]) if self.paths is not None else f"array[{i}]"


def _resolve_target(images: Any, labels: Any) -> _Target:
    """Turn a folder, a list of paths or an array (and optional labels) into a _Target; no decoding."""
    if isinstance(images, np.ndarray):
        arr = images
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4 or arr.shape[3] not in (1, 3, 4):
            raise TargetError(f"an image array must be (N, H, W, 3) or (N, H, W), got shape {images.shape}", field="images")
        if arr.dtype != np.uint8:
            raise TargetError(f"an image array must be uint8, got {arr.dtype}", field="images", hint="e.g. (x * 255).round().astype(np.uint8)")
        if len(arr) == 0:
            raise TargetError("the image array is empty", field="images")
        target = _Target(paths=None, array=arr, labels=None, description=f"an array of {len(arr)} images")
    elif isinstance(images, str | os.PathLike):
        root = Path(images)
        if root.is_dir():
            paths = [p.resolve() for p in list_image_files(root)]
            if not paths:
                raise TargetError(f"no image files under {root}", field="images", hint="image files: .png .jpg .jpeg .bmp .gif .webp .tif .tiff .ppm .pgm")
            target = _Target(paths=paths, array=None, labels=None, description=str(root))
        elif root.is_file():
            target = _Target(paths=[root.resolve()], array=None, labels=None, description=str(root))
        else:
            raise TargetError(f"target {root} does not exist", field="images")
    elif isinstance(images, Sequence) and not isinstance(images, bytes | bytearray):
        if len(images) == 0:
            raise TargetError("the list of target images is empty", field="images")
        if not all(isinstance(p, str | os.PathLike) for p in images):
            raise TargetError("a list of target images must hold file paths", field="images", hint="or pass a uint8 array (N, H, W, 3)")
        paths = [Path(p).resolve() for p in images]
        target = _Target(paths=paths, array=None, labels=None, description=f"{len(paths)} image files")
    else:
        raise TargetError(f"images must be a folder, a list of paths or a uint8 array, got {type(images).__name__}", field="images")

    if labels is None:
        return target
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if isinstance(labels, str) and labels == "imagefolder":
        if not (isinstance(images, str | os.PathLike) and Path(images).is_dir()):
            raise TargetError("labels='imagefolder' needs images to be a folder FOLDER/<label>/<image>", field="labels")
        labels = imagefolder_labels(images)
    if isinstance(labels, Mapping):
        if target.paths is None:
            raise TargetError("labels for an image array must be a list, one per image", field="labels")
        lookup = {Path(k).resolve(): str(v) for k, v in labels.items()}
        missing = [p for p in target.paths if p not in lookup]
        present = set(target.paths)
        extra = [p for p in lookup if p not in present]
        if extra:
            raise TargetError(
                f"labels name {len(extra)} files that are not among the target images, e.g. {', '.join(str(p) for p in extra[:3])}",
                field="labels", hint="label paths are relative to the labels file (or absolute) and must be image files of the target",
            )
        if missing:
            raise TargetError(
                f"{len(missing)} of the {len(target)} target images have no label, e.g. {', '.join(str(p) for p in missing[:3])}",
                field="labels", hint="give every target image a label, or move the unlabelled ones out",
            )
        target.labels = [lookup[p] for p in target.paths]
    elif isinstance(labels, Sequence) and not isinstance(labels, str | bytes):
        if len(labels) != len(target):
            raise TargetError(f"got {len(labels)} labels for {len(target)} images: they must match one to one", field="labels")
        target.labels = [str(v) for v in labels]
    else:
        raise TargetError("labels must be a list (one per image), a {path: label} mapping or 'imagefolder'", field="labels")
    return target


def _check_probe_labels(labels: Sequence[str], after: str = "") -> dict[str, int]:
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    found = ", ".join(f"{lab!r}: {n}" for lab, n in sorted(counts.items())) or "none"
    if len(counts) < 2 or min(counts.values()) < 2:
        raise TargetError(
            f"a linear probe needs at least 2 labels with at least 2 images each; found {len(counts)} label(s) ({found}){after}",
            field="labels", hint="add labelled images, or use --method rotation (needs no labels)",
        )
    return counts


@dataclass
class _Decoded:
    arrays: dict[int, np.ndarray]  # input size -> uint8 (N, S, S, 3), the readable images
    labels: list[str] | None
    skipped: list[tuple[str, str]]  # (image, reason)


def _decode(target: _Target, sizes: Sequence[int], progress: ProgressFn | None) -> _Decoded:
    """Decode and resize every image once per input size (nds_client.images: the server's own preprocessing)."""
    n, sizes = len(target), sorted(set(sizes))
    total = n * len(sizes)
    ok = np.ones(n, dtype=bool)
    reasons: dict[int, str] = {}
    raw: dict[int, np.ndarray] = {}
    if progress is not None:
        progress("preprocess", 0, total)
    for j, size in enumerate(sizes):
        def report(fraction: float, j: int = j) -> None:
            if progress is not None:
                progress("preprocess", j * n + int(round(fraction * n)), total)

        if target.paths is not None:
            loaded = load_images(target.paths, size, workers=os.cpu_count() or 2, progress=report)
            full = np.zeros((n, size, size, 3), np.uint8)
            full[loaded.index] = loaded.images
            mask = np.zeros(n, dtype=bool)
            mask[loaded.index] = True
            for i, why in loaded.failed:
                reasons.setdefault(i, why)
            ok &= mask
            raw[size] = full
        else:
            arr = target.array
            if arr.shape[1] == arr.shape[2] == size and arr.shape[3] == 3:
                raw[size] = np.ascontiguousarray(arr)
            else:
                raw[size] = np.stack([square_resize(Image.fromarray(img[..., 0] if img.shape[2] == 1 else img), size) for img in arr])
            report(1.0)
    keep = np.flatnonzero(ok)
    skipped = [(target.name(i), reasons.get(i, "unreadable")) for i in np.flatnonzero(~ok)]
    if len(keep) == 0:
        first = skipped[0][1] if skipped else "no images"
        raise TargetError(
            f"none of the {n} target images could be read (first error: {first})",
            field="images", hint="image files must be decodable by Pillow",
        )
    labels = [target.labels[i] for i in keep] if target.labels is not None else None
    return _Decoded(arrays={s: a[keep] for s, a in raw.items()}, labels=labels, skipped=skipped)


# --------------------------------------------------------------------------- running experts


@dataclass
class _Runner:
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


def _run_chunked(runner: _Runner, x: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """One expert over a prepared batch; on the CPU in chunks that stay in cache."""
    if runner.provider != onnx_runtime.CPU or len(x) <= chunk:
        return onnx_runtime.run(runner.session, x)
    parts = [onnx_runtime.run(runner.session, x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _forward(
    runners: Sequence[_Runner], decoded: _Decoded, *, rotate: bool, batch_size: int, keep_features: bool, keep_logits: bool,
    progress: ProgressFn | None, stage: str,
) -> dict[int, dict[str, Any]]:
    """Run every expert over every image in batches; per expert id: rotation correct counts
    (by angle), and/or features, and/or logits. Each batch is rotated and normalised once per
    (input size, mean, std) and shared by all experts that read it.

    CPU sessions are single-threaded and run side by side, one expert per core, over chunks
    of :data:`CPU_CHUNK` inputs: on a few cores that beats one multi-threaded session at a
    time (no synchronisation inside each small convolution, activations stay in cache),
    and it degrades gracefully when other processes share the cores. GPU sessions run one
    after the other on whole batches."""
    n = len(next(iter(decoded.arrays.values())))
    batch_size = max(1, int(batch_size))
    batches = math.ceil(n / batch_size)
    total, done = batches * len(runners), 0
    out: dict[int, dict[str, Any]] = {r.expert.id: {"correct": np.zeros(4, np.int64), "features": [], "logits": []} for r in runners}
    cpu = [r for r in runners if r.provider == onnx_runtime.CPU and r.threads is not None]
    workers = min(len(cpu), max(1, (os.cpu_count() or 1) // max([r.threads for r in cpu], default=1)))
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
                    shared[key] = _normalise(rotations(u8) if rotate else u8, r.mean, r.std)

            def one(r: _Runner) -> tuple[_Runner, np.ndarray, np.ndarray]:
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


def _linear_probe(features: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Cross-validated accuracy of a logistic-regression probe on standardised features."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:
        raise NDSClientError("the linear-probe method needs scikit-learn, which is not installed", hint="pip install scikit-learn, or use --method rotation") from exc
    y = np.asarray(labels)
    counts = np.unique(y, return_counts=True)[1]
    folds = int(min(5, counts.min()))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    try:  # one BLAS thread: L-BFGS on a few hundred rows is many times slower with several
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(1)
    except ImportError:
        limits = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            accs = cross_val_score(probe, features.astype(np.float64), y, cv=cv)
    finally:
        if limits is not None:
            limits.restore_original_limits()
    return {"probe_accuracy": float(accs.mean()), "probe_std": float(accs.std()), "folds": folds}


# --------------------------------------------------------------------------- the client


class NDSClient:
    """A Neural Data Server client: lists and downloads experts, scores them on local images,
    estimates label priors, sends queries and fetches manifests.

    ``token`` is sent as ``Authorization: Bearer <token>``; ``transport`` is handed to httpx
    (tests, proxies). Use it as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        cache_dir: str | os.PathLike | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base_url = str(base_url).strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", base_url):
            raise ClientInputError(f"server URL must start with http:// or https://, got {base_url!r}", field="server",
                                   hint="e.g. http://127.0.0.1:8000")
        self.base_url = base_url
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.timeout = timeout
        headers = {"User-Agent": "nds-client/0.1", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport, follow_redirects=True)
        self._sessions: dict[str, _Runner] = {}

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        self._http.close()
        self._sessions.clear()

    def __enter__(self) -> NDSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NDSClient({self.base_url!r})"

    @contextmanager
    def _exchange(self, method: str, path: str, *, params: dict | None = None, json_body: Any = None, stream: bool = False) -> Iterator[httpx.Response]:
        """Send one request and yield its successful response. The one place where httpx errors
        become client errors, with the URL that failed and why (also for errors raised while a
        streamed body is read inside the ``with`` block)."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        request = self._http.build_request(method, path, params=params, json=json_body)
        url = str(request.url)
        try:
            response = self._http.send(request, stream=stream)
            try:
                if response.status_code >= 400:
                    response.read()
                    raise self._server_error(method, url, response)
                yield response
            finally:
                response.close()
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(
                f"{method} {url} failed: no answer within {self.timeout:g} s ({type(exc).__name__})",
                url=url, reason="timeout", hint="the server is slow or unreachable; retry, or raise the timeout",
            ) from None
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ServerUnreachable(
                f"cannot reach the server: {method} {url} failed: {reason}",
                url=url, reason=reason, hint="check that `nds serve` is running there and that the URL (--server) is right",
            ) from None
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise NDSClientError(f"{method} {url} failed: {reason}", hint=None) from None

    @staticmethod
    def _server_error(method: str, url: str, response: httpx.Response) -> ServerError:
        detail, field_name, hint = None, None, None
        try:
            body = response.json()
            if isinstance(body, dict):
                detail, field_name, hint = body.get("detail"), body.get("field"), body.get("hint")
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            pass
        if not isinstance(detail, str):
            detail = json.dumps(detail) if detail is not None else (response.text.strip()[:300] or response.reason_phrase)
        if hint is None and response.status_code in (401, 403):
            hint = "the server needs a valid token: --token or NDS_TOKEN"
        return ServerError(
            f"{method} {url} answered {response.status_code} {response.reason_phrase}: {detail}",
            url=url, status_code=response.status_code, detail=detail, field=field_name, hint=hint,
        )

    def _json(self, method: str, path: str, *, params: dict | None = None, json_body: Any = None) -> Any:
        with self._exchange(method, path, params=params, json_body=json_body) as response:
            try:
                return response.json()
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                raise ServerError(
                    f"{method} {response.request.url} answered {response.status_code} with a body that is not JSON",
                    url=str(response.request.url), status_code=response.status_code, detail=response.text[:300],
                    hint="is this URL an NDS server?",
                ) from None

    def _bad_listing(self, path: str, why: str) -> ServerError:
        url = f"{self.base_url}{path}"
        return ServerError(f"GET {url} answered an unexpected body: {why}", url=url, status_code=200, detail=why,
                           hint="is this URL an NDS server, of a version this client speaks?")

    def _pages(self, path: str, params: dict | None = None, *, fields: Mapping[str, type | tuple[type, ...]] | None = None) -> list[dict]:
        """Every row of a paged listing. Paging is bounded by what the server returns, never by
        its ``count`` alone: it stops at an empty page or one shorter than asked for, and a
        listing past ``_MAX_ROWS`` rows is an error. Each row must be a JSON object whose
        ``fields`` (name -> type) are present with that type (ServerError naming the field)."""
        rows: list[dict] = []
        while True:
            page = self._json("GET", path, params={**(params or {}), "offset": len(rows), "limit": _PAGE})
            data = page.get("data") if isinstance(page, dict) else None
            if not isinstance(data, list):
                raise self._bad_listing(path, "no 'data' list")
            count = page.get("count", len(rows) + len(data))
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise self._bad_listing(path, f"'count' is {count!r}, not a row count")
            for i, row in enumerate(data, start=len(rows)):
                self._check_row(path, i, row, fields or {})
            rows.extend(data)
            if len(rows) > _MAX_ROWS:
                raise self._bad_listing(path, f"the listing did not end after {_MAX_ROWS:,} rows (it claims {count:,})")
            if len(data) < _PAGE or len(rows) >= count:
                return rows

    def _check_row(self, path: str, i: int, row: Any, fields: Mapping[str, type | tuple[type, ...]]) -> None:
        if not isinstance(row, dict):
            raise self._bad_listing(path, f"row {i} is {type(row).__name__}, not an object")
        for name, kind in fields.items():
            if name not in row:
                raise self._bad_listing(path, f"row {i} has no {name!r}")
            kinds = kind if isinstance(kind, tuple) else (kind,)
            value = row[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON true is no id
                raise self._bad_listing(path, f"row {i} has {name!r} = {_short(value)}, not {' or '.join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)}")

    # ---------------------------------------------------------------- catalog

    def health(self) -> dict:
        """GET /healthz: status, mode, schema revision."""
        return self._json("GET", "/healthz")

    def datasets(self) -> list[dict]:
        """Every registered dataset (all pages of GET /v1/datasets)."""
        return self._pages("/v1/datasets", fields={"id": int, "name": str})

    def experts(self, kind: str | None = None, dataset: int | None = None) -> list[dict]:
        """Experts of every dataset's active index (GET /v1/experts); ``kind``: rotation or classifier."""
        if kind is not None and kind not in ("rotation", "classifier"):
            raise ClientInputError(f"unknown expert kind {kind!r}", field="kind", hint="rotation or classifier")
        return self._pages("/v1/experts", {"kind": kind, "dataset": dataset}, fields=_EXPERT_FIELDS)

    def expert(self, expert_id: int) -> dict:
        """One expert (GET /v1/experts/{id})."""
        return self._json("GET", f"/v1/experts/{int(expert_id)}")

    def clusters(self, dataset_id: int) -> list[dict]:
        """The clusters of a dataset's active index, with their centroids (GET /v1/datasets/{id}/clusters)."""
        return self._json("GET", f"/v1/datasets/{int(dataset_id)}/clusters")

    def backbones(self) -> list[dict]:
        """The embedding spaces of the indexed datasets (GET /v1/backbones)."""
        body = self._json("GET", "/v1/backbones")
        data = body.get("data", []) if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise self._bad_listing("/v1/backbones", "no 'data' list")
        for i, row in enumerate(data):
            self._check_row("/v1/backbones", i, row, {"version": str})
        return data

    # ---------------------------------------------------------------- downloads

    def _cache(self, cache_dir: str | os.PathLike | None) -> Path:
        if cache_dir is not None:
            return Path(cache_dir).expanduser()
        if self.cache_dir is not None:
            return self.cache_dir
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "nds" / "experts"

    def _download(self, expert_id: int, sha256: str, path: Path) -> None:
        """Stream the expert's ONNX file to ``path`` via a temp file, checking its sha256."""
        self._download_file(f"/v1/experts/{expert_id}/model.onnx", sha256, path, what=f"expert {expert_id}")

    def _cached_file(self, url_path: str, sha256: str, cache: Path, *, what: str) -> tuple[Path, bool]:
        """``cache/<sha256>.onnx``, downloaded unless a file with that hash is already there;
        (path, downloaded now)."""
        if not _SHA256.fullmatch(sha256 or ""):
            raise IntegrityError(f"the server lists {what} with an invalid sha256 {sha256!r}")
        path = cache / f"{sha256}.onnx"
        if path.is_file() and _sha256_file(path) == sha256:
            return path, False
        self._download_file(url_path, sha256, path, what=what)
        return path, True

    def _download_file(self, url_path: str, sha256: str, path: Path, *, what: str) -> None:
        """Stream ``url_path`` to ``path`` via a temp file, checking its sha256 (one retry)."""
        for attempt in (1, 2):
            digest = hashlib.sha256()
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{sha256[:16]}.", suffix=".part", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as fh, self._exchange("GET", url_path, stream=True) as response:
                    for chunk in response.iter_bytes(1 << 16):
                        digest.update(chunk)
                        fh.write(chunk)
                if digest.hexdigest() == sha256:
                    os.replace(tmp, path)
                    return
            finally:
                Path(tmp).unlink(missing_ok=True)
            if attempt == 2:
                raise IntegrityError(
                    f"{what} downloaded from {self.base_url}{url_path} has sha256 "
                    f"{digest.hexdigest()[:16]}..., the server lists {sha256[:16]}...",
                    hint="the file changed on the server or in transit; re-index the dataset or retry later",
                )

    def pull_experts(self, cache_dir: str | os.PathLike | None = None, kind: str | None = None, *, progress: ProgressFn | None = None) -> list[LocalExpert]:
        """Download the experts missing from the cache (``cache_dir/<sha256>.onnx``); files already
        there are checked against their sha256 and downloaded again when it does not match."""
        return self._fetch(self._listed(kind, self._cache(cache_dir)), progress)

    def _listed(self, kind: str | None, cache: Path, datasets: list[dict] | None = None) -> list[LocalExpert]:
        """The server's experts as :class:`LocalExpert` entries pointing into ``cache``, nothing
        downloaded yet (:meth:`_fetch` makes the files real). ``datasets``: the dataset listing,
        when the caller already holds it."""
        records = self.experts(kind=kind)
        if records and datasets is None:
            datasets = self.datasets()
        names = {int(d["id"]): d.get("name", str(d["id"])) for d in datasets or ()}
        listed: list[LocalExpert] = []
        for rec in records:
            sha = str(rec.get("sha256", "")).lower()
            if not _SHA256.fullmatch(sha):
                raise IntegrityError(f"the server lists expert {rec.get('id')} with an invalid sha256 {sha!r}")
            try:  # the listing's types are checked (experts()); meta and metrics are free-form
                meta = rec.get("meta") or {}
                metrics = rec.get("metrics") or {}
                held = metrics.get("heldout_accuracy", meta.get("heldout_accuracy"))
                listed.append(
                    LocalExpert(
                        id=int(rec["id"]), kind=str(rec["kind"]), dataset_id=int(rec["dataset_id"]),
                        dataset=names.get(int(rec["dataset_id"]), str(meta.get("dataset", rec["dataset_id"]))),
                        cluster=rec.get("cluster"), sha256=sha, path=cache / f"{sha}.onnx", input_size=int(rec.get("input_size") or meta.get("input_size")),
                        mean=tuple(float(v) for v in meta.get("mean", DEFAULT_MEAN)), std=tuple(float(v) for v in meta.get("std", DEFAULT_STD)),
                        label_names=tuple(str(v) for v in meta.get("label_names") or ()),
                        heldout_accuracy=None if held is None else float(held), index_version=rec.get("index_version"),
                        byte_size=rec.get("byte_size"),
                    )
                )
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise self._bad_listing("/v1/experts", f"expert {rec.get('id')}'s meta or metrics are malformed ({type(exc).__name__}: {exc})") from None
        return listed

    def _fetch(self, experts: Sequence[LocalExpert], progress: ProgressFn | None) -> list[LocalExpert]:
        """Download each expert's file unless the cache holds one with its sha256."""
        local: list[LocalExpert] = []
        if progress is not None:
            progress("download", 0, len(experts))
        for done, e in enumerate(experts, start=1):
            downloaded = False
            if not (e.path.is_file() and _sha256_file(e.path) == e.sha256):
                self._download(e.id, e.sha256, e.path)
                downloaded = True
            local.append(replace(e, downloaded=downloaded))
            if progress is not None:
                progress("download", done, len(experts))
        return local

    def _runners(self, experts: Sequence[LocalExpert]) -> list[_Runner]:
        """A session per expert (cached); preprocessing comes from each file's own metadata.

        On the CPU the cores are shared out: with at least as many experts as cores each
        session gets one thread and the experts run side by side (see :func:`_forward`);
        a single expert gets them all. With a usable GPU, the CUDA provider runs each one."""
        cores = os.cpu_count() or 1
        cpu_threads = max(1, cores // max(1, len(experts)))
        return [self._runner(e, cpu_threads) for e in experts]

    def _runner(self, expert: LocalExpert, cpu_threads: int) -> _Runner:
        key = f"{expert.sha256}:{expert.path}:{cpu_threads}"
        if key not in self._sessions:
            gpu = onnx_runtime.cuda_usable() is not False
            threads = None if gpu else cpu_threads
            session = onnx_runtime.create_session(expert.path, prefer_gpu=gpu, intra_op_num_threads=threads)
            if gpu and onnx_runtime.active_provider(session) != onnx_runtime.CUDA:  # CUDA did not come up
                threads = cpu_threads
                session = onnx_runtime.create_session(expert.path, prefer_gpu=False, intra_op_num_threads=threads)
            meta = _decoded_metadata(session)
            self._sessions[key] = _Runner(
                expert=expert, session=session, input_size=int(meta.get("input_size", expert.input_size)),
                mean=tuple(float(v) for v in meta.get("mean", expert.mean)), std=tuple(float(v) for v in meta.get("std", expert.std)),
                label_names=tuple(str(v) for v in meta.get("label_names", expert.label_names) or ()),
                provider=onnx_runtime.active_provider(session), threads=threads,
            )
        runner = self._sessions[key]
        return runner if runner.expert == expert else _Runner(**{**runner.__dict__, "expert": expert})

    def _experts_of(self, kind: str, experts: Sequence[LocalExpert] | None, progress: ProgressFn | None) -> list[LocalExpert]:
        if experts is None:
            experts = self.pull_experts(kind=kind, progress=progress)
        return [e for e in experts if e.kind == kind]

    # ---------------------------------------------------------------- scoring

    def score(
        self,
        images: Any,
        labels: Any = None,
        method: str = AUTO,
        *,
        experts: Sequence[LocalExpert] | None = None,
        batch_size: int = 256,
        progress: ProgressFn | None = None,
        priors: bool = False,
        temperature: float = 2.0,
    ) -> Scores:
        """Score every rotation expert on the target ``images`` (a folder, a list of paths or a
        uint8 array (N, H, W, 3)), locally.

        ``method="auto"`` (the default): ``embedding`` when the server publishes the backbone of
        every scored dataset's embedding space, else ``rotation``; the returned scores name the
        method that ran. ``method="rotation"``: the expert's accuracy at predicting the rotation (0/90/180/270) of
        the target images; no labels. ``method="linear-probe"``: cross-validated accuracy of a
        logistic regression on the expert's standardised penultimate features, fit on ``labels``
        (a list aligned with the images, a {path: label} mapping, or "imagefolder").
        ``method="embedding"``: the share of the target images whose nearest cluster centroid,
        in the backbone's embedding space, is the expert's cluster (the backbone is downloaded
        and run here, like the experts); no labels. It works where rotation cannot, on images
        without an upright orientation (textures, aerial views, microscopy).
        ``priors=True`` also estimates label priors (see :meth:`label_priors`) in the same pass
        over the images. Unreadable images are skipped and counted."""
        if method not in METHODS:
            raise ClientInputError(f"unknown method {method!r}", field="method", hint=f"one of: {', '.join(METHODS)}")
        if method == "linear-probe" and labels is None:
            raise TargetError("the linear-probe method needs labels", field="labels", hint="--labels CSV or --imagefolder (SDK: labels=...)")
        self._check_temperature(temperature)
        target = _resolve_target(images, labels)
        if method == "linear-probe":
            _check_probe_labels(target.labels)
        fetched = experts is not None
        # one listing serves the expert names and the datasets' embedding spaces
        datasets = self.datasets() if not fetched or method in (AUTO, "embedding") else None
        if experts is None:  # listed only: the files that will run are fetched once the method is known
            experts = self._listed(None if priors else "rotation", self._cache(None), datasets)
        rotation_experts = [e for e in experts if e.kind == "rotation"]
        if not rotation_experts:
            raise NDSClientError(f"the server at {self.base_url} has no rotation experts to score",
                                 hint="index a dataset first: nds index NAME")
        classifier_experts = [e for e in experts if e.kind == "classifier"] if priors else []
        if method in (AUTO, "embedding"):
            spaces, by_space, uncovered = self._embedding_spaces(rotation_experts, datasets)
            if method == AUTO:
                method = "rotation" if uncovered or not by_space else "embedding"
            elif not by_space:
                raise NDSClientError(
                    f"the server at {self.base_url} publishes no backbone its experts' datasets were indexed with",
                    hint="index the datasets with the default backbone (or onnx:<file>), or use --method rotation",
                )
        if not fetched:  # the embedding method runs the backbone, not the rotation experts
            classifier_experts = self._fetch(classifier_experts, progress) if classifier_experts else []
            if method != "embedding":
                rotation_experts = self._fetch(rotation_experts, progress)
        if method == "embedding":
            return self._score_by_embedding(target, spaces, by_space, classifier_experts if priors else None,
                                            batch_size=batch_size, progress=progress, temperature=temperature)
        runners = self._runners(rotation_experts)
        cls_runners = self._runners(classifier_experts)
        decoded = _decode(target, [r.input_size for r in runners + cls_runners], progress)
        counts = None
        if decoded.labels is not None:
            counts = (_check_probe_labels(decoded.labels, after=f" after skipping {len(decoded.skipped)} unreadable image(s)")
                      if method == "linear-probe" else {lab: decoded.labels.count(lab) for lab in sorted(set(decoded.labels))})
        n = len(next(iter(decoded.arrays.values())))
        ran = _forward(runners, decoded, rotate=method == "rotation", batch_size=batch_size, keep_features=method == "linear-probe",
                       keep_logits=False, progress=progress, stage="score")
        entries, scores = [], {}
        for r in runners:
            e, res = r.expert, ran[r.expert.id]
            if method == "rotation":
                by_angle = res["correct"] / n
                value = float(res["correct"].sum() / (4 * n))
                details = {"by_rotation": [round(float(v), 4) for v in by_angle]}
            else:
                probe = _linear_probe(np.concatenate(res["features"]), decoded.labels)
                value = probe["probe_accuracy"]
                details = {"probe_std": round(probe["probe_std"], 4), "folds": probe["folds"]}
            held = e.heldout_accuracy
            entries.append({
                "id": e.id, "kind": e.kind, "dataset_id": e.dataset_id, "dataset": e.dataset, "cluster": e.cluster,
                "index_version": e.index_version, "sha256": e.sha256, "score": value, "target_accuracy": value,
                "heldout_accuracy": held, "relative_accuracy": (value / held) if held else None, "details": details,
            })
            scores[e.id] = value
        result = Scores(
            method=method, num_images=n, skipped=len(decoded.skipped), scores=scores, experts=entries, labels=counts,
            skipped_files=[{"image": img, "reason": why} for img, why in decoded.skipped[:100]], server=self.base_url,
            provider=_provider([*runners, *cls_runners]),
        )
        if priors:
            result.label_priors = self._priors(cls_runners, decoded, temperature, batch_size, progress)
            result.temperature = temperature
        return result

    def _embedding_spaces(
        self, rotation_experts: Sequence[LocalExpert], datasets: Sequence[dict]
    ) -> tuple[dict[str, dict], dict[str, list[LocalExpert]], list[LocalExpert]]:
        """The server's downloadable backbones by version, the experts grouped by the embedding
        space of their dataset (``datasets``: the server's dataset listing), and the experts
        whose space has no downloadable backbone."""
        spaces = {s["version"]: s for s in self.backbones() if s.get("downloadable")}
        space_of = {int(d["id"]): d.get("backbone") for d in datasets}
        by_space: dict[str, list[LocalExpert]] = {}
        uncovered: list[LocalExpert] = []
        for e in rotation_experts:
            version = space_of.get(e.dataset_id)
            if version in spaces:
                by_space.setdefault(version, []).append(e)
            else:
                uncovered.append(e)
        return spaces, by_space, uncovered

    def _score_by_embedding(
        self, target: _Target, spaces: dict[str, dict], by_space: dict[str, list[LocalExpert]],
        classifier_experts: Sequence[LocalExpert] | None, *, batch_size: int, progress: ProgressFn | None, temperature: float,
    ) -> Scores:
        """Embed the target with each space's backbone and vote for the nearest cluster centroid."""
        cls_runners = self._runners(classifier_experts or [])
        sizes = [int(spaces[v]["input_size"]) for v in by_space] + [r.input_size for r in cls_runners]
        decoded = _decode(target, sizes, progress)
        n = len(next(iter(decoded.arrays.values())))
        cache = self._cache(None)
        entries, scores, providers = [], {}, []
        for version, members in sorted(by_space.items()):
            space = spaces[version]
            path, _ = self._cached_file(f"/v1/backbones/{version}/model.onnx", str(space["sha256"]).lower(), cache, what=f"backbone {version}")
            session = onnx_runtime.create_session(path, prefer_gpu=onnx_runtime.cuda_usable() is not False)
            providers.append(onnx_runtime.active_provider(session))
            outputs = [o.name for o in session.get_outputs()]
            output, name = ("features" if "features" in outputs else outputs[0]), session.get_inputs()[0].name
            x = decoded.arrays[int(space["input_size"])]
            feats = [session.run([output], {name: _normalise(x[i : i + batch_size], space["mean"], space["std"])})[0].reshape(len(x[i : i + batch_size]), -1)
                     for i in range(0, n, batch_size)]
            emb = np.concatenate(feats).astype(np.float64)
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            keys, rows = [], []
            for dataset_id in sorted({e.dataset_id for e in members}):
                for c in self.clusters(dataset_id):
                    if c.get("centroid"):
                        keys.append((dataset_id, int(c["cluster"])))
                        rows.append(c["centroid"])
            if not rows:
                continue
            cent = np.asarray(rows, dtype=np.float64)
            cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
            sim = emb @ cent.T  # (n, clusters): cosine similarity
            share = np.bincount(sim.argmax(axis=1), minlength=len(keys)) / n
            column = {k: j for j, k in enumerate(keys)}
            for e in members:
                j = column.get((e.dataset_id, e.cluster))
                if j is None:
                    continue
                value = float(share[j])
                entries.append({
                    "id": e.id, "kind": e.kind, "dataset_id": e.dataset_id, "dataset": e.dataset, "cluster": e.cluster,
                    "index_version": e.index_version, "sha256": e.sha256, "score": value, "target_accuracy": None,
                    "heldout_accuracy": e.heldout_accuracy, "relative_accuracy": None,
                    "details": {"backbone": version, "nearest_share": round(value, 4), "mean_similarity": round(float(sim[:, j].mean()), 4)},
                })
                scores[e.id] = value
        if progress is not None:
            progress("score", 1, 1)
        result = Scores(
            method="embedding", num_images=n, skipped=len(decoded.skipped), scores=scores, experts=entries, labels=None,
            skipped_files=[{"image": img, "reason": why} for img, why in decoded.skipped[:100]], server=self.base_url,
            provider=",".join(sorted(set(providers + [r.provider for r in cls_runners]))) or None,
        )
        if classifier_experts is not None:
            result.label_priors = self._priors(cls_runners, decoded, temperature, batch_size, progress)
            result.temperature = temperature
        return result

    def label_priors(
        self,
        images: Any,
        temperature: float = 2.0,
        *,
        experts: Sequence[LocalExpert] | None = None,
        batch_size: int = 256,
        progress: ProgressFn | None = None,
    ) -> dict[int, dict[str, float]]:
        """For each source dataset with a label classifier: the estimated label distribution of the
        target, P_t(y) = mean over the target images of softmax(logits / temperature)
        (Ngiam et al., 2018). Keyed by dataset id; each distribution sums to 1."""
        self._check_temperature(temperature)
        target = _resolve_target(images, None)
        classifiers = self._experts_of("classifier", experts, progress)
        if not classifiers:
            return {}
        runners = self._runners(classifiers)
        decoded = _decode(target, [r.input_size for r in runners], progress)
        return self._priors(runners, decoded, temperature, batch_size, progress)

    @staticmethod
    def _check_temperature(temperature: float) -> None:
        if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature <= 0:
            raise ClientInputError(f"temperature must be a positive number, got {temperature!r}", field="temperature")

    @staticmethod
    def _priors(runners: Sequence[_Runner], decoded: _Decoded, temperature: float, batch_size: int, progress: ProgressFn | None) -> dict[int, dict[str, float]]:
        if not runners:
            return {}
        ran = _forward(runners, decoded, rotate=False, batch_size=batch_size, keep_features=False, keep_logits=True,
                       progress=progress, stage="priors")
        out: dict[int, dict[str, float]] = {}
        for r in runners:
            logits = np.concatenate(ran[r.expert.id]["logits"]).astype(np.float64)
            if logits.shape[1] != len(r.label_names):
                raise IntegrityError(f"classifier expert {r.expert.id} has {logits.shape[1]} outputs but {len(r.label_names)} label names")
            p = _softmax(logits / float(temperature)).mean(axis=0)
            p = p / p.sum()
            out[r.expert.dataset_id] = {name: float(v) for name, v in zip(r.label_names, p)}
        return out

    # ---------------------------------------------------------------- retrieval

    def query(
        self,
        scores: Scores | Mapping[int | str, float],
        *,
        budget: int,
        label_priors: Mapping[int | str, Mapping[str, float]] | None = None,
        replacement: bool = True,
        temperature: float | None = None,
        datasets: Sequence[int] | None = None,
        seed: int = 0,
        target_size: int | None = None,
        score_method: str | None = None,
    ) -> dict:
        """POST /v1/queries: turn expert scores (and optional label priors) into a sampled
        training set of ``budget`` source samples; returns the server's JSON (with the query id).
        With a :class:`Scores`, its ``label_priors`` are sent unless ``label_priors`` is given,
        and its number of images and method go along as ``target_size`` and ``score_method``
        (they let the server recommend a fine-tuning recipe)."""
        if isinstance(scores, Scores):
            if label_priors is None:
                label_priors = scores.label_priors
            target_size = scores.num_images if target_size is None else target_size
            score_method = scores.method if score_method is None else score_method
            scores = scores.scores
        if not isinstance(scores, Mapping) or not scores:
            raise ClientInputError("scores must be a non-empty {expert id: score} mapping or a Scores", field="scores")
        body = {
            "expert_scores": {str(k): float(v) for k, v in scores.items()},
            "label_priors": None if label_priors is None else {str(k): {str(lab): float(p) for lab, p in v.items()} for k, v in label_priors.items()},
            "budget": budget,
            "replacement": replacement,
            "temperature": temperature,
            "datasets": None if datasets is None else list(datasets),
            "seed": seed,
        }
        if target_size is not None:
            body["target_size"] = int(target_size)
        if score_method is not None:
            body["score_method"] = score_method
        return self._json("POST", "/v1/queries", json_body=body)

    def manifest(self, query_id: str | int, path: str | os.PathLike, format: str | None = None) -> Path:
        """GET /v1/queries/{id}/manifest, streamed to ``path`` (temp file + rename). The format
        (csv, jsonl, parquet) is taken from the file's suffix unless given."""
        path = Path(path)
        fmt = format or MANIFEST_FORMATS.get(path.suffix.lower())
        if fmt not in MANIFEST_FORMATS.values():
            raise ClientInputError(
                f"cannot tell the manifest format from {path.name!r}" if format is None else f"unknown manifest format {format!r}",
                field="format", hint="use a .csv, .jsonl or .parquet file name, or pass format=",
            )

        def write(fh: Any) -> None:
            with self._exchange("GET", f"/v1/queries/{query_id}/manifest", params={"format": fmt}, stream=True) as response:
                for chunk in response.iter_bytes(1 << 16):
                    fh.write(chunk)

        _atomic_write(path, write)
        return path


def _provider(runners: Sequence[_Runner]) -> str | None:
    names = sorted({r.provider for r in runners})
    return None if not names else names[0] if len(names) == 1 else ",".join(names)
