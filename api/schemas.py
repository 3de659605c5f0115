"""Request and response bodies that are not plain catalog models."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nds.catalog.access import MAX_ID
from nds.catalog.index_options import INDEX_LIMITS, PARTITIONS, IndexRequest
from nds.catalog.tables import DatasetPublic

Id = Annotated[int, Field(ge=0, le=MAX_ID)]  # a catalog id (64-bit)


class DatasetRegister(BaseModel):
    """POST /v1/datasets: the same fields as ``nds datasets add``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, examples=["mnist-train"])
    path: str = Field(min_length=1, max_length=4096,
                      description="Folder, file, glob or brace pattern of shards, local or s3://, under NDS_DATA_ROOTS.")
    source: str = Field(default="imagefolder", max_length=200, description="Source plugin: imagefolder, manifest, webdataset, parquet, coco, ...")
    description: str | None = Field(default=None, max_length=10_000)
    license: str | None = Field(default=None, max_length=1_000)
    options: dict[str, str] = Field(default_factory=dict, max_length=32,
                                    description="The source's options, e.g. {\"label_field\": \"class\"}; 'nds plugins list' names them.")


class DatasetRegistered(DatasetPublic):
    job_id: str


class Health(BaseModel):
    status: str
    mode: str
    schema_revision: str | None


def _index_option(name: str) -> Any:  # noqa: ANN401 - a pydantic FieldInfo
    """The Field of an integer index option: IndexRequest's default, the bounds of INDEX_LIMITS."""
    limit = INDEX_LIMITS[name]
    return Field(default=getattr(IndexRequest, name), ge=limit.low, le=limit.high, description=limit.help)


class IndexBody(BaseModel):
    """POST /v1/datasets/{id}/index: the same options as ``nds index`` (nds.catalog.index_options)."""

    model_config = ConfigDict(extra="forbid")
    clusters: int = _index_option("clusters")
    partition: Literal[PARTITIONS] = Field(default=IndexRequest.partition, description="k-means on embeddings, or one cluster per label.")
    backbone: str = Field(default=IndexRequest.backbone, max_length=1000, description="default, torchvision:<arch> or onnx:<file>.")
    weights: str | None = Field(default=IndexRequest.weights, max_length=4096, description="Local weights file for torchvision backbones.")
    image_size: int = _index_option("image_size")
    epochs: int = _index_option("epochs")
    width: int = _index_option("width")
    seed: int = _index_option("seed")
    min_steps: int = _index_option("min_steps")


class QueryBody(BaseModel):
    """POST /v1/queries."""

    model_config = ConfigDict(extra="forbid")
    expert_scores: dict[Id, float] = Field(default_factory=dict, description="Expert id -> score, from the client.", max_length=100_000)
    label_priors: dict[Id, dict[str, float]] | None = Field(default=None, description="Dataset id -> label -> P_t(y); each sums to 1 within 1e-3.")
    budget: int = Field(description="Number of samples to select.", examples=[10_000])
    replacement: bool = Field(default=True, description="True: same distribution matcher (repeats); false: elastic, no repeats.")
    temperature: float | None = Field(default=None, description="Softmax temperature over normalised scores (default 0.1).")
    datasets: list[Id] | None = Field(default=None, description="Only select from these dataset ids.", max_length=10_000)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    target_size: int | None = Field(default=None, ge=1, le=10**9, description="Number of target images (for the recommended recipe).")
    score_method: Literal["rotation", "linear-probe", "embedding"] | None = Field(default=None, description="How the scores were computed.")


class QueryPublic(BaseModel):
    id: str
    created_at: datetime
    request: dict[str, Any]
    index_versions: dict[str, Any]
    summary: dict[str, Any]


class SearchBody(BaseModel):
    """POST /v1/search: nearest source samples to given embedding vectors."""

    model_config = ConfigDict(extra="forbid")
    vectors: list[list[float]] = Field(min_length=1, max_length=256, description="Query embeddings, in the space of `backbone`.")
    k: int = Field(default=10, ge=1, le=1000)
    datasets: list[Id] | None = Field(default=None, max_length=10_000)
    backbone: str | None = Field(default=None, description="Backbone version (embedding space); default: the space of the indexed datasets.")


class SearchHit(BaseModel):
    sample_id: int
    score: float
    dataset_id: int
    dataset: str
    label: str | None
    cluster: int | None
    uri: str


class SearchResult(BaseModel):
    backbone: str
    results: list[list[SearchHit]]


class DatasetAccessBody(BaseModel):
    """PUT /v1/datasets/{id}/access."""

    model_config = ConfigDict(extra="forbid")
    restricted: bool = Field(description="True: only admins and the named keys see the dataset; false: every key does.")
    keys: list[str] = Field(default_factory=list, max_length=1000, description="Names (or ids) of the keys granted access; replaces earlier grants.")


class DatasetAccess(BaseModel):
    dataset_id: int
    restricted: bool
    keys: list[str]


class KeyCreate(BaseModel):
    """POST /v1/keys."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, description="A unique name, e.g. the team or machine that uses the key.")
    role: Literal["admin", "client"] = Field(default="client")
