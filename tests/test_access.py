"""Access control: API keys with roles, restricted datasets, open mode and the bind guard."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import Session

from nds.api.local_server import LocalServer
from nds.catalog import access
from nds.catalog.db import session_scope
from nds.samples.synthetic import add_files_and_vectors, add_indexed_dataset
from tests.conftest import LOOPBACK

DIM = 8


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def world(settings, ctx):
    """Two indexed datasets (public, secret) with expert files and vectors; keys admin, alice, bob;
    secret restricted to alice."""
    from nds.api.app import create_app

    datasets = {name: add_indexed_dataset(ctx, name, clusters=2, labels=["x", "y"], samples_per_group=3) for name in ("public", "secret")}
    add_files_and_vectors(ctx, dim=DIM)
    keys = {}
    with session_scope(ctx.engine) as session:
        for name, role in (("admin", "admin"), ("alice", "client"), ("bob", "client")):
            keys[name] = access.create_key(session=session, name=name, role=role)[1]
        access.set_access(session=session, dataset_id=datasets["secret"].dataset_id, restricted=True, keys=["alice"])
    ctx.close()  # the app opens its own context (the embedded vector store is one process at a time)
    with TestClient(create_app(settings), base_url=LOOPBACK) as client:
        yield client, datasets, keys


def test_keys_are_stored_hashed_and_shown_once(ctx):
    with session_scope(ctx.engine) as session:
        key, secret = access.create_key(session=session, name="ci", role="client")
    assert secret.startswith("nds_") and len(secret) >= 40
    with ctx.engine.connect() as conn:
        row = conn.execute(text("SELECT prefix, key_hash FROM api_keys")).one()
        dump = " ".join(str(v) for r in conn.execute(text("SELECT * FROM api_keys")).all() for v in r)
    assert secret not in dump
    assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret.startswith(row.prefix)
    with Session(ctx.engine) as session:
        assert access.authenticate(session=session, secret=secret).name == "ci"
        with pytest.raises(access.AuthenticationError):
            access.authenticate(session=session, secret=secret + "x")


def test_api_is_open_until_a_key_exists(api):
    assert api.get("/v1/datasets").status_code == 200
    created = api.post("/v1/keys", json={"name": "ops", "role": "admin"})
    assert created.status_code == 201 and created.json()["key"].startswith("nds_")
    closed = api.get("/v1/datasets")
    assert closed.status_code == 401
    assert closed.json()["detail"] == "an API key is required" and closed.headers["WWW-Authenticate"] == "Bearer"
    assert api.get("/v1/datasets", headers=bearer(created.json()["key"])).status_code == 200
    assert api.get("/v1/datasets", headers={"X-API-Key": created.json()["key"]}).status_code == 200
    assert api.get("/healthz").status_code == 200  # liveness needs no key
    listed = api.get("/v1/keys", headers=bearer(created.json()["key"])).json()
    assert listed["count"] == 1 and "key" not in listed["data"][0]


def test_bad_and_revoked_keys_are_401_json(world):
    client, _, keys = world
    for headers in ({}, bearer("nds_" + "x" * 43), {"Authorization": "Basic abc"}, {"X-API-Key": "wrong"}):
        r = client.get("/v1/datasets", headers=headers)
        assert r.status_code == 401, headers
        assert set(r.json()) >= {"detail", "field", "hint"}
    bob = client.get("/v1/keys", headers=bearer(keys["admin"])).json()["data"][2]
    assert bob["name"] == "bob"
    assert client.delete(f"/v1/keys/{bob['id']}", headers=bearer(keys["admin"])).json()["revoked_at"]
    revoked = client.get("/v1/datasets", headers=bearer(keys["bob"]))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]


def test_client_keys_may_not_do_admin_things(world, data_root):
    client, datasets, keys = world
    did = datasets["public"].dataset_id
    attempts = [
        ("POST", "/v1/datasets", {"name": "new", "path": str(data_root)}),
        ("DELETE", f"/v1/datasets/{did}", None),
        ("POST", f"/v1/datasets/{did}/index", {}),
        ("GET", f"/v1/datasets/{did}/access", None),
        ("PUT", f"/v1/datasets/{did}/access", {"restricted": True, "keys": []}),
        ("GET", "/v1/jobs/some-job", None),
        ("GET", "/v1/keys", None),
        ("POST", "/v1/keys", {"name": "mine", "role": "admin"}),
        ("DELETE", "/v1/keys/1", None),
    ]
    for method, path, body in attempts:
        r = client.request(method, path, json=body, headers=bearer(keys["alice"]))
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["hint"] == "this needs an admin key"
    # what a client may do
    assert client.get("/v1/datasets", headers=bearer(keys["alice"])).status_code == 200
    assert client.get("/v1/experts", headers=bearer(keys["alice"])).status_code == 200
    # the admin may do the admin things
    assert client.get(f"/v1/datasets/{did}/access", headers=bearer(keys["admin"])).json() == {"dataset_id": did, "restricted": False, "keys": []}


def test_restricted_dataset_is_invisible_to_other_keys(world):
    client, datasets, keys = world
    secret, public = datasets["secret"], datasets["public"]
    secret_expert = secret.expert_ids[0]

    def as_(who: str, method: str, path: str, **kw) -> httpx.Response:
        return client.request(method, path, headers=bearer(keys[who]), **kw)

    for who, sees in (("admin", True), ("alice", True), ("bob", False)):
        listed = as_(who, "GET", "/v1/datasets").json()
        assert ("secret" in [d["name"] for d in listed["data"]]) is sees and listed["count"] == (2 if sees else 1), who
        status = 200 if sees else 404
        for path in (f"/v1/datasets/{secret.dataset_id}", f"/v1/datasets/{secret.dataset_id}/samples",
                     f"/v1/datasets/{secret.dataset_id}/clusters", f"/v1/experts/{secret_expert}", f"/v1/experts/{secret_expert}/model.onnx"):
            assert as_(who, "GET", path).status_code == status, (who, path)
        experts = as_(who, "GET", "/v1/experts").json()
        assert (secret.dataset_id in {e["dataset_id"] for e in experts["data"]}) is sees, who
        query = as_(who, "POST", "/v1/queries", json={"expert_scores": {str(secret_expert): 0.9, str(public.expert_ids[0]): 0.5}, "budget": 10})
        if sees:
            assert query.status_code == 201, query.text
        else:
            assert query.status_code == 422 and query.json()["field"] == "expert_scores", query.text
            assert str(secret_expert) in query.json()["detail"]
        priors = as_(who, "POST", "/v1/queries", json={"label_priors": {str(secret.dataset_id): {"x": 0.5, "y": 0.5}}, "budget": 10})
        assert priors.status_code == (201 if sees else 422), (who, priors.text)
        hits = as_(who, "POST", "/v1/search", json={"vectors": [[1.0] * DIM], "k": 50})
        assert hits.status_code == 200, hits.text
        assert ({h["dataset"] for h in hits.json()["results"][0]} == {"public", "secret"}) is sees, who
        restricted_search = as_(who, "POST", "/v1/search", json={"vectors": [[1.0] * DIM], "k": 5, "datasets": [secret.dataset_id]})
        assert restricted_search.status_code == (200 if sees else 422), who


def test_queries_belong_to_the_key_that_made_them(world):
    client, datasets, keys = world
    scores = {str(e): 0.5 + 0.1 * c for c, e in datasets["public"].expert_ids.items()}
    made = client.post("/v1/queries", json={"expert_scores": scores, "budget": 5}, headers=bearer(keys["alice"]))
    assert made.status_code == 201
    qid = made.json()["id"]
    for who, status in (("alice", 200), ("admin", 200), ("bob", 404)):
        for path in (f"/v1/queries/{qid}", f"/v1/queries/{qid}/samples", f"/v1/queries/{qid}/manifest"):
            assert client.get(path, headers=bearer(keys[who])).status_code == status, (who, path)
    # a query over a dataset its key can no longer see is gone for that key
    secret_scores = {str(datasets["secret"].expert_ids[0]): 0.9}
    over_secret = client.post("/v1/queries", json={"expert_scores": secret_scores, "budget": 5}, headers=bearer(keys["alice"])).json()["id"]
    assert client.put(f"/v1/datasets/{datasets['secret'].dataset_id}/access", json={"restricted": True, "keys": []},
                      headers=bearer(keys["admin"])).json()["keys"] == []
    assert client.get(f"/v1/queries/{over_secret}/manifest", headers=bearer(keys["alice"])).status_code == 404
    assert client.get(f"/v1/datasets/{datasets['secret'].dataset_id}", headers=bearer(keys["alice"])).status_code == 404
    opened = client.put(f"/v1/datasets/{datasets['secret'].dataset_id}/access", json={"restricted": False}, headers=bearer(keys["admin"]))
    assert opened.json() == {"dataset_id": datasets["secret"].dataset_id, "restricted": False, "keys": []}
    assert client.get(f"/v1/datasets/{datasets['secret'].dataset_id}", headers=bearer(keys["bob"])).status_code == 200
    bad = client.put(f"/v1/datasets/{datasets['secret'].dataset_id}/access", json={"restricted": True, "keys": ["nobody"]}, headers=bearer(keys["admin"]))
    assert bad.status_code == 404 and "nobody" in bad.json()["detail"]


def test_oversized_bodies_are_413_json(api):
    big = b'{"budget": 1, "expert_scores": {"1": 0.5}, "pad": "' + b"x" * (17 * 2**20) + b'"}'
    r = api.post("/v1/queries", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(20):
            yield b"x" * 2**20

    r = api.post("/v1/queries", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_cli_keys_and_restrict(nds, ctx):
    add_indexed_dataset(ctx, "secret", clusters=1, labels=["x"], samples_per_group=2)
    created = nds("keys", "create", "--name", "alice", "--role", "client")
    assert created.exit_code == 0, created.output
    secret = created.output.strip().splitlines()[-1]
    assert secret.startswith("nds_")
    listed = nds("keys", "list", "--json")
    assert '"alice"' in listed.output and secret not in listed.output
    assert nds("keys", "create", "--name", "alice").exit_code == 1  # duplicate name
    assert nds("keys", "create", "--name", "x", "--role", "root").exit_code == 1
    restricted = nds("datasets", "restrict", "secret", "--key", "alice", "--json")
    assert restricted.exit_code == 0 and '"restricted": true' in restricted.output and '"alice"' in restricted.output
    shown = nds("datasets", "show", "secret", "--json")
    assert '"restricted": true' in shown.output
    assert nds("datasets", "restrict", "secret", "--key", "nobody").exit_code == 1
    assert nds("datasets", "unrestrict", "secret").exit_code == 0
    assert nds("keys", "revoke", "alice").exit_code == 0
    assert '"alice"' not in nds("keys", "list", "--json").output
    assert nds("keys", "revoke", "nobody").exit_code == 1


def test_serve_refuses_open_non_loopback_binds(cli_env, nds, tmp_path):
    from nds.api.cli import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5")
    nds("db", "upgrade")
    refused = nds("serve", "--host", "0.0.0.0", "--port", "9")
    assert refused.exit_code == 1 and "--insecure" in refused.output
    server = LocalServer({**os.environ, **cli_env}, tmp_path / "serve.log", host="0.0.0.0", args=["--insecure"])
    with server:  # healthz answers on loopback too
        pass
    output = server.output()
    assert "the API is open" in output
