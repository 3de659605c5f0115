"""Server mode end to end: PostgreSQL catalog, Redis broker, a real `nds worker` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from tests.conftest import write_images
from tests.server_mode import server_env, server_home, server_settings, worker  # noqa: F401 - fixtures

pytestmark = pytest.mark.server


def wait_job(api, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def test_api_registration_runs_on_the_celery_worker(server_settings, worker):
    from api.app import create_app

    folder = write_images(server_settings.data_roots[0] / "src", n=6)
    with TestClient(create_app(server_settings)) as api:
        assert api.get("/healthz").json()["mode"] == "server"
        resp = api.post("/v1/datasets", json={"name": "pg-src", "path": str(folder)})
        assert resp.status_code == 201, resp.text
        job = wait_job(api, resp.json()["job_id"])
        assert job["status"] == "succeeded", job
        ds = api.get(f"/v1/datasets/{resp.json()['id']}").json()
        assert (ds["status"], ds["num_samples"]) == ("ready", 12)
        assert api.post("/v1/datasets", json={"name": "pg-src", "path": str(folder)}).status_code == 409
        assert api.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert "nds.run_job" in worker.log.read_text()


def test_cli_in_server_mode_queues_on_the_worker(server_settings, worker):
    env = server_env(server_settings)
    nds_bin = os.path.join(os.path.dirname(sys.executable), "nds")
    folder = write_images(server_settings.data_roots[0] / "cli-src", n=3)
    done = subprocess.run([nds_bin, "datasets", "add", "cli-src", str(folder), "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_samples"] == 6
    listed = json.loads(subprocess.run([nds_bin, "datasets", "list", "--json"], env=env, capture_output=True, text=True).stdout)
    assert "cli-src" in [d["name"] for d in listed["data"]]
    subprocess.run([nds_bin, "datasets", "rm", "cli-src"], env=env, check=True, capture_output=True)


def test_bad_input_in_server_mode(server_settings, worker):
    from api.app import create_app

    with TestClient(create_app(server_settings)) as api:
        resp = api.post("/v1/datasets", json={"name": "x", "path": "/etc"})
        assert resp.status_code == 422 and resp.json()["field"] == "path"
        junk = server_settings.data_roots[0] / "junk" / "a"
        junk.mkdir(parents=True)
        (junk / "0.png").write_bytes(b"garbage")
        resp = api.post("/v1/datasets", json={"name": "junk", "path": str(junk.parent)})
        job = wait_job(api, resp.json()["job_id"])
        assert job["status"] == "failed" and "no readable images" in job["error"]
        assert "junk" not in [d["name"] for d in api.get("/v1/datasets").json()["data"]]
