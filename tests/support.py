"""Test support: settings for a temporary directory and a Citadel served on loopback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from citadel.app import create_app
from citadel.config import Settings
from citadel.http.serving import uvicorn_options
from citadel.providers.base import Provider

KEYS = {
    "sentinel": "sentinel-key-" + "a" * 40,
    "conductor": "conductor-key-" + "b" * 40,
    "api-gateway": "gateway-key-" + "c" * 40,
    "alchemist": "alchemist-key-" + "d" * 40,
}
PSEUDONYM_KEY = "test-pseudonym-key-0123456789"
CLIENT_BASE = "http://citadel.test"  # the client tests' respx base URL


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_keys": {caller: [key] for caller, key in KEYS.items()},
        "local_keyring": tmp / "keyring.json",
        "audit_pseudonym_key": PSEUDONYM_KEY,
    }
    values.update(overrides)
    return Settings.from_fields(**values)


class AuditSink(io.RawIOBase):
    """A thread-safe binary sink that can be told to fail, like a full disk."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lock = threading.Lock()
        self.fail = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.fail:
            raise OSError(28, "No space left on device")
        with self._lock:
            self._buf += bytes(data)
        return len(data)

    def text(self) -> str:
        with self._lock:
            return self._buf.decode()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines() if line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Served:
    def __init__(self, url: str, audit: AuditSink, app: Any) -> None:
        self.url = url
        self.audit = audit
        self.app = app

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kw)


@contextmanager
def serve_app(app: Any, port: int | None = None) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on loopback; yields its base URL.

    With the options ``citadel serve`` uses (:func:`citadel.http.serving.uvicorn_options`):
    the guarded HTTP protocol (64 KiB head limit, header deadline, JSON refusals)
    and no proxy headers, so that tests see the edge production has.
    """
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", **uvicorn_options())
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def serve_citadel(
    settings: Settings, provider: Provider | None = None, port: int | None = None
) -> Iterator[Served]:
    audit = AuditSink()
    app = create_app(settings, audit_sink=audit, provider=provider)  # type: ignore[arg-type]
    with serve_app(app, port) as url:
        yield Served(url, audit, app)


def headers(caller: str | None = None, **extra: str) -> dict[str, str]:
    out = {"X-Internal-API-Key": KEYS[caller]} if caller else {}
    out.update({k.replace("_", "-"): v for k, v in extra.items()})
    return out


def sha256_form(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class RedisServer:
    """A real redis-server on a free port, owned by the test."""

    def __init__(self, port: int | None = None) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
        self.binary = binary
        self.port = port or free_port()
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import subprocess

        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


class FakeTime:
    """An injected clock and sleep for the client: waits are recorded, no time passes."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


# -- citadel as a real process (tests/test_cli.py, tests/test_keyring_fleet.py) ----

CITADEL = [sys.executable, "-m", "citadel"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CITADEL_", "EVERVAULT_"))}
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``citadel ARGS`` to completion; ``serve`` gets a free port unless the test names one.

    A user may well have ``make run`` serving on 8004 while the suite runs.
    """
    if args[:1] == ["serve"] and "--port" not in args and "--help" not in args:
        args = [*args, "--port", str(free_port())]
    return subprocess.run(
        [*CITADEL, *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=30
    )


@contextmanager
def serving(
    cwd: Path, *args: str, log: Path | None = None, **env: str
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``citadel serve`` on a free port until it answers /health.

    Its output is piped, for tests that read it after the server stopped; a
    server under sustained load would fill the pipe and block on its audit
    writes, so such tests pass ``log``, a file the output goes to instead.
    """
    port = free_port()
    out = open(log, "ab") if log is not None else subprocess.PIPE  # noqa: SIM115
    proc = subprocess.Popen(
        [*CITADEL, "serve", "--port", str(port), *args],
        cwd=cwd,
        env=clean_env(**env),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                output = proc.stdout.read() if proc.stdout else log.read_text() if log else ""
                raise RuntimeError(f"citadel did not start: {output}")
            time.sleep(0.05)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        if log is not None:
            out.close()  # type: ignore[union-attr]
