"""Label priors: the target's label distribution, as each source dataset's classifier sees it.

For each source dataset with a label classifier expert, P_t(y) = the mean over the target
images of softmax(logits / T) (Ngiam et al., 2018, T = 2 by default); the server weights
that dataset's samples by P_t(y) / P_s(y). Computed by :meth:`nds_client.Client.label_priors`
or, in the same pass over the images, by ``score(priors=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from nds_client.errors import ClientInputError, IntegrityError
from nds_client.inference import Runner, forward
from nds_client.preprocessing import softmax
from nds_client.scores import ProgressFn
from nds_client.targets import Decoded


def check_temperature(temperature: float) -> None:
    """ClientInputError unless ``temperature`` is a positive, finite number."""
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature <= 0:
        raise ClientInputError(f"temperature must be a positive number, got {temperature!r}", field="temperature")


def label_priors(runners: Sequence[Runner], decoded: Decoded, temperature: float, batch_size: int,
                 progress: ProgressFn | None) -> dict[int, dict[str, float]]:
    """{dataset id: {label: P_t(label)}} from the classifier experts' ``runners``; each sums to 1."""
    if not runners:
        return {}
    ran = forward(runners, decoded, rotate=False, batch_size=batch_size, keep_features=False, keep_logits=True,
                  progress=progress, stage="priors")
    out: dict[int, dict[str, float]] = {}
    for r in runners:
        logits = np.concatenate(ran[r.expert.id]["logits"]).astype(np.float64)
        if logits.shape[1] != len(r.label_names):
            raise IntegrityError(f"classifier expert {r.expert.id} has {logits.shape[1]} outputs but {len(r.label_names)} label names")
        p = softmax(logits / float(temperature)).mean(axis=0)
        p = p / p.sum()
        out[r.expert.dataset_id] = {name: float(v) for name, v in zip(r.label_names, p)}
    return out
