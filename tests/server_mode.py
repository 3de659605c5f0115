"""Fixtures for server mode: the catalog in the test PostgreSQL, jobs on a real Celery worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from nds.catalog.db import upgrade
from nds.catalog.settings import Settings, load_settings


@dataclass
class Worker:
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        nds_bin = os.path.join(os.path.dirname(sys.executable), "nds")
        self.proc = subprocess.Popen(
            [nds_bin, "worker", "--queues", "cpu,gpu", "--loglevel", "info"],
            env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the worker and its pool children, as a crash would."""
        self.stop(signal.SIGKILL)


def reset_database(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(scope="module")
def server_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-mode")


@pytest.fixture(scope="module")
def server_settings(services, server_home: Path) -> Settings:
    data = server_home / "data"
    data.mkdir(exist_ok=True)
    reset_database(services.database_url)
    settings = load_settings(
        home=server_home / "home", database_url=services.database_url, broker_url=services.broker_url,
        qdrant_url=None, data_roots=[data],
    )
    upgrade(settings)
    return settings


def server_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "NDS_HOME": str(settings.home),
        "NDS_DATABASE_URL": settings.database_url or "",
        "NDS_BROKER_URL": settings.broker_url or "",
        "NDS_QDRANT_URL": "",
        "NDS_DATA_ROOTS": ",".join(map(str, settings.data_roots)),
        "COLUMNS": "200",
    }


@pytest.fixture(scope="module")
def worker(server_settings: Settings, server_home: Path) -> Iterator[Worker]:
    w = Worker(env=server_env(server_settings), log=server_home / "worker.log")
    w.start()
    time.sleep(0.5)
    yield w
    w.stop()
