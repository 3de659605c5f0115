"""`nds serve` in a child process on a free loopback port: the demo, the benchmarks and the
tests start the API this way, exactly as a user would, and stop it by its process group.

    with LocalServer(env, log_path) as server:
        httpx.get(f"{server.url}/healthz")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

NDS = str(Path(sys.executable).with_name("nds"))


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    """``nds serve --host HOST --port PORT [args]`` with ``env``, its output appended to ``log``."""

    def __init__(
        self, env: Mapping[str, str], log: Path, *, host: str = "127.0.0.1", port: int | None = None,
        args: Sequence[str] = ("--log-level", "warning"), cwd: Path | None = None,
    ) -> None:
        self.env, self.log, self.host, self.args, self.cwd = dict(env), Path(log), host, list(args), cwd
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> LocalServer:
        """Start it and wait until ``/healthz`` answers 200; RuntimeError with the log's tail if it does not."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([NDS, "serve", "--host", self.host, "--port", str(self.port), *self.args],
                                         env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"nds serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nds serve did not answer /healthz within {timeout:g} s:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server (and any worker processes it started), as a crash would."""
        if self.proc is not None:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        self.proc = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
