"""groups: sample counts per (dataset, cluster, label) and index version, read by queries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("index_version", sa.Integer(), nullable=False),
        sa.Column("cluster", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=256), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_groups_version", "groups", ["dataset_id", "index_version"])
    # groups of indexes built before this revision, from their assignments
    op.execute(
        "INSERT INTO groups (dataset_id, index_version, cluster, label, size) "
        "SELECT dataset_id, index_version, cluster, label, count(*) FROM assignments "
        "GROUP BY dataset_id, index_version, cluster, label"
    )


def downgrade() -> None:
    op.drop_index("ix_groups_version", table_name="groups")
    op.drop_table("groups")
