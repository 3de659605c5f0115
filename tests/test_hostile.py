"""Hostile input: path traversal in dataset paths and manifest uris, huge budgets and seeds,
and a manifest of hundreds of thousands of rows (bounded memory). Oversized request bodies
are in test_access.py; non-UTF-8 file names in test_registration.py; malformed ONNX files
(there is no upload: only `onnx:<file>` backbones read them) in test_backbones.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nds.samples.synthetic import add_indexed_dataset
from tests.conftest import wait_job, write_images


@pytest.mark.parametrize("path", ["/etc", "../../etc", "{root}/../..", "{root}/../outside", "{root}/link-out"])
def test_dataset_paths_outside_the_data_roots_are_refused(api, data_root, tmp_path, path):
    outside = tmp_path / "outside"
    write_images(outside, n=2)
    (data_root / "link-out").symlink_to(outside, target_is_directory=True)
    r = api.post("/v1/datasets", json={"name": "evil", "path": path.format(root=data_root)})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "path" and r.json()["hint"]
    assert api.get("/v1/datasets").json()["count"] == 0


def test_manifest_uris_that_escape_the_roots_are_skipped(api, data_root, tmp_path):
    inside = write_images(data_root / "imgs", n=2)
    secret = tmp_path / "secret.png"
    secret.write_bytes((inside / "a" / "0.png").read_bytes())
    (data_root / "sneaky.png").symlink_to(secret)
    rows = ["uri,label", "imgs/a/0.png,a", "imgs/b/1.png,b", "../secret.png,x", f"{secret},x", f"file://{secret},x",
            "sneaky.png,x", "imgs/../../secret.png,x", "/etc/passwd,x"]
    (data_root / "m.csv").write_text("\n".join(rows) + "\n")
    r = api.post("/v1/datasets", json={"name": "m", "path": str(data_root / "m.csv"), "source": "manifest"})
    assert r.status_code == 201, r.text
    job = wait_job(api, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["num_samples"] == 2
    assert result["skipped_reasons"] == {"outside the data roots": 6}
    uris = [s["uri"] for s in api.get(f"/v1/datasets/{r.json()['id']}/samples").json()["data"]]
    assert all(u.startswith(str(data_root.resolve())) for u in uris)


def test_remote_uris_in_manifests_are_refused(api, data_root):
    (data_root / "remote.csv").write_text("uri\nhttp://example.com/cat.png\n")
    r = api.post("/v1/datasets", json={"name": "remote", "path": str(data_root / "remote.csv"), "source": "manifest"})
    assert r.status_code == 422 and r.json()["field"] == "uri" and "download" in r.json()["hint"]


@pytest.mark.parametrize(
    ("patch", "field"),
    [({"budget": 10**12}, "budget"), ({"budget": 2**80}, "budget"), ({"budget": 0}, "budget"), ({"budget": -5}, "budget"),
     ({"seed": 2**64}, "seed"), ({"temperature": 1e-320}, "temperature"), ({"datasets": [2**70]}, "datasets.0")],
)
def test_huge_and_absurd_query_numbers_are_422(api, ctx, patch, field):
    ds = add_indexed_dataset(ctx, "d", clusters=2, labels=["x"], samples_per_group=2)
    body = {"expert_scores": {str(e): 0.5 for e in ds.expert_ids.values()}, "budget": 10, **patch}
    r = api.post("/v1/queries", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field, r.json()
    assert api.get("/v1/datasets").json()["count"] == 1  # nothing stored besides the dataset


PEAK_RSS = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": done.returncode, "out": done.stdout, "err": done.stderr[-2000:],
                  "peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def _register_manifest(env: dict, root, name: str, rows: int) -> dict:
    """Register a manifest of ``rows`` rows (one in 1,000 a real image, the rest missing files) in a fresh process."""
    path = root / f"{name}.csv"
    with path.open("w") as fh:
        fh.write("uri,label\n")
        for i in range(rows):
            fh.write(f"imgs/a/{i % 4}.png,a\n" if i % 1000 == 0 else f"missing/{i}.png,l{i % 7}\n")
    nds = os.path.join(os.path.dirname(sys.executable), "nds")
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, nds, "datasets", "add", name, str(path), "--source", "manifest", "--json"],
                          env=env, capture_output=True, text=True, timeout=900)
    report = json.loads(done.stdout)
    assert report["rc"] == 0, report
    return {**report, "result": json.loads(report["out"])}


@pytest.mark.slow
def test_a_manifest_of_many_rows_registers_with_bounded_memory(cli_env, data_root):
    """200,000 rows (the README's figure is for 10^6): memory does not grow with the rows."""
    write_images(data_root / "imgs", labels=("a",), n=4)
    env = {**os.environ, **cli_env}
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "nds"), "db", "upgrade"], env=env, check=True, capture_output=True)
    small = _register_manifest(env, data_root, "small", 20_000)
    large = _register_manifest(env, data_root, "large", 200_000)
    assert (small["result"]["num_samples"], large["result"]["num_samples"]) == (20, 200)
    assert large["result"]["skipped"] == 199_800 and len(large["result"]["skipped_files"]) == 1000  # the list is capped
    assert large["peak_mib"] < small["peak_mib"] + 60, (small["peak_mib"], large["peak_mib"])
    assert np.isfinite(large["peak_mib"])


def test_plugin_names_from_requests_never_import_modules(api, ctx, data_root):
    """Over HTTP only registered plugin names resolve: a 'module:attr' path would make the
    server import (and call) whatever the caller names."""
    sys.modules.pop("wave", None)
    ds = add_indexed_dataset(ctx, "d", clusters=1, labels=["x"], samples_per_group=2)
    query = api.post("/v1/queries", json={"expert_scores": {str(ds.expert_ids[0]): 0.5}, "budget": 2}).json()["id"]
    for fmt in ("wave:open", ":x", "os:getcwd"):
        r = api.get(f"/v1/queries/{query}/manifest", params={"format": fmt})
        assert r.status_code == 422 and r.json()["field"] == "format", (fmt, r.text)
    write_images(data_root / "src", n=2)
    r = api.post("/v1/datasets", json={"name": "x", "path": str(data_root / "src"), "source": "wave:open"})
    assert r.status_code == 422 and r.json()["field"] == "source" and "imagefolder" in r.json()["detail"]
    assert "wave" not in sys.modules
