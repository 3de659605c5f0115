"""What the client says when the server cannot be reached, and when it breaks off an answer
it had started (a streamed export whose server failed part-way): a real HTTP server on loopback."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nds_client.client import NDSClient
from nds_client.errors import ServerError, ServerUnreachable


class _CutShort(BaseHTTPRequestHandler):
    """Answers 200 with a body shorter than its Content-Length, then closes the connection."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        self.wfile.write(b"x" * 1000)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def cut_short_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CutShort)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_answer_broken_off_part_way_says_so_and_writes_nothing(cut_short_server, tmp_path):
    out = tmp_path / "shard-00000.tar"
    with NDSClient(cut_short_server) as client, pytest.raises(ServerError) as info:
        client.manifest("q1", out, format="webdataset")
    assert "broke off its answer part-way" in str(info.value) and "server's log" in (info.value.hint or "")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial file, no temp file left


def test_a_server_that_does_not_answer_is_unreachable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with NDSClient(f"http://127.0.0.1:{port}") as client, pytest.raises(ServerUnreachable) as info:
        client.manifest("q1", tmp_path / "m.csv")
    assert "cannot reach the server" in str(info.value)
    assert list(tmp_path.iterdir()) == []
