"""Shared fixtures: a fresh embedded catalog per test, image folders, the REST app, the CLI."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from nds.catalog.context import CatalogContext
from nds.catalog.db import upgrade
from nds.catalog.settings import Settings, load_settings

pytest_plugins = ["tests.services"]

#: TestClients address the app as a browser on this machine would: the open API answers
#: only requests addressed to a loopback host (api/hosts.py), not TestClient's "testserver"
LOOPBACK = "http://127.0.0.1"


def write_images(root: Path, *, labels=("a", "b"), n: int = 10, kind: str = "stripes", size: int = 32, seed: int = 0) -> Path:
    """ROOT/<label>/<i>.png with small synthetic images; returns ROOT."""
    rng = np.random.default_rng(seed)
    for li, label in enumerate(labels):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if kind == "stripes":
                x = np.zeros((size, size, 3), np.uint8)
                x[:, :: 4 + 4 * li] = 255
                x = np.roll(x, int(rng.integers(0, 8)), axis=1)
            else:
                x = (rng.random((size, size, 3)) * (255 if li % 2 == 0 else 128)).astype(np.uint8)
            Image.fromarray(x).save(folder / f"{i}.png")
    return root


@contextmanager
def small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's -o size=) at ``mount``: a real small disk to fill up.
    Skips the test where it cannot be mounted (not root, or mounts refused)."""
    mount.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def wait_job(api, job_id: str, timeout: float = 60.0) -> dict:  # noqa: ANN001 - a TestClient or an httpx.Client with a base_url
    """Poll GET /v1/jobs/{id} until the job succeeded or failed; its JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout:g} s")


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def settings(tmp_path: Path, data_root: Path) -> Settings:
    return load_settings(home=tmp_path / "home", data_roots=[data_root], database_url=None, qdrant_url=None, broker_url=None)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.server)])
def any_settings(request, tmp_path, data_root):
    """Settings of an empty, migrated catalog on SQLite and on the test PostgreSQL."""
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("services").migrations_database_url
        from tests.server_mode import reset_database

        reset_database(url)
    settings = load_settings(home=tmp_path / "home", data_roots=[data_root], database_url=url, qdrant_url=None, broker_url=None)
    upgrade(settings)
    return settings


@pytest.fixture
def ctx(settings: Settings):
    upgrade(settings)
    context = CatalogContext.open(settings)
    yield context
    context.close()


@pytest.fixture
def api(settings: Settings):
    """A TestClient over the real app (lifespan included) on a migrated embedded catalog."""
    from nds.api.app import create_app

    upgrade(settings)
    with TestClient(create_app(settings), base_url=LOOPBACK) as client:
        yield client


@pytest.fixture
def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "NDS_HOME": str(settings.home),
        "NDS_DATA_ROOTS": ",".join(str(p) for p in settings.data_roots),
        "NDS_DATABASE_URL": "",
        "NDS_BROKER_URL": "",
        "NDS_QDRANT_URL": "",
        "COLUMNS": "200",
    }


@pytest.fixture
def nds(cli_env: dict[str, str]):
    """Run the nds CLI in-process: nds("datasets", "list") -> click Result."""
    from nds.api.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), env=cli_env, catch_exceptions=False)

    return invoke
