"""The CLI and the client against hostile input: names, refs, untrusted text, lying servers, bad settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from nds.catalog import access
from nds.catalog.datasets import NAME_PATTERN, check_name
from nds.catalog.db import create_db_engine, session_scope, upgrade
from nds_client import NDSClient, Scores, ServerError
from nds_client.errors import ConflictError, InvalidInputError
from tests.conftest import write_images

EVIL_LINK = "[link=https://evil.example]x[/link]"
EVIL_LABELS = ["\x1b]8;;https://evil.example\x07click\x1b]8;;\x07", "\x1b[2Jwiped", "\x9b31mred", "[bold red]loud"]
CONTROL = ("\x1b", "\x07", "\x9b")


def assert_inert(output: str) -> None:
    for ch in CONTROL:
        assert ch not in output, (ch, output)
    assert "Traceback" not in output, output


@pytest.fixture
def wide_env(cli_env: dict[str, str]) -> dict[str, str]:
    return {**cli_env, "COLUMNS": "1000"}


@pytest.fixture
def run(wide_env: dict[str, str]) -> Callable:
    """The nds CLI in-process, wide enough that nothing wraps; exceptions stay in the result."""
    from nds.api.cli import app

    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None):
        return runner.invoke(app, list(args), env={**wide_env, **(env or {})})

    return invoke


@pytest.fixture
def engine(settings):  # noqa: ANN001
    """The catalog's database alone (no vector store is opened: the CLI opens that itself)."""
    upgrade(settings)
    db = create_db_engine(settings)
    yield db
    db.dispose()


# --------------------------------------------------------------------------- names and refs


def test_a_dataset_name_with_a_trailing_newline_is_refused(run, data_root):
    assert NAME_PATTERN.fullmatch("publicB\n") is None
    with pytest.raises(InvalidInputError):
        check_name("publicB\n")
    assert run("db", "upgrade").exit_code == 0
    folder = write_images(data_root / "src", n=1)
    result = run("datasets", "add", "publicB\n", str(folder))
    assert result.exit_code == 1 and "invalid dataset name" in result.stderr
    assert json.loads(run("datasets", "list", "--json").stdout)["count"] == 0


def test_an_all_digit_dataset_name_is_refused_with_a_hint(run, data_root):
    run("db", "upgrade")
    result = run("datasets", "add", "2", str(write_images(data_root / "src", n=1)))
    assert result.exit_code == 1 and "all digits" in result.stderr and "id" in result.stderr


def test_an_all_digit_ref_is_an_id_and_a_legacy_digit_name_resolves_only_without_that_id(run, data_root, engine):
    for name in ("alpha", "beta", "gamma"):
        assert run("datasets", "add", name, str(write_images(data_root / name, n=1))).exit_code == 0
    ids = {d["name"]: d["id"] for d in json.loads(run("datasets", "list", "--json").stdout)["data"]}
    # catalogs from before the rule may hold all-digit names: beta is named like alpha's id
    with session_scope(engine) as session:
        session.execute(text("UPDATE datasets SET name = :n WHERE id = :i"), {"n": str(ids["alpha"]), "i": ids["beta"]})
        session.execute(text("UPDATE datasets SET name = '987654' WHERE id = :i"), {"i": ids["gamma"]})
    shown = json.loads(run("datasets", "show", str(ids["alpha"]), "--json").stdout)
    assert shown["id"] == ids["alpha"]  # the id wins over the name
    assert json.loads(run("datasets", "show", "987654", "--json").stdout)["id"] == ids["gamma"]  # no such id: the name
    missing = run("datasets", "show", "555")
    assert missing.exit_code == 1 and "no dataset with id 555" in missing.stderr and "all-digit" in missing.stderr.replace("\n", " ")
    huge = run("datasets", "show", "9" * 30)
    assert huge.exit_code == 1 and "no dataset with id" in huge.stderr


def test_key_refs_follow_the_same_rule(engine):
    with session_scope(engine) as session:
        a, _ = access.create_key(session=session, name="a", role="client")
        b, _ = access.create_key(session=session, name="b", role="client")
        a_id, b_id = a.id, b.id
        with pytest.raises(InvalidInputError, match="all digits"):
            access.create_key(session=session, name="7", role="client")
    with session_scope(engine) as session:  # a legacy all-digit key name, equal to b's id
        session.execute(text("UPDATE api_keys SET name = :n WHERE id = :i"), {"n": str(b_id), "i": a_id})
    with session_scope(engine) as session:
        assert access.find_key(session=session, ref=b_id).id == b_id  # an int is an id, never a name
        assert access.find_key(session=session, ref=str(b_id)).id == b_id


