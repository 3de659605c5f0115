"""Self-test of the tests/services.py plugin (real PostgreSQL + Redis)."""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import create_engine, exc, text

from tests.services import Services

pytestmark = pytest.mark.server


def _redis(services: Services) -> redis.Redis:
    return redis.Redis.from_url(services.broker_url, socket_connect_timeout=2, socket_timeout=2)


def test_env_file(services: Services) -> None:
    env = services.env()
    assert env["NDS_TEST_DATABASE_URL"] == services.database_url
    assert services.database_url == f"postgresql+psycopg://nds:nds@127.0.0.1:{services.pg_port}/nds"
    assert services.migrations_database_url.endswith(f":{services.pg_port}/nds_migrations")
    assert services.broker_url == f"redis://127.0.0.1:{services.redis_port}/0"
    assert services.pg_port != services.redis_port
    assert (services.dir / "postgres.pid").read_text().strip().isdigit()
    assert (services.dir / "redis.pid").read_text().strip().isdigit()


@pytest.mark.parametrize("attr", ["database_url", "migrations_database_url"])
def test_postgres_select_1(services: Services, attr: str) -> None:
    engine = create_engine(getattr(services, attr))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar() == 1
            assert conn.execute(text("select current_user")).scalar() == "nds"
            assert conn.execute(text("show server_version_num")).scalar() >= "150000"
            # the nds role can create tables in its database
            conn.execute(text("create temp table t (x int)"))
    finally:
        engine.dispose()


def test_redis_ping(services: Services) -> None:
    r = _redis(services)
    assert r.ping()
    r.set("k", "v")
    assert r.get("k") == b"v"
    r.close()


def test_restart_postgres(services: Services) -> None:
    engine = create_engine(services.database_url)
    try:
        with engine.connect() as conn:
            old_backend = conn.execute(text("select pg_backend_pid()")).scalar()
            services.restart_postgres()
            with pytest.raises(exc.DBAPIError):
                conn.execute(text("select 1"))
        engine.dispose()
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar() == 1
            assert conn.execute(text("select pg_backend_pid()")).scalar() != old_backend
    finally:
        engine.dispose()


def test_stop_start_redis(services: Services) -> None:
    r = _redis(services)
    assert r.ping()
    old_pid = (services.dir / "redis.pid").read_text().strip()
    services.stop_redis()
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            _redis(services).ping()
    finally:
        services.start_redis()
    assert _redis(services).ping()
    assert (services.dir / "redis.pid").read_text().strip() != old_pid
