"""A real S3 API on loopback for the object-storage tests: moto's server mode.

moto (``moto[server]``) serves the S3 REST API over HTTP; boto3 and s3fs talk to it as they
would to AWS, through ``AWS_ENDPOINT_URL``. No S3-compatible server binary (MinIO and the
like) can be installed on the machines these tests run on, so this is the object store
they use. What it does here:

* :class:`S3Server` runs moto's ``ThreadedMotoServer`` on ``127.0.0.1`` and a free port, and
  adds what the fault tests need: it counts the object reads it serves, stops **hard** (the
  listening socket and every open connection shut, as when the store's process dies: a
  client's pooled keep-alive connections are cut too, where moto's own ``stop`` would keep
  serving them) and starts again on the same port. moto keeps its buckets in module-global
  backends of this process, so a restarted server serves the same objects, as a restarted
  store with durable disks would.
* Credentials: moto accepts any keys unless IAM authentication is on; it is switched on
  through moto's own API (``POST /moto-api/reset-auth``, what ``INITIAL_NO_AUTH_ACTION_COUNT``
  sets at start-up), after which moto checks every request's signature against the IAM
  users it knows, of which there are none: the dummy keys are refused with a real 403
  (``InvalidAccessKeyId`` on listings, a bodiless 403 on HEAD requests).

Fixtures: ``s3_server`` (one per session; sets the AWS variables for this process, and
``s3_server.env`` holds them for subprocesses), ``bucket`` (a fresh bucket per test), and
``s3_fault_server`` (a server of the test's own, to stop and restart).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

#: the variables that point boto3/s3fs at the server (and nothing else from the environment)
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "nds-test-key", "AWS_SECRET_ACCESS_KEY": "nds-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (an endpoint that does not answer: connection refused)."""
    return free_port()


def _is_object_get(environ: dict) -> bool:
    """A GET of one object (``/bucket/key``), not a listing (``/bucket?list-type=2``) nor moto's own API."""
    path = environ.get("PATH_INFO", "")
    return environ.get("REQUEST_METHOD") == "GET" and path.count("/") >= 2 and not path.startswith("/moto-api") \
        and "list-type" not in environ.get("QUERY_STRING", "")


class S3Server:
    """moto's S3 server on ``127.0.0.1:port`` (a free port unless given); see the module docstring."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.object_gets = 0
        self._moto = None
        self._connections: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._trip: tuple[int, threading.Event] | None = None
        self._down = True

    # ------------------------------------------------------------------ the server

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The variables a process (this one, a subprocess, the CLI) needs to use this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **DUMMY_CREDENTIALS}

    @property
    def running(self) -> bool:
        return not self._down

    def start(self) -> S3Server:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from moto.server import ThreadedMotoServer
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.CRITICAL)  # a line per request, and the cut connections of a hard stop
        owner = self

        class Server(ThreadedMotoServer):
            error: BaseException | None = None

            def _server_entry(self) -> None:
                try:
                    self._server = make_server(self._ip_address, self._port, owner._wsgi(DomainDispatcherApplication(create_backend_app)),
                                               True, request_handler=MotoRequestHandler)
                except BaseException as exc:  # noqa: BLE001 - reported by start()
                    self.error = exc
                    self._server_ready_event.set()
                    return
                handle = self._server.process_request

                def process_request(request: socket.socket, client_address: object) -> None:
                    owner._connections.add(request)
                    handle(request, client_address)

                self._server.process_request = process_request  # type: ignore[method-assign]
                self._server_ready_event.set()
                self._server.serve_forever(poll_interval=0.05)

        server = Server(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        if server.error is not None:
            raise RuntimeError(f"cannot start the S3 server on port {self.port}: {server.error}")
        self._moto, self._down = server, False
        return self

    def stop(self) -> None:
        """Stop hard: new connections are refused and open ones cut at once; then the server thread ends."""
        self._cut()
        moto, self._moto = self._moto, None
        if moto is not None and moto._server is not None:
            moto.stop()
            moto._server.server_close()

    def _cut(self) -> None:
        with self._lock:
            if self._down:
                return
            self._down = True
        moto = self._moto
        if moto is not None and moto._server is not None:
            with _quiet(OSError):
                moto._server.socket.shutdown(socket.SHUT_RDWR)  # the port refuses connections from now on
        for conn in list(self._connections):
            with _quiet(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def restart(self) -> S3Server:
        """Start again on the same port (moto's buckets and objects are still there)."""
        if self.running:
            self.stop()
        return self.start()

    def stop_after_object_gets(self, n: int) -> threading.Event:
        """Stop the server (hard, from another thread) when it is asked for its ``n``-th object
        from now on, before answering it; the event is set once it is down."""
        done = threading.Event()
        with self._lock:
            self._trip = (self.object_gets + n, done)
        return done

    def _wsgi(self, app: Callable) -> Callable:
        def counting(environ: dict, start_response: Callable) -> object:
            if self._down:  # a request that raced the hard stop: drop its connection, answer nothing
                raise ConnectionAbortedError("the S3 server is stopping")
            if _is_object_get(environ):
                with self._lock:
                    self.object_gets += 1
                    trip = self._trip if self._trip is not None and self.object_gets >= self._trip[0] else None
                    if trip is not None:
                        self._trip = None
                if trip is not None:
                    self._cut()

                    def finish() -> None:
                        self.stop()
                        trip[1].set()

                    threading.Thread(target=finish, name="s3-stop", daemon=True).start()
                    raise ConnectionAbortedError("the S3 server was stopped")
            return app(environ, start_response)

        return counting

    # ------------------------------------------------------------------ credentials

    @contextmanager
    def refusing_credentials(self) -> Iterator[None]:
        """Inside: moto checks every request's credentials (IAM authentication on) and refuses the dummy keys with a 403."""
        import requests

        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        try:
            yield
        finally:
            requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()

    # ------------------------------------------------------------------ buckets

    def client(self):  # noqa: ANN201 - a boto3 S3 client
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=DUMMY_CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str | None = None) -> Bucket:
        bucket = Bucket(self, name or f"nds-{uuid.uuid4().hex[:12]}")
        self.client().create_bucket(Bucket=bucket.name)
        return bucket


