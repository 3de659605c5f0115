"""The REST API over the embedded default: /v1/datasets, /v1/jobs, /healthz, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from nds.api.local_server import LocalServer
from tests.conftest import wait_job, write_images


def test_register_page_show_delete(api, data_root):
    folder = write_images(data_root / "src", labels=("a", "b", "c"), n=5)
    (folder / "a" / "broken.png").write_bytes(b"x")
    resp = api.post("/v1/datasets", json={"name": "src", "path": str(folder), "license": "MIT"})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["name"] == "src" and body["status"] in ("registering", "ready") and "job_id" in body
    job = wait_job(api, body["job_id"])
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert job["result"]["skipped_files"][0]["reason"] == "not an image"

    ds = api.get(f"/v1/datasets/{body['id']}").json()
    assert (ds["status"], ds["num_samples"], ds["num_labels"], ds["skipped"]) == ("ready", 15, 3, 1)

    page = api.get("/v1/datasets", params={"offset": 0, "limit": 10}).json()
    assert page["count"] == 1 and page["data"][0]["id"] == body["id"]

    samples = api.get(f"/v1/datasets/{body['id']}/samples", params={"offset": 10, "limit": 3}).json()
    assert samples["count"] == 15 and [s["position"] for s in samples["data"]] == [10, 11, 12]
    assert {"uri", "label", "width", "height", "byte_size", "sha256"} <= samples["data"][0].keys()

    assert api.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert api.get(f"/v1/datasets/{body['id']}").status_code == 404
    assert api.get("/v1/datasets").json()["count"] == 0


def test_bad_input_is_4xx_json_naming_the_field(api, data_root, tmp_path):
    folder = write_images(data_root / "src", n=1)
    assert api.post("/v1/datasets", json={"name": "src", "path": str(folder)}).status_code == 201
    cases = [
        ({"name": "src", "path": str(folder)}, 409, None),
        ({"name": "x", "path": str(data_root / "nope")}, 422, "path"),
        ({"name": "x", "path": str(write_images(tmp_path / "out", n=1))}, 422, "path"),
        ({"name": "x", "path": str(folder), "source": "nope"}, 422, "source"),
        ({"name": "bad name!", "path": str(folder)}, 422, "name"),
        ({"path": str(folder)}, 422, "name"),
        ({"name": "x", "path": str(folder), "surprise": 1}, 422, "surprise"),
    ]
    for payload, status, field in cases:
        resp = api.post("/v1/datasets", json=payload)
        assert resp.status_code == status, (payload, resp.text)
        body = resp.json()
        assert body["detail"], body
        if field:
            assert body["field"] == field, (payload, body)
    assert api.get("/v1/datasets").json()["count"] == 1
    for url, status in [("/v1/datasets/999", 404), ("/v1/jobs/nope", 404), ("/v1/datasets/1/samples?limit=0", 422),
                        ("/v1/datasets/abc", 422), ("/v1/datasets?limit=100000", 422)]:
        resp = api.get(url)
        assert resp.status_code == status and "detail" in resp.json(), (url, resp.text)


def test_registration_that_fails_leaves_nothing(api, data_root):
    folder = data_root / "junk" / "a"
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(b"garbage")
    resp = api.post("/v1/datasets", json={"name": "junk", "path": str(folder.parent)})
    assert resp.status_code == 201
    job = wait_job(api, resp.json()["job_id"])
    assert job["status"] == "failed" and "no readable images" in job["error"]
    assert api.get("/v1/datasets").json()["count"] == 0


def test_healthz_and_openapi(api):
    health = api.get("/healthz").json()
    assert health["status"] == "ok" and health["mode"] == "embedded" and health["schema_revision"]
    paths = api.get("/openapi.json").json()["paths"]
    for path in ("/v1/datasets", "/v1/datasets/{dataset_id}", "/v1/datasets/{dataset_id}/samples", "/v1/jobs/{job_id}"):
        assert path in paths


def test_nds_serve_real_process(cli_env, data_root, tmp_path):
    """`nds serve` in its own process, reached over HTTP on loopback."""
    env = {**os.environ, **cli_env}
    nds_bin = os.path.join(os.path.dirname(sys.executable), "nds")
    subprocess.run([nds_bin, "db", "upgrade"], env=env, check=True, capture_output=True)
    with LocalServer(env, tmp_path / "serve.log") as server, httpx.Client(base_url=server.url) as http:
        folder = write_images(data_root / "src", n=3)
        created = http.post("/v1/datasets", json={"name": "src", "path": str(folder)})
        assert created.status_code == 201
        assert wait_job(http, created.json()["job_id"], timeout=10)["status"] == "succeeded"
        assert http.get(f"/v1/datasets/{created.json()['id']}").json()["num_samples"] == 6
        assert http.get("/docs").status_code == 200
