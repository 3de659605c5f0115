"""samples inside containers (tar shards, Parquet files), sample metadata, source options

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

A sample of a WebDataset shard or a Parquet file lives inside a container: ``samples.shard``
is the container's uri and ``samples.offset`` where the sample is in it (a tar member's
data offset in bytes, a Parquet row's number), so it is read later with one ranged read;
its length is ``byte_size``. ``samples.meta`` keeps what a source knows of a sample besides
its label (img2dataset's url, caption and key; COCO's categories). ``datasets.options`` are
the source's options (``--label-field``, ``-O key=value``), which ``nds datasets sync`` reuses.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.add_column(sa.Column("shard", sa.String(), nullable=True))
        batch.add_column(sa.Column("offset", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("meta", sa.JSON(), nullable=True))
    op.create_index("ix_samples_dataset_shard", "samples", ["dataset_id", "shard"])
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("options", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("options")
    op.drop_index("ix_samples_dataset_shard", table_name="samples")
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("meta")
        batch.drop_column("offset")
        batch.drop_column("shard")
