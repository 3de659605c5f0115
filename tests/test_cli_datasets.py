"""The nds CLI as a user runs it: db, datasets, jobs, plugins."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import write_images


def test_db_upgrade_then_add_list_show_rm(nds, data_root):
    assert nds("db", "upgrade").exit_code == 0
    folder = write_images(data_root / "src", labels=("x", "y"), n=4)
    (folder / "x" / "bad.png").write_bytes(b"nope")
    result = nds("datasets", "add", "src", str(folder), "--license", "CC-BY", "--description", "stripes")
    assert result.exit_code == 0, result.output
    assert "samples" in result.output and "not an image" in result.output

    listed = json.loads(nds("datasets", "list", "--json").stdout)
    assert listed["count"] == 1
    row = listed["data"][0]
    for key in ("id", "name", "source", "uri", "status", "num_samples", "num_labels", "created_at"):
        assert key in row
    assert (row["name"], row["status"], row["num_samples"], row["num_labels"], row["license"]) == ("src", "ready", 8, 2, "CC-BY")

    shown = json.loads(nds("datasets", "show", "src", "--json").stdout)
    assert shown["id"] == row["id"] and shown["skipped"] == 1
    assert "src" in nds("datasets", "list").stdout

    assert nds("datasets", "rm", "src").exit_code == 0
    assert json.loads(nds("datasets", "list", "--json").stdout)["count"] == 0
    assert folder.exists() and (folder / "x" / "0.png").exists()  # files on disk are never touched


def test_add_json_output_and_jobs_show(nds, data_root):
    nds("db", "upgrade")
    folder = write_images(data_root / "src", n=2)
    out = json.loads(nds("datasets", "add", "src", str(folder), "--json").stdout)
    assert out["num_samples"] == 4
    job = json.loads(nds("jobs", "show", out["job_id"], "--json").stdout)
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["kind"] == "register"


def test_bad_input_exits_non_zero_with_a_message(nds, data_root, tmp_path):
    nds("db", "upgrade")
    folder = write_images(data_root / "src", n=1)
    assert nds("datasets", "add", "src", str(folder)).exit_code == 0
    cases = [
        (("datasets", "add", "src", str(folder)), "already exists"),
        (("datasets", "add", "ghost", str(data_root / "nope")), "does not exist"),
        (("datasets", "add", "out", str(write_images(tmp_path / "elsewhere", n=1))), "outside the data roots"),
        (("datasets", "add", "p", str(folder), "--source", "zipfile"), "known: coco, imagefolder, manifest, parquet, webdataset"),
        (("datasets", "show", "ghost"), "no dataset named 'ghost'"),
        (("datasets", "rm", "ghost"), "no dataset named 'ghost'"),
        (("jobs", "show", "nope"), "no job nope"),
    ]
    for args, needle in cases:
        result = nds(*args)
        assert result.exit_code == 1, (args, result.output)
        assert needle in result.stderr.replace("\n", " "), (args, result.stderr)
    assert json.loads(nds("datasets", "list", "--json").stdout)["count"] == 1


def test_commands_before_upgrade_say_what_to_do(nds):
    result = nds("datasets", "list")
    assert result.exit_code == 1 and "nds db upgrade" in result.stderr


def test_plugins_list(nds):
    result = nds("plugins", "list", "--json")
    names = {(p["group"], p["name"]) for p in json.loads(result.stdout)}
    assert {("nds.sources", "imagefolder"), ("nds.sources", "manifest")} <= names


def test_console_script_runs_as_a_subprocess(cli_env, data_root):
    """The installed `nds` entry point, in a real process."""
    import os

    env = {**os.environ, **cli_env}
    nds_bin = os.path.join(os.path.dirname(sys.executable), "nds")
    subprocess.run([nds_bin, "db", "upgrade"], env=env, check=True, capture_output=True)
    folder = write_images(data_root / "src", n=2)
    done = subprocess.run([nds_bin, "datasets", "add", "src", str(folder)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bad = subprocess.run([nds_bin, "datasets", "add", "src", str(folder)], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "already exists" in bad.stderr
