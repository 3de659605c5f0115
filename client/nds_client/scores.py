"""What scoring works on and what it gives back: the downloaded experts and the scores file.

:class:`LocalExpert` is one expert the server lists, with the path its ONNX file has (or
will have) in the local cache. :class:`Scores` is what :meth:`nds_client.Client.score`
returns and ``nds-client score -o`` writes: plain JSON in the format :data:`SCORES_FORMAT`,
never a pickle, which ``nds-client query --scores`` (and :meth:`nds_client.Client.query`)
sends to the server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nds_client.errors import ClientInputError
from nds_client.files import atomic_write
from nds_client.preprocessing import IMAGENET_MEAN, IMAGENET_STD

SCORES_FORMAT = "nds.scores/v1"

#: ``progress(stage, done, total)``; stages: "download", "preprocess", "score", "priors".
ProgressFn = Callable[[str, int, int], None]


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

    @classmethod
    def from_listing(cls, row: Mapping[str, Any], *, dataset: str | None, path: Path) -> LocalExpert:
        """The expert a (type-checked) GET /v1/experts row describes, its file at ``path``.
        ``meta`` and ``metrics`` are free-form: AttributeError, KeyError, TypeError or
        ValueError when they are malformed."""
        meta = row.get("meta") or {}
        metrics = row.get("metrics") or {}
        held = metrics.get("heldout_accuracy", meta.get("heldout_accuracy"))
        return cls(
            id=int(row["id"]), kind=str(row["kind"]), dataset_id=int(row["dataset_id"]),
            dataset=dataset if dataset is not None else str(meta.get("dataset", row["dataset_id"])),
            cluster=row.get("cluster"), sha256=str(row["sha256"]).lower(), path=path,
            input_size=int(row["input_size"] or meta["input_size"]),
            mean=tuple(float(v) for v in meta.get("mean", IMAGENET_MEAN)), std=tuple(float(v) for v in meta.get("std", IMAGENET_STD)),
            label_names=tuple(str(v) for v in meta.get("label_names") or ()),
            heldout_accuracy=None if held is None else float(held), index_version=row.get("index_version"),
            byte_size=row.get("byte_size"),
        )


@dataclass
class Scores:
    """What ``score`` returns and ``nds-client score -o`` writes: plain JSON, never a pickle.

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
            return ClientInputError(f"not an NDS scores file: {why}", field="scores", hint="write one with `nds-client score TARGET -o scores.json` (or `nds score`)")

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
            known = set(cls.__dataclass_fields__)
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
        atomic_write(path, lambda fh: fh.write(self.to_json().encode() + b"\n"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ClientInputError(f"cannot read scores file {path}: {exc.strerror or exc}", field="scores") from None
        return cls.from_json(text)
