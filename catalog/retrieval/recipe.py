"""The transfer recipe a query recommends, from the target's size and how close its domain is. Pure: no SQL."""

from __future__ import annotations

from collections.abc import Mapping

from nds.catalog.retrieval.request import QueryRequest

LARGE_TARGET = 1000          # images: above this, fine-tuning beats a linear probe (cs231n)
SIMILAR_ROTATION_SCORE = 0.5  # rotation accuracy (chance 0.25) above which the domain counts as similar
SIMILAR_PROBE_SCORE = 0.8     # linear-probe accuracy above which the features count as transferable
SIMILAR_EMBEDDING_SHARE = 0.5  # share of the target nearest one cluster above which the domain counts as close


def closeness(method: str, cluster_scores: Mapping[tuple[int, int], float], names: Mapping[int, str]) -> tuple[float, str] | None:
    """How close the nearest source domain is, from the rotation experts' scores, and how it was read.

    Rotation and linear-probe scores measure each expert on its own: the best one counts.
    Embedding scores are shares of the target nearest each cluster, so a domain split into K
    clusters splits its votes K ways: the shares are summed per dataset and the best dataset counts."""
    if not cluster_scores:
        return None
    if method == "embedding":
        per_dataset: dict[int, float] = {}
        for (did, _), share in cluster_scores.items():
            per_dataset[did] = per_dataset.get(did, 0.0) + share
        did, value = max(per_dataset.items(), key=lambda kv: kv[1])
        return value, f"{value:.2f} of the target nearest the clusters of {names.get(did, str(did))!r}"
    value = max(cluster_scores.values())
    return value, f"best {method} score {value:.2f}"


def recommend_recipe(request: QueryRequest, cluster_scores: Mapping[tuple[int, int], float], names: Mapping[int, str]) -> dict[str, str]:
    """A transfer recipe from the target's size and how close the experts say its domain is (:func:`closeness`)."""
    n = request.target_size
    method = request.score_method or "rotation"
    close = closeness(method, cluster_scores, names)
    threshold = {"linear-probe": SIMILAR_PROBE_SCORE, "embedding": SIMILAR_EMBEDDING_SHARE}.get(method, SIMILAR_ROTATION_SCORE)
    size_text = f"{n} target images" if n else "a target of unknown size (assumed small)"
    if n and n >= LARGE_TARGET:
        return {"recipe": "fine-tune", "reason": f"With {size_text}, pre-train on the selection and fine-tune every layer: there is enough target data to adapt the whole network."}
    if close is not None and close[0] >= threshold:  # a close source domain
        return {"recipe": "linear-probe", "reason": f"With {size_text} and a close source domain ({close[1]} >= {threshold}), pre-train on the selection and train a linear classifier on its frozen features."}
    score_text = f"{close[1]} < {threshold}" if close is not None else "no expert scores"
    return {"recipe": "linear-probe-early-layers", "reason": f"With {size_text} and a distant source domain ({score_text}), train a linear classifier on earlier-layer features of the network pre-trained on the selection, or fine-tune only the last block."}
