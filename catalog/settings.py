"""Settings, read from ``NDS_*`` environment variables (and a ``.env`` file).

Built by :func:`load_settings` and passed to whatever needs them; nothing here is global.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NDS_", env_file=".env", extra="ignore")

    home: Path = Field(default=Path(".nds"), description="Data directory of the embedded default (SQLite file, Qdrant Edge, artifacts).")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL of the catalog; unset: SQLite file under NDS_HOME.")
    qdrant_url: str | None = Field(default=None, description="URL of a Qdrant server; unset: Qdrant Edge under NDS_HOME.")
    qdrant_api_key: str | None = Field(default=None, description="API key for the Qdrant server.")
    broker_url: str | None = Field(default=None, description="Celery broker (redis://...); unset: jobs run in-process.")
    artifacts_dir: Path | None = Field(default=None, description="Where experts and backbones are stored; unset: NDS_HOME/artifacts.")
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path.cwd()],
        description="Folders that registered sources must live under (comma- or os.pathsep-separated).",
    )
    broker_visibility_timeout: int = Field(
        default=6 * 3600,
        description="Seconds before the broker hands an unacknowledged job to another worker; longer than the longest training job.",
    )
    qdrant_shards: int = Field(default=1, ge=1, le=1024, description="Shards of each collection created on a Qdrant server (use a multiple of the cluster's nodes).")
    qdrant_replication_factor: int = Field(default=1, ge=1, le=16, description="Copies of each shard on a Qdrant cluster.")
    auth: Literal["auto", "required"] = Field(
        default="auto",
        description="auto: API keys are required as soon as one exists (or NDS_ADMIN_KEY is set), the API is open until then; required: always.",
    )
    admin_key: SecretStr | None = Field(default=None, description="A bootstrap admin key (32+ characters) accepted besides the stored keys, e.g. for a deployment's first 'nds keys create'.")
    max_body_bytes: int = Field(default=16 * 2**20, ge=1024, description="Largest request body the API accepts (413 above).")
    max_budget: int = Field(default=10_000_000, description="Largest budget a query may ask for.")
    page_limit: int = Field(default=1000, description="Largest page a list endpoint returns.")
    scan_workers: int = Field(
        default_factory=lambda: min(8, os.cpu_count() or 1), ge=1, le=256,
        description="Threads that read and decode images while registering a source (default: the cores, at most 8).",
    )

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            import os

            parts = [p for chunk in value.split(",") for p in chunk.split(os.pathsep)]
            return [Path(p.strip()) for p in parts if p.strip()]
        return value

    @field_validator("admin_key")
    @classmethod
    def _admin_key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value() == "":
            return None
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("NDS_ADMIN_KEY must be at least 32 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        return value

    @property
    def admin_key_value(self) -> str | None:
        return self.admin_key.get_secret_value() if self.admin_key else None

    @property
    def server_mode(self) -> bool:
        """True when the catalog, vectors or jobs live in external services."""
        return bool(self.broker_url)

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_home / 'catalog.db'}"

    @property
    def artifacts_path(self) -> Path:
        return (self.artifacts_dir or self.resolved_home / "artifacts").expanduser().resolve()

    @property
    def vectors_path(self) -> Path:
        return self.resolved_home / "vectors"

    @property
    def resolved_data_roots(self) -> list[Path]:
        return [p.expanduser().resolve() for p in self.data_roots]


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment; keyword overrides win (tests and the CLI use them)."""
    return Settings(**overrides)