def test_a_revoked_keys_name_stays_taken_and_the_hint_says_so(engine, run):
    with session_scope(engine) as session:
        access.create_key(session=session, name="ci", role="client")
    with session_scope(engine) as session:
        access.revoke_key(session=session, ref="ci")
    with session_scope(engine) as session, pytest.raises(ConflictError) as caught:
        access.create_key(session=session, name="ci", role="client")
    assert "revoked" in caught.value.message
    assert "never reused" in caught.value.hint and "revoke" not in caught.value.hint.replace("revocation", "")
    result = run("keys", "create", "--name", "ci")
    assert result.exit_code == 1 and "never reused" in result.stderr


# --------------------------------------------------------------------------- untrusted text


def test_names_labels_and_descriptions_print_inert(run, data_root):
    run("db", "upgrade")
    write_images(data_root / "imgs", labels=("a",), n=len(EVIL_LABELS))
    manifest = data_root / "evil.jsonl"
    manifest.write_text("".join(json.dumps({"uri": f"imgs/a/{i}.png", "label": lab}) + "\n" for i, lab in enumerate(EVIL_LABELS)))
    added = run("datasets", "add", "evil", str(manifest), "--source", "manifest", "--description", f"{EVIL_LINK} [bold red]x\x1b[2J")
    assert added.exit_code == 0, added.output
    assert_inert(added.output)
    with_key = run("keys", "create", "--name", "[bold red]k\x1b[2J\x9b31m")
    assert with_key.exit_code == 0
    assert_inert(with_key.stdout)

    listed = run("datasets", "list")
    assert listed.exit_code == 0 and "evil" in listed.stdout
    assert_inert(listed.output)
    shown = run("datasets", "show", "evil")
    assert shown.exit_code == 0, shown.output
    assert_inert(shown.output)
    assert EVIL_LINK in shown.stdout and "[bold red]x" in shown.stdout and "[bold red]loud" in shown.stdout
    assert "https://evil.example" in shown.stdout and "wiped" in shown.stdout  # shown as text, not obeyed
    keys = run("keys", "list")
    assert keys.exit_code == 0 and "[bold red]k" in keys.stdout
    assert_inert(keys.output)
    assert json.loads(run("datasets", "show", "evil", "--json").stdout)["labels"]  # JSON stays exact (escaped by json)


@contextmanager
def fake_server(answer: Callable[[str, str], tuple[int, object]]) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on 127.0.0.1: ``answer(method, path_with_query)`` -> (status, JSON body)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            seen.append(self.path)
            status, body = answer(self.command, self.path)
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _reply

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


EVIL_ERROR = {"detail": f"denied {EVIL_LINK} \x1b]8;;https://evil.example\x07click\x1b]8;;\x07 \x1b[2J", "hint": "[bold red]obey\x9b31m\x07"}


def test_server_errors_print_inert_in_score_and_query(run, tmp_path):
    target = write_images(tmp_path / "target", labels=("t",), n=1)
    scores = Scores(method="rotation", num_images=1, skipped=0, scores={1: 0.5}, experts=[]).save(tmp_path / "scores.json")
    with fake_server(lambda method, path: (403, EVIL_ERROR)) as (url, _):
        scored = run("score", str(target), "--server", url, "-q", "-o", str(tmp_path / "out.json"), "--cache-dir", str(tmp_path / "cache"))
        queried = run("query", "--server", url, "--scores", str(scores), "--budget", "5", "-o", str(tmp_path / "m.csv"))
    for result in (scored, queried):
        assert result.exit_code == 1, result.output
        assert_inert(result.output)
        assert EVIL_LINK in result.stderr and "[bold red]obey" in result.stderr


def test_the_score_table_prints_server_names_inert(run, tmp_path, monkeypatch):
    target = write_images(tmp_path / "target", labels=("t",), n=1)
    evil = "\x1b[2J[bold red]ds\x9b31m"

    def fake_score(self, *args, **kwargs):  # noqa: ANN001
        return Scores(method="rotation", num_images=1, skipped=0, scores={1: 0.5},
                      experts=[{"id": 1, "kind": "rotation", "dataset_id": 3, "dataset": evil, "cluster": 0, "score": 0.5, "heldout_accuracy": 0.9}],
                      label_priors={3: {EVIL_LABELS[0]: 1.0}})

    monkeypatch.setattr(NDSClient, "score", fake_score)
    result = run("score", str(target), "--server", "http://127.0.0.1:9", "-q", "-o", str(tmp_path / "out.json"))
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    assert "[bold red]ds" in result.stdout and "https://evil.example" in result.stdout


