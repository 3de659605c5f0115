"""Catalog tables and their public shapes, one family per entity.

``DatasetBase`` holds the fields a user gives; ``Dataset`` is the table; ``DatasetPublic``
is what the API and ``nds datasets list --json`` return (the same field names in both).
The schema itself is owned by Alembic (``migrations/``): these classes describe it, they
never create it.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from pydantic import field_validator
from sqlalchemy import JSON, BigInteger, Column, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlmodel import Field, SQLModel

# 64-bit ids on PostgreSQL; INTEGER on SQLite so the column is the rowid and autoincrements.
BigId = BigInteger().with_variant(Integer(), "sqlite")

#: No id is ever handed out twice: a stored query names datasets, experts and samples by
#: id, so a reused id would point it at another dataset's rows. PostgreSQL's sequences
#: never go back; on SQLite this makes the rowid AUTOINCREMENT (migration 0005).
NEVER_REUSED = {"sqlite_autoincrement": True}


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class DatasetStatus(str, enum.Enum):
    registering = "registering"
    ready = "ready"          # registered, not indexed
    indexing = "indexing"
    indexed = "indexed"
    failed = "failed"


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class TaskState(str, enum.Enum):
    """A task of a job's graph (:mod:`nds.catalog.task_graph`): ``pending`` until the tasks it
    waits for have succeeded, ``queued`` once sent to a worker (or the in-process runner)."""

    pending = "pending"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    revoked = "revoked"


class ExpertKind(str, enum.Enum):
    rotation = "rotation"
    classifier = "classifier"


# --------------------------------------------------------------------------- datasets


class DatasetBase(SQLModel):
    name: str = Field(index=True, unique=True, max_length=128)
    source: str = Field(max_length=64, description="Source plugin name (imagefolder, manifest, ...).")
    uri: str = Field(description="Where the source lives: a folder, a file, a pattern of shards, or an object-storage uri.")
    description: str | None = None
    license: str | None = None
    options: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False, server_default="{}"),
                                    description="The source's options (label_field, image_column, images, ...).")


class Dataset(DatasetBase, table=True):
    __tablename__ = "datasets"
    __table_args__ = (NEVER_REUSED,)
    id: int | None = Field(default=None, primary_key=True)
    status: DatasetStatus = Field(default=DatasetStatus.registering)
    num_samples: int = 0
    num_labels: int = 0
    labels: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    skipped: int = 0
    index_version: int = Field(default=0, description="Active index version; 0 = not indexed.")
    backbone: str | None = None
    restricted: bool = Field(default=False, description="Only admins and the keys granted access see it.")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    def settle(self) -> None:
        """Out of a job's hold ('indexing'): 'indexed' when it has an active index, else 'ready'
        (``updated_at`` is the caller's: a job that changed nothing leaves it)."""
        self.status = DatasetStatus.indexed if self.index_version > 0 else DatasetStatus.ready


class DatasetPublic(DatasetBase):
    id: int
    status: DatasetStatus
    num_samples: int
    num_labels: int
    labels: list[str]
    skipped: int
    index_version: int
    backbone: str | None
    restricted: bool = False
    created_at: datetime
    updated_at: datetime


class DatasetsPublic(SQLModel):
    data: list[DatasetPublic]
    count: int


# --------------------------------------------------------------------------- samples


class SampleBase(SQLModel):
    uri: str
    label: str | None = Field(default=None, max_length=256)
    width: int
    height: int
    byte_size: int
    sha256: str = Field(max_length=64)
    shard: str | None = Field(default=None, description="The container (tar shard, Parquet file) the sample is in; None for a file.")
    offset: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True),
                               description="Tar member: byte offset of its data in the shard (byte_size long); Parquet: the row's number.")
    meta: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True),
                                        description="What the source knows besides the label (url, caption, key; categories).")


