"""Request and response bodies that are not plain catalog models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from catalog.models import DatasetPublic


class DatasetRegister(BaseModel):
    """POST /v1/datasets: the same fields as ``nds datasets add``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, examples=["mnist-train"])
    path: str = Field(min_length=1, max_length=4096, description="Folder or manifest, under NDS_DATA_ROOTS.")
    source: str = Field(default="imagefolder", max_length=200, description="Source plugin: imagefolder, manifest, ...")
    description: str | None = Field(default=None, max_length=10_000)
    license: str | None = Field(default=None, max_length=1_000)


class DatasetRegistered(DatasetPublic):
    job_id: str


class Health(BaseModel):
    status: str
    mode: str
    schema_revision: str | None


class IndexBody(BaseModel):
    """POST /v1/datasets/{id}/index: the same options as ``nds index``."""

    model_config = ConfigDict(extra="forbid")
    clusters: int = Field(default=8, ge=1, le=100_000, description="K, the number of clusters (one expert each).")
    partition: Literal["kmeans", "labels"] = Field(default="kmeans", description="k-means on embeddings, or one cluster per label.")
    backbone: str = Field(default="default", max_length=1000, description="default, torchvision:<arch> or onnx:<file>.")
    weights: str | None = Field(default=None, max_length=4096, description="Local weights file for torchvision backbones.")
    image_size: int = Field(default=64, ge=16, le=512, description="Side in pixels of the experts' inputs.")
    epochs: int = Field(default=8, ge=1, le=1000, description="Training epochs per expert.")
    width: int = Field(default=16, ge=4, le=128, description="Channels of the experts' first stage.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
