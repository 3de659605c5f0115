"""pytest plugin: throw-away PostgreSQL + Redis servers for server-mode tests.

Enable with ``pytest_plugins = ["tests.services"]`` in ``tests/conftest.py``.

The session-scoped ``services`` fixture installs PostgreSQL/Redis if needed
(``tests/services.sh install``, apt-get), starts private instances on free
127.0.0.1 ports in a pytest temp dir (``tests/services.sh start DIR``) and
stops them at session end, also when the session fails or is interrupted
(finalizer + ``atexit`` fallback).

If installation is impossible the fixture *fails*; set
``NDS_ALLOW_SKIP_SERVICES=1`` to skip the dependent tests instead (never in CI).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().with_name("services.sh")

INSTALL_TIMEOUT_S = 900
START_TIMEOUT_S = 120
CTL_TIMEOUT_S = 60


class ServicesError(RuntimeError):
    """A tests/services.sh subcommand failed."""


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check(*args: str, timeout: float = CTL_TIMEOUT_S) -> None:
    try:
        r = _run_script(*args, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ServicesError(f"services.sh {' '.join(args)} timed out after {timeout}s") from e
    if r.returncode != 0:
        raise ServicesError(
            f"services.sh {' '.join(args)} failed (exit {r.returncode}):\n"
            f"{r.stdout}{r.stderr}".rstrip()
        )


def _read_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


@dataclass(frozen=True)
class Services:
    """Handles to the running test PostgreSQL and Redis."""

    database_url: str  # postgresql+psycopg://nds:nds@127.0.0.1:PORT/nds
    migrations_database_url: str  # ... /nds_migrations (empty, owned by nds)
    broker_url: str  # redis://127.0.0.1:PORT/0
    pg_port: int
    redis_port: int
    dir: Path  # state dir: env, *.pid, *.log

    @classmethod
    def from_dir(cls, directory: Path) -> "Services":
        env = _read_env(directory / "env")
        return cls(
            database_url=env["NDS_TEST_DATABASE_URL"],
            migrations_database_url=env["NDS_TEST_MIGRATIONS_DATABASE_URL"],
            broker_url=env["NDS_TEST_BROKER_URL"],
            pg_port=int(env["NDS_TEST_PG_PORT"]),
            redis_port=int(env["NDS_TEST_REDIS_PORT"]),
            dir=directory,
        )

    def env(self) -> dict[str, str]:
        """The NDS_TEST_* variables (as written to ``dir/env``)."""
        return _read_env(self.dir / "env")

    # Fault injection. All return once the server is down / answering again;
    # ports and data are preserved.
    def restart_postgres(self) -> None:
        """Fast shutdown (drops all connections) + start again on the same port."""
        _check("restart-postgres", str(self.dir))

    def stop_postgres(self) -> None:
        _check("stop-postgres", str(self.dir))

    def start_postgres(self) -> None:
        _check("start-postgres", str(self.dir))

    def stop_redis(self) -> None:
        """Stop Redis (SHUTDOWN NOSAVE: all keys/queues are lost)."""
        _check("stop-redis", str(self.dir))

    def start_redis(self) -> None:
        """Start an empty Redis again on the same port."""
        _check("start-redis", str(self.dir))


class _Stopper:
    """Runs ``services.sh stop DIR`` exactly once (finalizer or atexit)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        # Only marked done on success: if stopping is interrupted (second
        # Ctrl-C) or fails, the atexit hook tries again (stop is idempotent).
        _check("stop", str(self.directory), timeout=START_TIMEOUT_S)
        self.done = True
        atexit.unregister(self.at_exit)

    def at_exit(self) -> None:
        try:
            self()
        except BaseException as e:  # pragma: no cover - last resort
            print(f"tests/services.py: stopping services failed: {e}", file=sys.stderr)


def _install_or_give_up() -> None:
    try:
        r = _run_script("install", timeout=INSTALL_TIMEOUT_S)
        ok, detail = r.returncode == 0, f"{r.stdout}{r.stderr}".strip()
    except subprocess.TimeoutExpired:
        ok, detail = False, f"timed out after {INSTALL_TIMEOUT_S}s"
    except OSError as e:
        ok, detail = False, str(e)
    if ok:
        return
    tail = "\n".join(detail.splitlines()[-30:])
    reason = f"cannot install PostgreSQL/Redis for server-mode tests (tests/services.sh install):\n{tail}"
    if os.environ.get("NDS_ALLOW_SKIP_SERVICES") == "1":
        pytest.skip(reason)
    pytest.fail(
        reason + "\n(set NDS_ALLOW_SKIP_SERVICES=1 to skip these tests instead of failing)",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Services:
    """Running PostgreSQL 15 + Redis on 127.0.0.1 for the whole test session."""
    _install_or_give_up()
    directory = tmp_path_factory.mktemp("services")
    stopper = _Stopper(directory)
    # registered before starting, so a half-started set is stopped too
    request.addfinalizer(stopper)
    atexit.register(stopper.at_exit)
    try:
        _check("start", str(directory), timeout=START_TIMEOUT_S)
    except ServicesError as e:
        pytest.fail(str(e), pytrace=False)
    return Services.from_dir(directory)