@contextmanager
def _quiet(*kinds: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except kinds:
        pass


class Bucket:
    """One bucket of an :class:`S3Server`, with the helpers the tests use."""

    def __init__(self, server: S3Server, name: str) -> None:
        self.server = server
        self.name = name

    def uri(self, key: str = "") -> str:
        """``s3://BUCKET/KEY`` (``s3://BUCKET`` for no key)."""
        return f"s3://{self.name}/{key.strip('/')}".rstrip("/")

    def put(self, key: str, data: bytes) -> str:
        self.server.client().put_object(Bucket=self.name, Key=key, Body=data)
        return self.uri(key)

    def get(self, key: str) -> bytes:
        return self.server.client().get_object(Bucket=self.name, Key=key)["Body"].read()

    def upload_folder(self, folder: Path, prefix: str) -> str:
        """Every file under ``folder`` as ``PREFIX/<relative path>``; returns ``s3://BUCKET/PREFIX``."""
        client = self.server.client()
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            client.upload_file(str(path), self.name, f"{prefix.strip('/')}/{path.relative_to(folder).as_posix()}")
        return self.uri(prefix)

    def keys(self, prefix: str = "") -> list[str]:
        client = self.server.client()
        found: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            found.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(found)

    def remove(self) -> None:
        """Delete every object, then the bucket (moto keeps them in this process's memory)."""
        client = self.server.client()
        for key in self.keys():
            client.delete_object(Bucket=self.name, Key=key)
        client.delete_bucket(Bucket=self.name)


#: botocore's attempts at a request that gets no answer, where a test makes the store fail
#: (AWS_MAX_ATTEMPTS; the default, 5 with backoff, takes 6 to 11 s a call to give up on a closed port)
FAULT_ATTEMPTS = 2


@contextmanager
def pointed_at(server_or_endpoint: S3Server | str, *, attempts: int | None = None) -> Iterator[None]:
    """This process's AWS variables pointing at a server (or any endpoint), restored after;
    ``attempts``: AWS_MAX_ATTEMPTS (how often botocore tries a request before it gives up)."""
    endpoint = server_or_endpoint.endpoint if isinstance(server_or_endpoint, S3Server) else server_or_endpoint
    mp = pytest.MonkeyPatch()
    try:
        for name in CLEARED:
            mp.delenv(name, raising=False)
        for name, value in {**DUMMY_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(name, value)
        if attempts is not None:
            mp.setenv("AWS_MAX_ATTEMPTS", str(attempts))
        yield
    finally:
        mp.undo()


def subprocess_env(server_or_endpoint: S3Server | str, **extra: str) -> dict[str, str]:
    """The environment for a subprocess (the ``nds`` CLI, a worker) that uses the server."""
    endpoint = server_or_endpoint.endpoint if isinstance(server_or_endpoint, S3Server) else server_or_endpoint
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    return {**env, **DUMMY_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, **extra}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the session; this process's AWS variables point at it."""
    server = S3Server().start()
    try:
        with pointed_at(server):
            yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_server: S3Server) -> Iterator[Bucket]:
    """A fresh, empty bucket on the session's server, removed after the test."""
    made = s3_server.create_bucket()
    yield made
    if s3_server.running:
        with _quiet(Exception):
            made.remove()


@pytest.fixture
def s3_fault_server(s3_server: S3Server) -> Iterator[S3Server]:
    """A server of the test's own (a port of its own, the same moto backends) that the test may
    stop and restart; this process's AWS variables point at it during the test (with
    :data:`FAULT_ATTEMPTS` tries a request)."""
    server = S3Server().start()
    try:
        with pointed_at(server, attempts=FAULT_ATTEMPTS):
            yield server
    finally:
        server.stop()
