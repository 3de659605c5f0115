"""What a client asks a query for, the limits on it and its validation. No SQL: nothing here reads the catalog."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nds_client.errors import InvalidInputError

DEFAULT_TEMPERATURE = 0.1
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3  # normalised scores lie in [0, 1]: exp(1 / T) stays finite
PRIOR_TOLERANCE = 1e-3


@dataclass(frozen=True)
class QueryRequest:
    expert_scores: dict[int, float] = field(default_factory=dict)
    label_priors: dict[int, dict[str, float]] | None = None
    budget: int = 1000
    replacement: bool = True
    temperature: float | None = None
    datasets: list[int] | None = None
    seed: int = 0
    target_size: int | None = None       # number of target images, for the recipe
    score_method: str | None = None      # "rotation" or "linear-probe", for the recipe


def field_error(message: str, field_name: str, hint: str | None = None) -> InvalidInputError:
    """A 400 that names the request field at fault."""
    return InvalidInputError(message, field=field_name, hint=hint)


def validate_request(request: QueryRequest, *, max_budget: int) -> None:
    if not isinstance(request.budget, int) or request.budget < 1:
        raise field_error(f"budget must be at least 1, got {request.budget!r}", "budget")
    if request.budget > max_budget:
        raise field_error(f"budget {request.budget} is above the server's cap of {max_budget}", "budget", "ask for fewer samples or raise NDS_MAX_BUDGET")
    if request.temperature is not None and (not math.isfinite(request.temperature) or not MIN_TEMPERATURE <= request.temperature <= MAX_TEMPERATURE):
        raise field_error(f"temperature must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, got {request.temperature!r}", "temperature",
                          f"the default is {DEFAULT_TEMPERATURE}; lower values put more mass on the best cluster")
    if not request.expert_scores and not request.label_priors:
        raise field_error("give expert_scores, label_priors or both", "expert_scores", "score the experts with 'nds score' first")
    for expert_id, score in request.expert_scores.items():
        if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score) or score < 0:
            raise field_error(f"score of expert {expert_id} must be a finite number >= 0, got {score!r}", f"expert_scores.{expert_id}")
    for dataset_id, priors in (request.label_priors or {}).items():
        where = f"label_priors.{dataset_id}"
        if not priors:
            raise field_error(f"no priors given for dataset {dataset_id}", where)
        values = list(priors.values())
        if any(not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0 for v in values):
            raise field_error(f"priors of dataset {dataset_id} must be finite numbers >= 0", where)
        if abs(sum(values) - 1.0) > PRIOR_TOLERANCE:
            raise field_error(f"priors of dataset {dataset_id} sum to {sum(values):.6f}, not 1 (within {PRIOR_TOLERANCE})", where, "normalise them before sending")
    if request.seed < 0:
        raise field_error("seed must be >= 0", "seed")
