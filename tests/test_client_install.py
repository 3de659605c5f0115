"""The client installs and runs on its own: ``pip install 'client[cpu]'`` in a fresh venv.

The venv is made by the interpreter this one was made from (not .venv: none of its packages
are visible there) and gets the client from this repository's ``client/`` folder (copied
first, so the build writes nothing into the checkout). The server's heavy dependencies
must not come along, nor onnxruntime-gpu beside onnxruntime. Then the venv's
``nds-client score`` and ``nds-client query`` run against a real ``nds serve`` from the
main venv, on one small generated dataset registered and indexed by the main venv's ``nds``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nds.api.local_server import LocalServer
from tests.conftest import write_images

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NDS = str(Path(sys.executable).parent / "nds")
#: what the server needs and the client must not install (``nds``: the server's namespace)
SERVER_ONLY = ("torch", "celery", "faiss", "psycopg", "sqlalchemy", "fastapi", "nds")

PROBE = """
import importlib.metadata as md, importlib.util as u, json, nds_client
def installed(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print(json.dumps({"importable": [m for m in %r if u.find_spec(m) is not None], "client": nds_client.__file__,
                  "onnxruntime": installed("onnxruntime"), "onnxruntime-gpu": installed("onnxruntime-gpu")}))
""" % (SERVER_ONLY,)


def base_python() -> str:
    """The interpreter .venv was made from (python3 on PATH if that cannot be told)."""
    return getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would point a child at .venv's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "COLUMNS": "200", **extra}


@pytest.fixture(scope="module")
def client_bin(tmp_path_factory) -> Path:
    """The bin folder of a fresh venv holding ``nds-client[cpu]`` and what it depends on."""
    root = tmp_path_factory.mktemp("client-install")
    source = root / "client"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
    venv = root / "venv"
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, timeout=120, env=clean_env())
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{source}[cpu]"],
                          capture_output=True, text=True, timeout=600, env=clean_env())
    assert done.returncode == 0, f"pip install client[cpu] failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return venv / "bin"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``nds serve`` from the main venv, with one small indexed dataset."""
    root = tmp_path_factory.mktemp("client-install-server")
    data = write_images(root / "data" / "stripes", n=30, kind="stripes", seed=0).parent
    env = clean_env(NDS_HOME=str(root / "home"), NDS_DATA_ROOTS=str(data), NDS_DATABASE_URL="", NDS_BROKER_URL="", NDS_QDRANT_URL="")

    def nds(*args: str) -> None:
        done = subprocess.run([NDS, *args], env=env, cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"nds {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"

    nds("db", "upgrade")
    nds("datasets", "add", "stripes", str(data / "stripes"))
    nds("index", "stripes", "--clusters", "2", "--epochs", "1", "--image-size", "32", "--width", "8", "--min-steps", "20", "--wait")
    with LocalServer(env, root / "serve.log", cwd=root) as serving:
        yield serving


def test_the_client_installs_without_the_server(client_bin):
    done = subprocess.run([str(client_bin / "python"), "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env=clean_env(), cwd=client_bin)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["importable"] == [], f"the client's install pulled in {found['importable']}"
    assert Path(found["client"]).is_relative_to(client_bin.parent), found["client"]  # the installed copy, not the checkout
    assert found["onnxruntime"] and found["onnxruntime-gpu"] is None, found


def test_the_installed_client_scores_and_queries_a_real_server(client_bin, server, tmp_path):
    target = write_images(tmp_path / "target", n=10, kind="stripes", seed=5)
    env = clean_env(XDG_CACHE_HOME=str(tmp_path / "cache"))

    def nds_client(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(client_bin / "nds-client"), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"nds-client {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    nds_client("score", str(target), "--server", server.url, "-o", "scores.json")
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["format"] == "nds.scores/v1" and scores["num_images"] == 20 and scores["scores"]
    assert list((tmp_path / "cache" / "nds" / "experts").glob("*.onnx"))  # downloaded into the default cache

    shown = nds_client("query", "--server", server.url, "--scores", "scores.json", "--budget", "50", "-o", "m.csv")
    assert "manifest: m.csv" in shown.stdout
    with (tmp_path / "m.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["dataset"] for r in rows} == {"stripes"}
    assert sum(int(r["count"]) for r in rows) == 50


def test_scoring_without_onnxruntime_says_what_to_install(tmp_path):
    """Neither onnxruntime nor onnxruntime-gpu: scoring fails with the extra to install (the
    import is blocked in a child process; the client itself imports without it)."""
    target = write_images(tmp_path / "target", labels=("a",), n=1)
    code = f"""
import sys
sys.modules["onnxruntime"] = None  # what an environment without either wheel gives: ImportError
from pathlib import Path
from nds_client import Client, LocalExpert, MissingDependencyError
expert = LocalExpert(id=1, kind="rotation", dataset_id=1, dataset="d", cluster=0, sha256="0" * 64, path=Path("x.onnx"),
                     input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, label_names=(), heldout_accuracy=None)
with Client("http://127.0.0.1:9") as client:
    try:
        client.score({str(target)!r}, method="rotation", experts=[expert])
    except MissingDependencyError as exc:
        print(exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=clean_env())
    assert done.returncode == 0, done.stderr
    assert "needs onnxruntime" in done.stdout and "pip install 'nds-client[cpu]'" in done.stdout and "[gpu]" in done.stdout