class Sample(SampleBase, table=True):
    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("dataset_id", "position", name="uq_samples_dataset_position"),
        Index("ix_samples_dataset_shard", "dataset_id", "shard"),
        NEVER_REUSED,
    )
    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    dataset_id: int = Field(foreign_key="datasets.id", index=True, ondelete="CASCADE")
    position: int = Field(sa_type=BigInteger, description="The sample's place in its dataset's scan order (an order key: a "  # type: ignore[call-overload]
                          "registration's chunk c of parts stores from c << 32; a sync stores after every committed sample).")


class SamplePublic(SampleBase):
    id: int
    dataset_id: int
    position: int


class SamplesPublic(SQLModel):
    data: list[SamplePublic]
    count: int


# --------------------------------------------------------------------------- clusters


class Cluster(SQLModel, table=True):
    """One partition cell of a dataset for one index version."""

    __tablename__ = "clusters"
    __table_args__ = (
        UniqueConstraint("dataset_id", "index_version", "cluster", name="uq_clusters_version_cluster"),
        NEVER_REUSED,
    )
    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int = Field(foreign_key="datasets.id", index=True, ondelete="CASCADE")
    index_version: int
    cluster: int = Field(description="Cluster number inside the dataset, 0..K-1.")
    size: int
    label: str | None = Field(default=None, description="For label partitions: the label of the cell.")
    centroid: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)


class ClusterPublic(SQLModel):
    id: int
    dataset_id: int
    index_version: int
    cluster: int
    size: int
    label: str | None
    centroid: list[float] | None = Field(default=None, description="Mean embedding of the cluster in its dataset's backbone space.")

    @field_validator("centroid", mode="before")
    @classmethod
    def _decode_centroid(cls, value: Any) -> Any:
        if isinstance(value, bytes | bytearray | memoryview):
            import numpy as np

            return np.frombuffer(bytes(value), dtype=np.float32).astype(float).tolist()
        return value


class Group(SQLModel, table=True):
    """The samples of one (dataset, cluster, label) in one index version: the unit of sampling.

    Weights are constant inside a group, so a query reads these G rows, never the N samples.
    """

    __tablename__ = "groups"
    __table_args__ = (Index("ix_groups_version", "dataset_id", "index_version"), NEVER_REUSED)
    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int = Field(foreign_key="datasets.id", ondelete="CASCADE")
    index_version: int
    cluster: int
    label: str | None = Field(default=None, max_length=256)
    size: int


class Assignment(SQLModel, table=True):
    """Which cluster a sample belongs to in one index version, and its rank inside its group.

    A group is (dataset, cluster, label); ``rank`` numbers the samples of a group 0..n-1 so a
    sampler can pick the r-th sample of a group by index instead of scanning.
    """

    __tablename__ = "assignments"
    __table_args__ = (
        Index("ix_assignments_group_rank", "dataset_id", "index_version", "cluster", "label", "rank"),
    )
    sample_id: int = Field(sa_column=Column(BigId, primary_key=True))
    index_version: int = Field(primary_key=True)
    dataset_id: int = Field(foreign_key="datasets.id", ondelete="CASCADE")
    cluster: int
    label: str | None = Field(default=None, max_length=256)
    rank: int


# --------------------------------------------------------------------------- experts


class Expert(SQLModel, table=True):
    __tablename__ = "experts"
    __table_args__ = (NEVER_REUSED,)
    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int = Field(foreign_key="datasets.id", index=True, ondelete="CASCADE")
    index_version: int
    kind: ExpertKind
    cluster: int | None = Field(default=None, description="Cluster number for rotation experts; None for classifiers.")
    artifact: str = Field(description="Artifact key (relative path in the artifact store).")
    sha256: str = Field(max_length=64)
    byte_size: int = 0
    input_size: int
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class ExpertPublic(SQLModel):
    id: int
    dataset_id: int
    index_version: int
    kind: ExpertKind
    cluster: int | None
    sha256: str
    byte_size: int
    input_size: int
    metrics: dict[str, Any]
    meta: dict[str, Any]
    created_at: datetime


