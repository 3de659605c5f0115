"""What a scoring method is: the one interface every method implements.

A method turns the target images into one score per rotation expert (higher: that expert's
cluster is a better source for the target). :meth:`nds_client.Client.score` resolves it by
name (:func:`nds_client.methods.method_named`; ``auto`` by :func:`~nds_client.methods.resolve_auto`), calls :meth:`ScoringMethod.check_labels` and
:meth:`ScoringMethod.prepare` before anything is downloaded, fetches what the method runs
(the experts' files when :attr:`ScoringMethod.runs_experts`), then :meth:`ScoringMethod.score`,
which decodes the target through :meth:`ScoringRun.decode` (so the classifiers that estimate
label priors see the same decoded images) and returns an entry per scored expert.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from nds_client.cache import NetworkCache
from nds_client.inference import Runner, Sessions
from nds_client.scores import LocalExpert, ProgressFn
from nds_client.targets import Decoded, Target, decode_target

if TYPE_CHECKING:
    from nds_client.client import NDSClient


@dataclass
class ScoringRun:
    """One call of ``score``, as a method sees it."""

    client: NDSClient
    target: Target
    experts: list[LocalExpert]  # the rotation experts to score (their files fetched once the method is known)
    datasets: Callable[[], list[dict]]  # the server's dataset listing, fetched at most once
    cache: NetworkCache
    sessions: Sessions
    batch_size: int
    progress: ProgressFn | None
    classifiers: list[Runner] = field(default_factory=list)  # the label classifiers, when priors are estimated too

    def decode(self, sizes: Sequence[int]) -> Decoded:
        """The target decoded once per input size: ``sizes`` and the classifiers' own."""
        return decode_target(self.target, [*sizes, *(r.input_size for r in self.classifiers)], self.progress)


@dataclass
class MethodScores:
    """What a method found: the target as it decoded it (:meth:`ScoringRun.decode`), an entry
    per scored expert, the execution providers that ran, and the images per label (when the
    method reports labels)."""

    decoded: Decoded
    entries: list[dict[str, Any]]
    providers: list[str]
    labels: dict[str, int] | None = None


def expert_entry(expert: LocalExpert, score: float, *, accuracy: bool, details: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~nds_client.scores.Scores` entry of one expert. ``accuracy``: the score is an
    accuracy on the target, comparable with the expert's held-out accuracy."""
    held = expert.heldout_accuracy
    return {
        "id": expert.id, "kind": expert.kind, "dataset_id": expert.dataset_id, "dataset": expert.dataset, "cluster": expert.cluster,
        "index_version": expert.index_version, "sha256": expert.sha256, "score": score,
        "target_accuracy": score if accuracy else None, "heldout_accuracy": held,
        "relative_accuracy": (score / held) if accuracy and held else None, "details": details,
    }


def count_labels(labels: Sequence[str]) -> dict[str, int]:
    """Images per label, labels sorted."""
    return {lab: labels.count(lab) for lab in sorted(set(labels))}


class ScoringMethod(ABC):
    """One way of scoring the experts on the target images."""

    #: the name ``score(method=...)`` and ``--method`` take
    name: ClassVar[str]
    #: labels are required (TargetError without them)
    needs_labels: ClassVar[bool] = False
    #: the rotation experts' files are run (False: the method downloads what it runs itself)
    runs_experts: ClassVar[bool] = True

    def check_labels(self, labels: Sequence[str] | None) -> None:
        """Refuse labels this method cannot use, before anything is downloaded or decoded."""

    def prepare(self, run: ScoringRun) -> None:
        """What can fail before a file is downloaded (the server lacks what the method needs)."""

    @abstractmethod
    def score(self, run: ScoringRun) -> MethodScores:
        """Score ``run.experts`` (their files fetched when :attr:`runs_experts`) on ``run.target``."""
