"""Database engine and sessions, and the schema's lifecycle through Alembic.

Tables are only ever created by migrations (``nds db upgrade``): :func:`upgrade` runs
Alembic against the engine the settings describe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event, inspect
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlmodel import Session, create_engine

from nds.catalog.settings import Settings
from nds_client.errors import NDSError, ServiceUnavailableError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def json_serializer(value: object) -> str:
    """JSON columns (job params, expert metadata, query summaries) through orjson: about 10x
    faster than the standard library on a query's summary, and numpy values are welcome."""
    return orjson.dumps(value, option=_JSON_OPTIONS).decode()


def create_db_engine(settings: Settings) -> Engine:
    """An engine for the catalog; SQLite gets WAL, foreign keys and a busy timeout."""
    url = settings.sqlalchemy_url
    json_options = {"json_serializer": json_serializer, "json_deserializer": orjson.loads}
    if url.startswith("sqlite"):
        settings.resolved_home.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **json_options)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API objects
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, **json_options)


def unavailable_database(exc: BaseException) -> ServiceUnavailableError | None:
    """The project's error for a catalog database that cannot be reached (down, restarting,
    connection dropped), or None when ``exc`` is something else. The one place where
    SQLAlchemy's connection errors are translated."""
    if isinstance(exc, OperationalError | InterfaceError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        text = str(getattr(exc, "orig", exc)).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        if isinstance(exc, OperationalError) and "locked" in reason:
            return ServiceUnavailableError(f"the catalog database is busy: {reason}", hint="retry in a moment")
        return ServiceUnavailableError(
            f"the catalog database cannot be reached: {reason}",
            hint="retry in a moment; check NDS_DATABASE_URL and that the database is running",
        )
    return None


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _migrate(engine: Engine, settings: Settings, step, revision: str) -> None:  # noqa: ANN001 - an alembic command
    """Run one Alembic command in one transaction.

    On SQLite, foreign-key actions are switched off first (outside the transaction, the
    only place SQLite honours the pragma): a migration that rebuilds a table drops the
    old copy, and with them on, dropping ``datasets`` would cascade to every sample.
    Every reference is checked before the transaction commits instead, and the whole
    command (DDL included) is one transaction: a failure leaves the schema as it was."""
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                if sqlite:  # pysqlite opens its transaction only before DML: DDL would commit as it runs
                    conn.exec_driver_sql("BEGIN")
                cfg = alembic_config(settings.sqlalchemy_url)
                cfg.attributes["connection"] = conn
                step(cfg, revision)
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise NDSError(f"the migration left {len(broken)} broken references (first: {tuple(broken[0])}); nothing was changed",
                                       hint="report this; the catalog is as it was before")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def upgrade(settings: Settings, revision: str = "head") -> str | None:
    """Create or upgrade the schema; returns the revision the database is at afterwards."""
    engine = create_db_engine(settings)
    try:
        _migrate(engine, settings, command.upgrade, revision)
        return current_revision(engine)
    except OperationalError as exc:
        raise ServiceUnavailableError(
            f"cannot reach the catalog database: {exc.orig}", hint="check NDS_DATABASE_URL"
        ) from exc
    finally:
        engine.dispose()


def downgrade(settings: Settings, revision: str) -> str | None:
    engine = create_db_engine(settings)
    try:
        _migrate(engine, settings, command.downgrade, revision)
        return current_revision(engine)
    finally:
        engine.dispose()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def check_schema(engine: Engine) -> None:
    """Fail with a clear message when the schema is missing or behind the code."""
    try:
        current = current_revision(engine)
    except OperationalError as exc:
        raise ServiceUnavailableError(
            f"cannot reach the catalog database: {exc.orig}", hint="check NDS_DATABASE_URL"
        ) from exc
    head = head_revision()
    if current is None or not inspect(engine).has_table("datasets"):
        raise NDSError("the catalog has no schema yet", hint="run 'nds db upgrade' first")
    if current != head:
        raise NDSError(
            f"the catalog schema is at revision {current}, the code expects {head}",
            hint="run 'nds db upgrade'",
        )
