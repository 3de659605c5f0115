"""``linear-probe``: how well a linear classifier on each expert's features separates the
target's labels ("fast adapt" in Yan et al., 2020).

The expert's penultimate features of the target images are standardised and a logistic
regression is cross-validated on the labels (stratified, up to 5 folds); the mean accuracy
is the score. Needs at least 2 labels with at least 2 images each, and scikit-learn
(``pip install 'nds-client[probe]'``), imported only here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from nds_client.errors import MissingDependencyError, TargetError
from nds_client.inference import forward
from nds_client.methods.base import MethodScores, ScoringMethod, ScoringRun, expert_entry


def check_probe_labels(labels: Sequence[str], after: str = "") -> dict[str, int]:
    """Images per label; TargetError unless there are 2 labels with 2 images each (``after``
    ends the message: what happened to the images before)."""
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


def linear_probe(features: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Cross-validated accuracy of a logistic-regression probe on standardised features."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:
        raise MissingDependencyError("the linear-probe method needs scikit-learn, which is not installed",
                                     hint="pip install 'nds-client[probe]', or use --method rotation") from exc
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


class LinearProbeMethod(ScoringMethod):
    name = "linear-probe"
    needs_labels = True

    def check_labels(self, labels: Sequence[str] | None) -> None:
        check_probe_labels(labels or ())

    def score(self, run: ScoringRun) -> MethodScores:
        runners = run.sessions.runners(run.experts)
        decoded = run.decode([r.input_size for r in runners])
        labels = decoded.labels or []
        counts = check_probe_labels(labels, after=f" after skipping {len(decoded.skipped)} unreadable image(s)")
        ran = forward(runners, decoded, rotate=False, batch_size=run.batch_size, keep_features=True, keep_logits=False,
                      progress=run.progress, stage="score")
        entries = []
        for r in runners:
            probe = linear_probe(np.concatenate(ran[r.expert.id]["features"]), labels)
            details = {"probe_std": round(probe["probe_std"], 4), "folds": probe["folds"]}
            entries.append(expert_entry(r.expert, probe["probe_accuracy"], accuracy=True, details=details))
        return MethodScores(decoded=decoded, entries=entries, providers=[r.provider for r in runners], labels=counts)
