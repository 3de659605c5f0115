"""jobs as task graphs: one row per task of a job; jobs can be cancelled

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

An index job runs as a graph of tasks over the workers (embedding chunks, a partition, one
task per expert and one for the label classifier, a commit): ``job_tasks`` holds each task's
state, the tasks it waits for, its worker and timings, and the small result it hands on (ids
and artifact keys). ``jobstatus`` gains ``cancelled`` (``nds jobs cancel``). A registration's
scanning tasks store their chunks at positions from ``chunk << 32``: ``samples.position``
becomes a 64-bit order key (SQLite's INTEGER already is one).
"""
from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # allowed in a transaction since PostgreSQL 12; the value is usable once this migration commits
        op.execute("ALTER TYPE jobstatus ADD VALUE IF NOT EXISTS 'cancelled'")
    op.create_table(
        "job_tasks",
        sa.Column("job_id", sa.String(length=36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("queue_class", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("after", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("weight", sa.Float(), nullable=False, server_default="1"),
        sa.Column("progress", sa.Float(), nullable=False, server_default="0"),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("finished_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    )
    op.create_index("ix_job_tasks_state", "job_tasks", ["state"])
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("samples", "position", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("samples", "position", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False)
    op.drop_index("ix_job_tasks_state", table_name="job_tasks")
    op.drop_table("job_tasks")
    # PostgreSQL cannot drop an enum value; 'cancelled' stays in jobstatus (unused by 0006's code)
