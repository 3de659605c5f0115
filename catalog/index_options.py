"""The options of an index job, their defaults and their limits, written once.

:class:`IndexRequest` holds the defaults; :data:`INDEX_LIMITS` the bounds and the help text
of each integer option. The three places that take these options read them from here: the
REST body (``nds.api.schemas.IndexBody``: its ``Field`` bounds, so out-of-range values are
a 422 before anything runs), :meth:`IndexRequest.validate` (every caller, the CLI included)
and the ``nds index`` command (its option defaults and help). Kept free of heavy imports, so
that the CLI can read it when it starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from nds_client.errors import InvalidInputError

PARTITIONS = ("kmeans", "labels")


@dataclass(frozen=True)
class OptionLimit:
    """The inclusive bounds of one integer option, and what it means."""

    low: int
    high: int
    help: str
    unit: str = ""  # appended to the bounds in messages: " pixels"
    #: below ``low`` the message says "at least LOW" (an option whose upper bound is only a sanity cap)
    at_least: bool = False

    @property
    def cli_help(self) -> str:
        return f"{self.help} [{self.low} to {self.high}{self.unit}]"

    def check(self, name: str, value: object) -> None:
        """InvalidInputError (field ``name``) unless ``value`` is an int within the bounds."""
        if isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high:
            return
        below = not isinstance(value, int) or isinstance(value, bool) or value < self.low
        if self.at_least:
            rule = f"at least {self.low}" if below else f"at most {self.high}"
        else:
            rule = f"between {self.low} and {self.high}{self.unit}"
        raise InvalidInputError(f"{name} must be {rule}, got {value!r}", field=name)


INDEX_LIMITS: dict[str, OptionLimit] = {
    "clusters": OptionLimit(1, 100_000, "K, the number of clusters (one rotation expert each).", at_least=True),
    "image_size": OptionLimit(16, 512, "Side in pixels of the experts' inputs.", unit=" pixels"),
    "epochs": OptionLimit(1, 1000, "Training epochs per expert."),
    "min_steps": OptionLimit(0, 100_000, "Optimizer steps per network at least: small clusters train more epochs."),
    "width": OptionLimit(4, 128, "Channels of the experts' first stage."),
    "seed": OptionLimit(0, 2**31 - 1, "Seed for k-means and training."),
}


@dataclass(frozen=True)
class IndexRequest:
    clusters: int = 8
    partition: str = "kmeans"
    backbone: str = "default"
    weights: str | None = None
    image_size: int = 64
    epochs: int = 8
    width: int = 16
    seed: int = 0
    min_steps: int = 150  # optimizer steps per network at least: small clusters get more epochs

    def validate(self) -> None:
        INDEX_LIMITS["clusters"].check("clusters", self.clusters)
        if self.partition not in PARTITIONS:
            raise InvalidInputError(f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}", field="partition")
        for name in ("image_size", "epochs", "min_steps", "width", "seed"):
            INDEX_LIMITS[name].check(name, getattr(self, name))
