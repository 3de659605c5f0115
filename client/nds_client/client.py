"""The client: score the server's experts on private target images, locally.

The user's images never leave their machine; only numbers do::

    from nds_client import Client

    with Client("http://127.0.0.1:8000") as client:
        scores = client.score("my_images/")                      # auto: embedding votes, or rotation accuracy
        scores = client.score("my_images/", labels="imagefolder", method="linear-probe")
        priors = client.label_priors("my_images/")               # {dataset_id: {label: P_t(label)}}
        scores.save("scores.json")                               # plain JSON, never a pickle
        query = client.query(scores, budget=10_000)
        client.manifest(query["id"], "manifest.csv")
        client.webdataset(query["id"], "shards/")                # the selected images, as WebDataset tar shards

:class:`NDSClient` is the facade; what it does is in the modules named after it:
:mod:`~nds_client.transport` (HTTP, paging, the server's errors), :mod:`~nds_client.cache`
(downloads, sha256-checked), :mod:`~nds_client.targets` (the images and labels),
:mod:`~nds_client.methods` (one module per scoring method), :mod:`~nds_client.priors`
(label priors) and :mod:`~nds_client.scores` (the result, as plain JSON).

Light on purpose: httpx, numpy, onnxruntime (imported when a network first runs) and
pillow; scikit-learn only for the ``linear-probe`` method. Each image is decoded and
resized once per distinct input size; the arrays (and their four rotations) are shared
by every expert of that size.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from nds_client import methods
from nds_client.cache import SHA256, NetworkCache, default_cache_dir
from nds_client.errors import ClientInputError, IntegrityError, NDSClientError, TargetError
from nds_client.files import atomic_write
from nds_client.inference import Sessions, provider_of
from nds_client.manifests import MANIFEST_FORMATS, format_for_path
from nds_client.methods.base import ScoringRun
from nds_client.priors import check_temperature, label_priors
from nds_client.scores import LocalExpert, ProgressFn, Scores
from nds_client.targets import decode_target, resolve_target
from nds_client.transport import EXPERT_FIELDS, Connection

__all__ = ["NDSClient"]


class NDSClient:
    """A Neural Data Server client: lists and downloads experts, scores them on local images,
    estimates label priors, sends queries and fetches manifests.

    ``token`` is sent as ``Authorization: Bearer <token>``; ``transport`` is handed to httpx
    (tests, proxies). Experts are cached at ``cache_dir/<sha256>.onnx`` (default
    ``~/.cache/nds/experts``). Use it as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        cache_dir: str | os.PathLike | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._server = Connection(base_url, token, timeout=timeout, transport=transport)
        self.base_url = self._server.base_url
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.timeout = timeout
        self._sessions = Sessions()

    def close(self) -> None:
        self._server.close()
        self._sessions.clear()

    def __enter__(self) -> NDSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NDSClient({self.base_url!r})"

    def _json(self, method: str, path: str, *, params: dict | None = None, json_body: Any = None) -> Any:
        return self._server.json(method, path, params=params, json_body=json_body)

    # ---------------------------------------------------------------- catalog

    def health(self) -> dict:
        """GET /healthz: status, mode, schema revision."""
        return self._json("GET", "/healthz")

    def datasets(self) -> list[dict]:
        """Every registered dataset (all pages of GET /v1/datasets)."""
        return self._server.pages("/v1/datasets", fields={"id": int, "name": str})

    def experts(self, kind: str | None = None, dataset: int | None = None) -> list[dict]:
        """Experts of every dataset's active index (GET /v1/experts); ``kind``: rotation or classifier."""
        if kind is not None and kind not in ("rotation", "classifier"):
            raise ClientInputError(f"unknown expert kind {kind!r}", field="kind", hint="rotation or classifier")
        return self._server.pages("/v1/experts", {"kind": kind, "dataset": dataset}, fields=EXPERT_FIELDS)

    def expert(self, expert_id: int) -> dict:
        """One expert (GET /v1/experts/{id})."""
        return self._json("GET", f"/v1/experts/{int(expert_id)}")

    def clusters(self, dataset_id: int) -> list[dict]:
        """The clusters of a dataset's active index, with their centroids (GET /v1/datasets/{id}/clusters)."""
        return self._json("GET", f"/v1/datasets/{int(dataset_id)}/clusters")

    def backbones(self) -> list[dict]:
        """The embedding spaces of the indexed datasets (GET /v1/backbones)."""
        return self._server.listing("/v1/backbones", fields={"version": str})

    # ---------------------------------------------------------------- downloads

    def _cache(self, cache_dir: str | os.PathLike | None) -> NetworkCache:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else self.cache_dir or default_cache_dir()
        return NetworkCache(self._server, folder)

    def pull_experts(self, cache_dir: str | os.PathLike | None = None, kind: str | None = None, *, progress: ProgressFn | None = None) -> list[LocalExpert]:
        """Download the experts missing from the cache (``cache_dir/<sha256>.onnx``); files already
        there are checked against their sha256 and downloaded again when it does not match."""
        cache = self._cache(cache_dir)
        return cache.fetch(self._listed(kind, cache, self.datasets), progress)

    def _listed(self, kind: str | None, cache: NetworkCache, datasets: Callable[[], list[dict]]) -> list[LocalExpert]:
        """The server's experts as :class:`LocalExpert` entries pointing into ``cache``, nothing
        downloaded yet (:meth:`NetworkCache.fetch` makes the files real). ``datasets``: the
        dataset listing (for the names), asked for only when there are experts."""
        records = self.experts(kind=kind)
        names = {int(d["id"]): d.get("name", str(d["id"])) for d in (datasets() if records else ())}
        listed: list[LocalExpert] = []
        for rec in records:
            sha = str(rec.get("sha256", "")).lower()
            if not SHA256.fullmatch(sha):
                raise IntegrityError(f"the server lists expert {rec.get('id')} with an invalid sha256 {sha!r}")
            try:  # the listing's types are checked (experts()); meta and metrics are free-form
                listed.append(LocalExpert.from_listing(rec, dataset=names.get(int(rec["dataset_id"])), path=cache.path(sha)))
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise self._server.bad_listing("/v1/experts", f"expert {rec.get('id')}'s meta or metrics are malformed ({type(exc).__name__}: {exc})") from None
        return listed

    # ---------------------------------------------------------------- scoring

    def score(
        self,
        images: Any,
        labels: Any = None,
        method: str = methods.AUTO,
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
        chosen = methods.method_named(method)  # None: auto, resolved once the experts are listed
        if chosen is not None and chosen.needs_labels and labels is None:
            raise TargetError(f"the {chosen.name} method needs labels", field="labels", hint="--labels CSV or --imagefolder (SDK: labels=...)")
        check_temperature(temperature)
        target = resolve_target(images, labels)
        if chosen is not None:
            chosen.check_labels(target.labels)
        fetched = experts is not None
        cache = self._cache(None)
        datasets = functools.cache(self.datasets)  # one listing serves the expert names and the datasets' embedding spaces
        if experts is None:  # listed only: the files that will run are fetched once the method is known
            experts = self._listed(None if priors else "rotation", cache, datasets)
        rotation_experts = [e for e in experts if e.kind == "rotation"]
        if not rotation_experts:
            raise NDSClientError(f"the server at {self.base_url} has no rotation experts to score",
                                 hint="index a dataset first: nds index NAME")
        classifier_experts = [e for e in experts if e.kind == "classifier"] if priors else []
        run = ScoringRun(client=self, target=target, experts=rotation_experts, datasets=datasets, cache=cache,
                         sessions=self._sessions, batch_size=batch_size, progress=progress)
        if chosen is None:
            chosen = methods.resolve_auto(run)
        chosen.prepare(run)
        if not fetched:
            classifier_experts = cache.fetch(classifier_experts, progress) if classifier_experts else []
            if chosen.runs_experts:
                run.experts = cache.fetch(rotation_experts, progress)
        run.classifiers = self._sessions.runners(classifier_experts)
        found = chosen.score(run)
        decoded = found.decoded
        result = Scores(
            method=chosen.name, num_images=len(decoded), skipped=len(decoded.skipped),
            scores={e["id"]: e["score"] for e in found.entries}, experts=found.entries, labels=found.labels,
            skipped_files=decoded.skipped_files(), server=self.base_url,
            provider=provider_of([*found.providers, *(r.provider for r in run.classifiers)]),
        )
        if priors:
            result.label_priors = label_priors(run.classifiers, decoded, temperature, batch_size, progress)
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
        check_temperature(temperature)
        target = resolve_target(images, None)
        if experts is None:
            experts = self.pull_experts(kind="classifier", progress=progress)
        classifiers = [e for e in experts if e.kind == "classifier"]
        if not classifiers:
            return {}
        runners = self._sessions.runners(classifiers)
        decoded = decode_target(target, [r.input_size for r in runners], progress)
        return label_priors(runners, decoded, temperature, batch_size, progress)

    # ---------------------------------------------------------------- retrieval

    def query(
        self,
        scores: Scores | Mapping[Any, float],
        *,
        budget: int,
        label_priors: Mapping[Any, Mapping[str, float]] | None = None,
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
        priors = label_priors
        expert_scores: Mapping[Any, float]
        if isinstance(scores, Scores):
            priors = scores.label_priors if priors is None else priors
            target_size = scores.num_images if target_size is None else target_size
            score_method = scores.method if score_method is None else score_method
            expert_scores = scores.scores
        else:
            expert_scores = scores
        if not isinstance(expert_scores, Mapping) or not expert_scores:
            raise ClientInputError("scores must be a non-empty {expert id: score} mapping or a Scores", field="scores")
        body: dict[str, Any] = {
            "expert_scores": {str(k): float(v) for k, v in expert_scores.items()},
            "label_priors": None if priors is None else {str(k): {str(lab): float(p) for lab, p in v.items()} for k, v in priors.items()},
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

    def manifest(self, query_id: str | int, path: str | os.PathLike, format: str | None = None, *,
                 offset: int = 0, limit: int | None = None) -> Path:
        """GET /v1/queries/{id}/manifest, streamed to ``path`` (temp file + rename). The format
        (csv, jsonl, parquet, webdataset, img2dataset) is taken from the file's suffix unless
        given; ``offset``/``limit`` fetch only rows ``offset`` .. ``offset + limit - 1``."""
        path = Path(path)
        fmt = format or format_for_path(path)
        if fmt not in MANIFEST_FORMATS:
            raise ClientInputError(
                f"cannot tell the manifest format from {path.name!r}" if format is None else f"unknown manifest format {format!r}",
                field="format", hint="use a .csv, .jsonl, .parquet or .tar file name, or pass format=",
            )
        params: dict[str, Any] = {"format": fmt}
        if offset:
            params["offset"] = int(offset)
        if limit is not None:
            params["limit"] = int(limit)

        def write(fh: IO[bytes]) -> None:
            with self._server.exchange("GET", f"/v1/queries/{query_id}/manifest", params=params, stream=True) as response:
                for chunk in response.iter_bytes(1 << 16):
                    fh.write(chunk)

        atomic_write(path, write)
        return path

    def webdataset(self, query_id: str | int, folder: str | os.PathLike, *, shard_size: int = 10_000,
                   total: int | None = None, progress: Callable[[int, int], None] | None = None) -> list[Path]:
        """The selected images themselves, as WebDataset shards ``folder/shard-00000.tar``, ... of
        ``shard_size`` samples each (each sample once, its ``count`` in its JSON member). The
        server reads the images (GET /v1/queries/{id}/manifest?format=webdataset&offset=&limit=),
        so this works for keys that cannot see the data; each shard is written to a temporary
        file and renamed, and ``folder`` must be new or empty. ``total``: the number of rows (the
        query's ``unique_samples``; asked for when not given). ``progress(done, shards)`` after each shard."""
        if int(shard_size) < 1:
            raise ClientInputError(f"the shard size must be at least 1, not {shard_size}", field="shard_size")
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ClientInputError(f"{folder} is not an empty folder", field="output", hint="give a new or empty folder")
        if total is None:
            total = int(self._json("GET", f"/v1/queries/{query_id}")["summary"]["unique_samples"])
        shards = -(-int(total) // int(shard_size))
        folder.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for i in range(shards):
            written.append(self.manifest(query_id, folder / f"shard-{i:05d}.tar", format="webdataset",
                                         offset=i * int(shard_size), limit=int(shard_size)))
            if progress is not None:
                progress(i + 1, shards)
        return written
