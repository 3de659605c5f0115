"""Faults on the embedded default: the API process killed during a registration, and a full
disk while an index job writes its artifacts. Nothing half-written may survive either.
(Server-mode faults, a killed worker, Redis down and PostgreSQL restarted under load, are in
test_server_mode.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from nds.api.local_server import LocalServer
from tests.conftest import small_tmpfs, wait_job, write_images

pytestmark = pytest.mark.slow  # trains networks or runs processes: not in `make test-fast`

NDS = os.path.join(os.path.dirname(sys.executable), "nds")


def catalog_rows(home: Path) -> dict[str, list]:
    engine = create_engine(f"sqlite:///{home / 'catalog.db'}")
    try:
        with engine.connect() as conn:
            return {
                "datasets": conn.execute(text("SELECT name, status FROM datasets")).all(),
                "samples": conn.execute(text("SELECT count(*) FROM samples")).scalar_one(),
                "jobs": conn.execute(text("SELECT id, status, error FROM jobs")).all(),
            }
    finally:
        engine.dispose()


def test_api_killed_during_registration_leaves_the_dataset_complete_or_absent(cli_env, data_root, tmp_path):
    folder = data_root / "big"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):  # enough (and big enough) images for a scan of several seconds on one thread
        (folder / label).mkdir(parents=True)
        for i in range(6000):
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / label / f"{i}.png", compress_level=0)
    env = {**os.environ, **cli_env, "NDS_SCAN_WORKERS": "1"}
    home = Path(cli_env["NDS_HOME"])
    subprocess.run([NDS, "db", "upgrade"], env=env, check=True, capture_output=True)
    server = LocalServer(env, tmp_path / "server.log")
    server.start()
    try:
        job_id = httpx.post(f"{server.url}/v1/datasets", json={"name": "big", "path": str(folder)}).json()["job_id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # past the first committed batch (4,096 of 12,000), before the end
            job = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
            if job["status"] == "running" and job["progress"] > 0.3:
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"the registration never got half-way: {job}")
        server.kill()
        during = catalog_rows(home)
        assert during["datasets"] == [("big", "registering")]
        assert 0 < during["samples"] < 12_000, during["samples"]  # killed with a part of the samples stored

        server.start()  # the next process removes what the dead one left
        after = catalog_rows(home)
        assert after["datasets"] == [] and after["samples"] == 0, after
        assert after["jobs"][0][1] == "failed" and "interrupted" in after["jobs"][0][2]
        assert httpx.get(f"{server.url}/v1/datasets").json()["count"] == 0

        again = httpx.post(f"{server.url}/v1/datasets", json={"name": "big", "path": str(folder)})
        assert again.status_code == 201, again.text
        with httpx.Client(base_url=server.url) as http:
            job = wait_job(http, again.json()["job_id"], timeout=120)
        assert job["status"] == "succeeded", job
        assert catalog_rows(home)["samples"] == 12_000
    finally:
        server.stop()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 600 KiB tmpfs (room for the default backbone, not for one more network)."""
    with small_tmpfs(tmp_path / "tiny-disk", "600k") as mount:
        yield mount


def test_disk_full_while_writing_artifacts_fails_the_job_and_leaves_no_partial_file(cli_env, data_root, tiny_disk):
    env = {**os.environ, **cli_env, "NDS_ARTIFACTS_DIR": str(tiny_disk)}
    write_images(data_root / "src", n=12, size=32)
    for args in (["db", "upgrade"], ["datasets", "add", "src", str(data_root / "src")]):
        subprocess.run([NDS, *args], env=env, check=True, capture_output=True)
    done = subprocess.run([NDS, "index", "src", "--clusters", "2", "--epochs", "1", "--min-steps", "2", "--image-size", "32"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert "No space left on device" in done.stderr, done.stderr
    files = sorted(str(p.relative_to(tiny_disk)) for p in tiny_disk.rglob("*") if p.is_file())
    assert not [f for f in files if ".tmp-" in f], files  # no temp file left behind
    assert not [f for f in files if f.startswith("experts/")], files  # no half-written expert
    shown = subprocess.run([NDS, "datasets", "show", "src", "--json"], env=env, capture_output=True, text=True, check=True).stdout
    assert '"status": "ready"' in shown and '"index_version": 0' in shown  # back to where it was
    listed = subprocess.run([NDS, "experts", "list", "--json"], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(listed)["count"] == 0
