"""Embedding spaces: the backbone networks clients download to embed their own images.

A dataset indexed with a backbone that has a self-contained ONNX file (the ``default``
rotation backbone, ``onnx:<file>`` backbones) lives in that backbone's space; indexing
*publishes* the file under ``backbones/published/<version>.onnx`` in the artifact store,
with a JSON sidecar (version, dim, input size, normalisation, sha256, size). A client then
embeds its target images locally and compares them with the cluster centroids the catalog
lists (``GET /v1/datasets/{id}/clusters``): only scores leave the client, as with the
experts. Torchvision backbones have no ONNX file here, so their spaces are listed as not
downloadable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from nds.catalog.access import LOCAL, Principal, visible_clause
from nds.catalog.context import CatalogContext
from nds.catalog.tables import Dataset
from nds_client.errors import NotFoundError
from nds_client.files import sha256_file

PUBLISHED = "backbones/published"


def _keys(version: str) -> tuple[str, str]:
    return f"{PUBLISHED}/{version}.onnx", f"{PUBLISHED}/{version}.json"


def publish_backbone(ctx: CatalogContext, backbone: Any) -> dict | None:  # noqa: ANN401 - nds.plugins.contract.Backbone
    """Copy the backbone's ONNX file into the artifact store (once per version); its description, or None."""
    source: Path | None = getattr(backbone, "onnx_path", None)
    if source is None:
        return None
    model_key, info_key = _keys(backbone.version)
    if ctx.artifacts.exists(info_key):
        return json.loads(ctx.artifacts.open_path(info_key).read_text())
    path = ctx.artifacts.copy_in(model_key, Path(source))
    info = {**backbone.describe(), "sha256": sha256_file(path), "byte_size": path.stat().st_size}
    ctx.artifacts.write_bytes(info_key, json.dumps(info, indent=2).encode())  # written last: it marks the copy complete
    return info


def list_spaces(ctx: CatalogContext, *, session: Session, principal: Principal = LOCAL) -> list[dict]:
    """The embedding spaces of the indexed datasets ``principal`` may see, with their datasets."""
    query = select(Dataset.id, Dataset.backbone).where(Dataset.index_version > 0, Dataset.backbone.is_not(None))
    clause = visible_clause(principal)
    if clause is not None:
        query = query.where(clause)
    datasets: dict[str, list[int]] = {}
    for dataset_id, version in session.exec(query).all():
        datasets.setdefault(version, []).append(dataset_id)
    spaces = []
    for version in sorted(datasets):
        _, info_key = _keys(version)
        info = json.loads(ctx.artifacts.open_path(info_key).read_text()) if ctx.artifacts.exists(info_key) else {"version": version}
        spaces.append({**info, "version": version, "downloadable": "sha256" in info, "datasets": sorted(datasets[version])})
    return spaces


def space_model(ctx: CatalogContext, version: str, *, session: Session, principal: Principal = LOCAL) -> tuple[Path, dict]:
    """The ONNX file of a space ``principal`` may see (looked up among the listed versions,
    never by building a path from the request)."""
    for space in list_spaces(ctx, session=session, principal=principal):
        if space["version"] == version:
            if not space["downloadable"]:
                raise NotFoundError(f"the backbone {version!r} has no ONNX file to download",
                                    hint="only the default and onnx:<file> backbones can be run by clients")
            return ctx.artifacts.open_path(_keys(version)[0]), space
    raise NotFoundError(f"no embedding space {version!r}", hint="GET /v1/backbones lists them")
