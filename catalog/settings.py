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
    artifacts_dir: Path | str | None = Field(
        default=None,
        description="Where experts, backbones and query picks are stored: a folder, or an object-storage prefix (s3://bucket/prefix: "
                    "workers on other machines need no shared filesystem; files are read through a cache in NDS_HOME/artifact-cache); "
                    "unset: NDS_HOME/artifacts.",
    )
    data_roots: Annotated[list[Path | str], NoDecode] = Field(
        default_factory=lambda: [Path.cwd()],
        description="Folders and object-storage prefixes (s3://bucket/prefix) that registered sources must live under "
                    "(comma-separated; folders also os.pathsep-separated).",
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
    public_uris: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="DATA_ROOT=BASE pairs (comma-separated): client keys see a uri under DATA_ROOT as BASE/<relative path>; without a pair, the relative path alone.",
    )
    backbone_include_restricted: bool = Field(
        default=False,
        description="Train the shared default backbone (downloadable by every key) on restricted datasets' images too.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names (comma-separated) the API answers to besides loopback ones; '*' for any. Open mode serves only these and loopback hosts.",
    )
    max_body_bytes: int = Field(default=16 * 2**20, ge=1024, description="Largest request body the API accepts (413 above).")
    max_budget: int = Field(default=10_000_000, description="Largest budget a query may ask for.")
    page_limit: int = Field(default=1000, description="Largest page a list endpoint returns.")
    scan_workers: int = Field(
        default_factory=lambda: min(8, os.cpu_count() or 1), ge=1, le=256,
        description="Threads that read and decode images while registering a source (default: the cores, at most 8).",
    )
    index_chunk_size: int = Field(
        default=2048, ge=1, le=1_000_000,
        description="Samples one embedding task of an index job embeds; the chunks run side by side on the gpu workers.",
    )
    manifest_snapshots: bool = Field(
        default=True,
        description="Resolve manifests from each index version's columnar snapshot under the artifact store; false: with SQL, row by row (the previous path: slower, for comparison or a store without room).",
    )
    register_chunk_parts: int = Field(
        default=16, ge=1, le=100_000,
        description="Shards or files one scanning task of a sharded source's registration reads; the tasks run side by side on the cpu workers.",
    )
    # 256 MiB holds any 8-bit RGB image within the default pixel cap even uncompressed
    # (8192 x 8192 x 3 bytes = 192 MiB as BMP/PPM/TIFF); files are hashed in 1 MiB chunks, never held whole.
    max_file_bytes: int = Field(
        default=256 * 2**20, ge=1,
        description="Largest file registration reads; larger ones are skipped ('larger than NDS_MAX_FILE_BYTES') before any byte is read.",
    )
    # 2^26 = 67,108,864 px (8192 x 8192): above every full-frame camera (61 Mpx, 9504 x 6336), below
    # Pillow's own limit (89,478,485 px, where it warns); one RGB decode at the cap is 256 MiB (4 bytes a pixel).
    # Equal to nds_client.images.DEFAULT_MAX_IMAGE_PIXELS (the client's cap; this module does not import PIL).
    max_image_pixels: int = Field(
        default=1 << 26, ge=1,
        description="Largest width x height registered or decoded; checked from the header before decoding, larger images are skipped ('too many pixels').",
    )

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            import os

            parts = [p for chunk in value.split(",") for p in ([chunk] if "://" in chunk else chunk.split(os.pathsep))]
            value = [p.strip() for p in parts if p.strip()]
        if isinstance(value, list | tuple):
            from nds_client.storage import is_remote, normalize

            return [normalize(str(p)) if is_remote(str(p)) else Path(p) for p in value]
        return value

    @field_validator("artifacts_dir", mode="before")
    @classmethod
    def _artifacts_location(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        from nds_client.storage import is_remote, normalize

        text = str(value).strip()
        return normalize(text) if is_remote(text) else Path(text)

    @field_validator("public_uris", mode="before")
    @classmethod
    def _split_public_uris(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = {}
            for chunk in value.split(","):
                if not chunk.strip():
                    continue
                root, sep, base = chunk.partition("=")
                if not sep or not root.strip() or not base.strip():
                    raise ValueError(f"NDS_PUBLIC_URIS entries are DATA_ROOT=BASE, got {chunk.strip()!r}")
                pairs[root.strip()] = base.strip()
            return pairs
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
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
    def artifacts_uri(self) -> str | None:
        """The object-storage prefix of the artifact store, when NDS_ARTIFACTS_DIR names one."""
        return self.artifacts_dir if isinstance(self.artifacts_dir, str) else None

    @property
    def artifacts_path(self) -> Path:
        """The artifact store's local folder: the store itself, or, for one in object storage, its cache."""
        if self.artifacts_uri is not None:
            return self.resolved_home / "artifact-cache"
        local = self.artifacts_dir if isinstance(self.artifacts_dir, Path) else None
        return (local or self.resolved_home / "artifacts").expanduser().resolve()

    @property
    def vectors_path(self) -> Path:
        return self.resolved_home / "vectors"

    @property
    def resolved_data_roots(self) -> list[Path]:
        """The local folders among the data roots, resolved."""
        return [Path(p).expanduser().resolve() for p in self.data_roots if isinstance(p, Path)]

    @property
    def remote_data_roots(self) -> list[str]:
        """The object-storage prefixes among the data roots (``s3://bucket/prefix``, no trailing slash)."""
        return [p for p in self.data_roots if isinstance(p, str)]

    @property
    def resolved_public_uris(self) -> dict[Path, str]:
        return {Path(root).expanduser().resolve(): base for root, base in self.public_uris.items()}


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment; keyword overrides win (tests and the CLI use them)."""
    return Settings(**overrides)
