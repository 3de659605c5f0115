"""Request and response bodies that are not plain catalog models."""

from __future__ import annotations

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
