"""ids are never reused: SQLite tables with AUTOINCREMENT; a job's owning process

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Without AUTOINCREMENT, SQLite gives a new row the largest id in use plus one, so deleting
the newest dataset handed its id (and its experts', samples' and clusters' ids) to the
next one, and a stored query that named them served another dataset's rows. PostgreSQL's
sequences never go back, so only SQLite tables are rebuilt (row for row, with their
indexes; ``nds.catalog.db`` runs SQLite migrations with foreign-key actions off and checks
every reference before committing). The ids that deleted rows left behind and that the
catalog still names (datasets in jobs and stored queries, experts in stored queries) are
marked used too, so they are never handed out again.

``jobs.owner`` is the ``host:pid`` of the process that created a job (the CLI, the API);
``jobs.worker`` stays the process that runs it. Start-up recovery only touches jobs whose
owner and worker are both gone.
"""
from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

#: tables with an integer id that the catalog hands out
TABLES = ("datasets", "samples", "clusters", "groups", "experts", "api_keys")


def _rebuild(autoincrement: bool) -> None:
    for table in TABLES:
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
            pass


def _referenced_ids(bind: sa.Connection) -> dict[str, int]:
    """The largest dataset and expert ids that jobs and stored queries still name."""
    datasets = bind.execute(sa.text("SELECT max(dataset_id) FROM jobs")).scalar() or 0
    experts = 0
    for versions, request in bind.execute(sa.text("SELECT index_versions, request FROM queries")):
        versions = json.loads(versions) if isinstance(versions, str) else versions or {}
        request = json.loads(request) if isinstance(request, str) else request or {}
        datasets = max([datasets, *(int(k) for k in versions if str(k).isdigit())])
        experts = max([experts, *(int(k) for k in (request.get("expert_scores") or {}) if str(k).isdigit())])
    return {"datasets": int(datasets), "experts": int(experts)}


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=255), nullable=True))
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    _rebuild(True)
    # the copy set each table's sequence to its largest id; raise it past ids still named
    for table, used in _referenced_ids(bind).items():
        seq = bind.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = :t"), {"t": table}).scalar()
        if seq is None:
            bind.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :s)"), {"t": table, "s": used})
        elif used > seq:
            bind.execute(sa.text("UPDATE sqlite_sequence SET seq = :s WHERE name = :t"), {"t": table, "s": used})


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        _rebuild(False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("owner")
