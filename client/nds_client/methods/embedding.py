"""``embedding``: which expert's cluster the target images fall in, in the backbone's space (no labels).

The server publishes the backbone each dataset was embedded with and the centroids of its
clusters. The backbone is downloaded (cached, sha256-checked) and run here, like the
experts; each target image votes for its nearest centroid (cosine similarity), and an
expert's score is the share of the images that voted for its cluster. It works where
rotation cannot: on images without an upright orientation (textures, aerial views,
microscopy). Experts whose dataset's space has no downloadable backbone are not scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nds_client import runtime as onnx_runtime
from nds_client.errors import NDSClientError
from nds_client.methods.base import MethodScores, ScoringMethod, ScoringRun, expert_entry
from nds_client.preprocessing import normalize_rows, to_nchw
from nds_client.scores import LocalExpert


@dataclass
class _Spaces:
    """The server's downloadable backbones by version, the experts grouped by the embedding
    space of their dataset, and the experts whose space has no downloadable backbone."""

    backbones: dict[str, dict]
    experts: dict[str, list[LocalExpert]]
    uncovered: list[LocalExpert]


class EmbeddingMethod(ScoringMethod):
    name = "embedding"
    runs_experts = False  # the backbone runs, not the rotation experts

    def __init__(self) -> None:
        self._spaces: _Spaces | None = None

    def spaces(self, run: ScoringRun) -> _Spaces:
        """The embedding spaces of ``run.experts`` (asked of the server once)."""
        if self._spaces is None:
            backbones = {s["version"]: s for s in run.client.backbones() if s.get("downloadable")}
            space_of = {int(d["id"]): d.get("backbone") for d in run.datasets()}
            by_space: dict[str, list[LocalExpert]] = {}
            uncovered: list[LocalExpert] = []
            for e in run.experts:
                version = space_of.get(e.dataset_id)
                if version is not None and version in backbones:
                    by_space.setdefault(version, []).append(e)
                else:
                    uncovered.append(e)
            self._spaces = _Spaces(backbones=backbones, experts=by_space, uncovered=uncovered)
        return self._spaces

    def covers_all(self, run: ScoringRun) -> bool:
        """Whether the server publishes the backbone of every scored expert's space."""
        spaces = self.spaces(run)
        return bool(spaces.experts) and not spaces.uncovered

    def prepare(self, run: ScoringRun) -> None:
        if not self.spaces(run).experts:
            raise NDSClientError(
                f"the server at {run.client.base_url} publishes no backbone its experts' datasets were indexed with",
                hint="index the datasets with the default backbone (or onnx:<file>), or use --method rotation",
            )

    def score(self, run: ScoringRun) -> MethodScores:
        spaces = self.spaces(run)
        decoded = run.decode([int(spaces.backbones[v]["input_size"]) for v in spaces.experts])
        n = len(decoded)
        entries, providers = [], []
        for version, members in sorted(spaces.experts.items()):
            space = spaces.backbones[version]
            path, _ = run.cache.file(f"/v1/backbones/{version}/model.onnx", str(space["sha256"]).lower(), what=f"backbone {version}")
            session = onnx_runtime.create_session(path, prefer_gpu=onnx_runtime.cuda_usable() is not False)
            providers.append(onnx_runtime.active_provider(session))
            outputs = [o.name for o in session.get_outputs()]
            output, name = ("features" if "features" in outputs else outputs[0]), session.get_inputs()[0].name
            x = decoded.arrays[int(space["input_size"])]
            step = max(1, run.batch_size)
            feats = [session.run([output], {name: to_nchw(x[i : i + step], space["mean"], space["std"])})[0].reshape(len(x[i : i + step]), -1)
                     for i in range(0, n, step)]
            emb = normalize_rows(np.concatenate(feats), np.float64)
            keys: list[tuple[int, int | None]] = []
            rows = []
            for dataset_id in sorted({e.dataset_id for e in members}):
                for c in run.client.clusters(dataset_id):
                    if c.get("centroid"):
                        keys.append((dataset_id, int(c["cluster"])))
                        rows.append(c["centroid"])
            if not rows:
                continue
            sim = emb @ normalize_rows(np.asarray(rows), np.float64).T  # (n, clusters): cosine similarity
            share = np.bincount(sim.argmax(axis=1), minlength=len(keys)) / n
            column = {k: j for j, k in enumerate(keys)}
            for e in members:
                j = column.get((e.dataset_id, e.cluster))
                if j is None:
                    continue
                value = float(share[j])
                details = {"backbone": version, "nearest_share": round(value, 4), "mean_similarity": round(float(sim[:, j].mean()), 4)}
                entries.append(expert_entry(e, value, accuracy=False, details=details))
        if run.progress is not None:
            run.progress("score", 1, 1)
        return MethodScores(decoded=decoded, entries=entries, providers=providers, labels=None)
