"""The schema is made only by Alembic: up and down on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from nds.catalog.db import downgrade, head_revision, upgrade
from nds.catalog.settings import load_settings

TABLES = {"datasets", "samples", "clusters", "assignments", "groups", "experts", "jobs", "queries"}


def roundtrip(settings) -> None:
    engine = create_engine(settings.sqlalchemy_url)
    try:
        assert upgrade(settings) == head_revision()
        assert TABLES <= set(inspect(engine).get_table_names())
        assert upgrade(settings) == head_revision()  # idempotent
        assert downgrade(settings, "base") is None
        assert not (TABLES & set(inspect(engine).get_table_names()))
        assert upgrade(settings) == head_revision()  # and back up again
        assert TABLES <= set(inspect(engine).get_table_names())
        downgrade(settings, "base")
    finally:
        engine.dispose()


def test_sqlite_up_down(tmp_path):
    roundtrip(load_settings(home=tmp_path / "home", database_url=None))


@pytest.mark.server
def test_postgresql_up_down(services, tmp_path):
    roundtrip(load_settings(home=tmp_path / "home", database_url=services.migrations_database_url))


def test_unreachable_database_is_a_clear_error(tmp_path):
    from nds_client.errors import ServiceUnavailableError

    settings = load_settings(home=tmp_path, database_url="postgresql+psycopg://nds:nds@127.0.0.1:1/nds")
    with pytest.raises(ServiceUnavailableError, match="cannot reach the catalog database"):
        upgrade(settings)