class ExpertsPublic(SQLModel):
    data: list[ExpertPublic]
    count: int


# --------------------------------------------------------------------------- jobs


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    id: str = Field(primary_key=True, max_length=36)
    kind: str = Field(max_length=32, index=True)
    dataset_id: int | None = Field(default=None, index=True)
    status: JobStatus = Field(default=JobStatus.queued)
    step: str | None = None
    progress: float = 0.0
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    error: str | None = None
    attempts: int = 0
    worker: str | None = Field(default=None, max_length=255, description="host:pid of the process running it.")
    owner: str | None = Field(default=None, max_length=255, description="host:pid of the process that created it.")
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobTask(SQLModel, table=True):
    """One task of a job that runs as a graph over the workers (indexing: embed chunks, partition,
    one per expert, the classifier, commit). ``after`` names the tasks it waits for; ``result``
    is what it hands to the tasks after it (ids, artifact keys, metrics: never objects)."""

    __tablename__ = "job_tasks"
    job_id: str = Field(primary_key=True, max_length=36, foreign_key="jobs.id", ondelete="CASCADE")
    name: str = Field(primary_key=True, max_length=64)
    queue_class: str = Field(max_length=16)
    state: TaskState = Field(default=TaskState.pending, sa_type=String(16))  # type: ignore[call-overload]
    after: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    weight: float = 1.0
    progress: float = 0.0
    error: str | None = None
    attempts: int = 0
    worker: str | None = Field(default=None, max_length=255)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobTaskPublic(SQLModel):
    name: str
    queue_class: str
    state: TaskState
    after: list[str]
    progress: float
    error: str | None
    attempts: int
    worker: str | None
    started_at: datetime | None
    finished_at: datetime | None
    seconds: float | None = Field(default=None, description="How long its last try ran (finished or so far).")


class JobPublic(SQLModel):
    id: str
    kind: str
    dataset_id: int | None
    status: JobStatus
    step: str | None
    progress: float
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    tasks: list[JobTaskPublic] = Field(default_factory=list, description="The job's tasks, when it runs as a graph over the workers.")


# --------------------------------------------------------------------------- queries


class Query(SQLModel, table=True):
    __tablename__ = "queries"
    id: str = Field(primary_key=True, max_length=36)
    request: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    index_versions: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    summary: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    key_id: int | None = Field(default=None, description="The API key that made the query (None: open mode or the CLI).")
    created_at: datetime = Field(default_factory=utcnow)


# --------------------------------------------------------------------------- access control


class Role(str, enum.Enum):
    admin = "admin"    # register, index and delete datasets, manage keys and grants
    client = "client"  # read the catalog, download experts, query, export manifests


class ApiKeyBase(SQLModel):
    name: str = Field(max_length=128, unique=True)
    role: Role


class ApiKey(ApiKeyBase, table=True):
    __tablename__ = "api_keys"
    __table_args__ = (NEVER_REUSED,)
    id: int | None = Field(default=None, primary_key=True)
    prefix: str = Field(max_length=16, description="The key's first characters, to recognise it in listings.")
    key_hash: str = Field(max_length=64, unique=True, description="sha256 of the key; the key itself is never stored.")
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class ApiKeyPublic(ApiKeyBase):
    id: int
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The secret, shown once: it cannot be read again.")


class ApiKeysPublic(SQLModel):
    data: list[ApiKeyPublic]
    count: int


class DatasetGrant(SQLModel, table=True):
    """Key ``key_id`` may see restricted dataset ``dataset_id``."""

    __tablename__ = "dataset_grants"
    dataset_id: int = Field(foreign_key="datasets.id", primary_key=True, ondelete="CASCADE")
    key_id: int = Field(foreign_key="api_keys.id", primary_key=True, ondelete="CASCADE")
