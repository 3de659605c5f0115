"""The scoring methods, by name, behind one interface (:class:`~nds_client.methods.base.ScoringMethod`).

=================  ===========================================================  ======
name               score of an expert                                           labels
=================  ===========================================================  ======
``rotation``       its accuracy at predicting the rotation of the target images  no
``linear-probe``   cross-validated accuracy of a linear probe on its features   yes
``embedding``      share of the target images nearest its cluster's centroid    no
``auto``           ``embedding`` where the server publishes every scored         no
                   dataset's backbone, else ``rotation`` (:func:`resolve_auto`)
=================  ===========================================================  ======
"""

from __future__ import annotations

from nds_client.errors import ClientInputError
from nds_client.methods.base import ScoringMethod, ScoringRun
from nds_client.methods.embedding import EmbeddingMethod
from nds_client.methods.linear_probe import LinearProbeMethod
from nds_client.methods.rotation import RotationMethod

__all__ = ["AUTO", "METHODS", "ScoringMethod", "ScoringRun", "method_named", "resolve_auto"]

#: The default: ``embedding`` where the server publishes the backbone of every scored
#: dataset's embedding space, else ``rotation`` (both need no labels).
AUTO = "auto"
_REGISTRY: dict[str, type[ScoringMethod]] = {m.name: m for m in (RotationMethod, LinearProbeMethod, EmbeddingMethod)}
#: every name ``score(method=...)`` and ``--method`` take
METHODS: tuple[str, ...] = (AUTO, *_REGISTRY)


def method_named(name: str) -> ScoringMethod | None:
    """A new instance of the method ``name``; None for ``auto``, which :func:`resolve_auto`
    resolves once the server's experts are known. ClientInputError for an unknown name."""
    if name == AUTO:
        return None
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ClientInputError(f"unknown method {name!r}", field="method", hint=f"one of: {', '.join(METHODS)}")
    return _REGISTRY[name]()


def resolve_auto(run: ScoringRun) -> ScoringMethod:
    """What ``auto`` means for this run: ``embedding`` when the server publishes the backbone
    of every scored expert's embedding space, else ``rotation``."""
    embedding = EmbeddingMethod()
    return embedding if embedding.covers_all(run) else RotationMethod()
