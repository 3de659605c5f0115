"""nds-client: score a Neural Data Server's experts on your own images, locally, and fetch
the training manifest it selects::

    from nds_client import Client

    with Client("https://nds.example.org", token="...") as client:
        scores = client.score("./my-images")
        query = client.query(scores, budget=10_000)
        client.manifest(query["id"], "manifest.csv")

The names below are loaded on first use (PEP 562), so importing a submodule the server
shares, such as :mod:`nds_client.images` or :mod:`nds_client.errors`, does not import
httpx or the SDK.

Modules: :mod:`~nds_client.client` (the facade), :mod:`~nds_client.transport`,
:mod:`~nds_client.cache`, :mod:`~nds_client.targets`, :mod:`~nds_client.methods`,
:mod:`~nds_client.priors`, :mod:`~nds_client.scores`, :mod:`~nds_client.cli` (the
``nds-client`` command), and the pieces the server uses too: :mod:`~nds_client.errors`,
:mod:`~nds_client.images`, :mod:`~nds_client.preprocessing`, :mod:`~nds_client.runtime`,
:mod:`~nds_client.manifests`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nds_client.client import NDSClient
    from nds_client.client import NDSClient as Client
    from nds_client.errors import (
        ClientInputError,
        IntegrityError,
        MissingDependencyError,
        NDSClientError,
        NDSError,
        ServerError,
        ServerUnreachable,
        TargetError,
    )
    from nds_client.methods import METHODS
    from nds_client.scores import LocalExpert, Scores
    from nds_client.targets import imagefolder_labels, read_labels_csv

#: public name -> (module, name in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    "Client": ("nds_client.client", "NDSClient"),
    "NDSClient": ("nds_client.client", "NDSClient"),
    "Scores": ("nds_client.scores", "Scores"),
    "LocalExpert": ("nds_client.scores", "LocalExpert"),
    "METHODS": ("nds_client.methods", "METHODS"),
    "read_labels_csv": ("nds_client.targets", "read_labels_csv"),
    "imagefolder_labels": ("nds_client.targets", "imagefolder_labels"),
    **{name: ("nds_client.errors", name) for name in (
        "NDSError", "NDSClientError", "ServerError", "ServerUnreachable", "IntegrityError", "MissingDependencyError",
        "ClientInputError", "TargetError",
    )},
}

__all__ = [
    "METHODS", "Client", "ClientInputError", "IntegrityError", "LocalExpert", "MissingDependencyError", "NDSClient",
    "NDSClientError", "NDSError", "Scores", "ServerError", "ServerUnreachable", "TargetError", "imagefolder_labels",
    "read_labels_csv",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nds_client' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