# --------------------------------------------------------------------------- lying servers


DATASET_ROW = {"id": 1, "name": "a"}
EXPERT_ROW = {"id": 1, "kind": "rotation", "dataset_id": 1, "cluster": 0, "sha256": "0" * 64, "input_size": 32, "meta": {}, "metrics": {}}


def _stop_after(limit: int, body: object) -> Callable[[str, str], tuple[int, object]]:
    """Answer ``body`` ``limit`` times, then 500: a client that keeps paging fails the test, never hangs it."""
    calls = [0]

    def answer(method: str, path: str) -> tuple[int, object]:
        calls[0] += 1
        return (200, body) if calls[0] <= limit else (500, {"detail": "the client kept paging"})

    return answer


def test_paging_is_bounded_by_what_the_server_returns_not_its_count():
    with fake_server(_stop_after(50, {"data": [DATASET_ROW], "count": 1_000_000})) as (url, seen), NDSClient(url, timeout=5) as client:
        assert client.datasets() == [DATASET_ROW]
    assert len(seen) == 1


def test_full_pages_that_never_end_are_an_error(monkeypatch):
    import nds_client.transport

    monkeypatch.setattr(nds_client.transport, "_MAX_ROWS", 3000, raising=False)
    page = {"data": [DATASET_ROW] * nds_client.transport._PAGE, "count": 10**12}
    with fake_server(_stop_after(50, page)) as (url, seen), NDSClient(url, timeout=5) as client:
        with pytest.raises(ServerError, match="did not end"):
            client.datasets()
    assert len(seen) <= 4


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("experts", {"data": [{**EXPERT_ROW, "id": "x"}], "count": 1}, "'id'"),
        ("experts", {"data": [{k: v for k, v in EXPERT_ROW.items() if k != "dataset_id"}], "count": 1}, "'dataset_id'"),
        ("experts", {"data": [{**EXPERT_ROW, "id": True}], "count": 1}, "'id'"),
        ("experts", {"data": [{**EXPERT_ROW, "meta": ["no"]}], "count": 1}, "meta"),
        ("datasets", {"data": [{"id": "1", "name": "a"}], "count": 1}, "'id'"),
        ("datasets", {"data": ["row"], "count": 1}, "not an object"),
        ("datasets", {"data": [DATASET_ROW], "count": "many"}, "'count'"),
    ],
)
def test_malformed_listing_rows_raise_a_clear_server_error(path, body, needle, tmp_path):
    def answer(method: str, url_path: str) -> tuple[int, object]:
        if url_path.startswith(f"/v1/{path}"):
            return 200, body
        return 200, {"data": [DATASET_ROW], "count": 1}

    with fake_server(answer) as (url, _), NDSClient(url, timeout=5, cache_dir=tmp_path) as client:
        with pytest.raises(ServerError) as caught:
            client.pull_experts() if path == "experts" else client.datasets()
    assert needle in caught.value.message and url in caught.value.message


def test_nds_score_reports_a_bad_expert_id_without_a_traceback(run, tmp_path):
    target = write_images(tmp_path / "target", labels=("t",), n=1)

    def answer(method: str, path: str) -> tuple[int, object]:
        if path.startswith("/v1/experts"):
            return 200, {"data": [{**EXPERT_ROW, "id": "x"}], "count": 1}
        return 200, {"data": [DATASET_ROW], "count": 1}

    with fake_server(answer) as (url, _):
        result = run("score", str(target), "--server", url, "-q", "-o", str(tmp_path / "out.json"), "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "'id'" in result.stderr and "unexpected body" in result.stderr
    assert_inert(result.output)


# --------------------------------------------------------------------------- settings


def test_a_short_admin_key_is_a_one_line_error_naming_the_variable(run, wide_env):
    result = run("datasets", "list", env={"NDS_ADMIN_KEY": "short-secret-value"})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "NDS_ADMIN_KEY" in result.stderr and "32 characters" in result.stderr
    assert "short-secret-value" not in result.output  # the value may be a secret: never printed
    nds_bin = os.path.join(os.path.dirname(sys.executable), "nds")
    done = subprocess.run([nds_bin, "keys", "list"], env={**os.environ, **wide_env, "NDS_ADMIN_KEY": "short-secret-value"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "NDS_ADMIN_KEY" in done.stderr and "short-secret-value" not in done.stderr
    assert done.stderr.strip().splitlines()[0].startswith("error: invalid setting: NDS_ADMIN_KEY")
