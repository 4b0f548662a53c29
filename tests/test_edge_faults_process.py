"""Issue 15, findings 2 and 5 with a real ``citadel serve`` process and real sockets.

A flood of Upgrade connections against a server whose file descriptors are
few (finding 2), and nothing of a request's target or query in what the
server prints (finding 5). Waits are bounded by socket timeouts and polling
deadlines; nothing measures time.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from support import CITADEL, KEYS, clean_env, free_port
from test_hardening_process import SERVE_ENV

CANARY = "QUERYCANARY9f3e"


@contextmanager
def citadel_process(
    cwd: Path, *, files: int | None = None, **env: str
) -> Iterator[tuple[int, Path]]:
    """``citadel serve`` on a free port, its output in a file; at most ``files`` descriptors."""
    port = free_port()
    log = cwd / "citadel.log"

    def limit_files() -> None:
        if files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*CITADEL, "serve", "--port", str(port)],
            cwd=cwd,
            env=clean_env(**SERVE_ENV, **env),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=limit_files,
        )
    try:
        deadline = time.monotonic() + 30
        while not healthy(port):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "citadel did not start"
            time.sleep(0.05)
        yield port, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def upgrade_head(target: bytes = b"/encrypt") -> bytes:
    """A POST asking for a websocket whose promised body never comes."""
    return (
        b"POST " + target + b" HTTP/1.1\r\nHost: c\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 100\r\n\r\n"
    )


def answered_or_closed(s: socket.socket) -> bool:
    """True once the server answered or closed; False if the socket's timeout passed first."""
    try:
        s.recv(65536)
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_upgrade_connections_beyond_the_file_limit_are_all_closed_and_health_answers(
    tmp_path: Path,
) -> None:
    with citadel_process(tmp_path, files=256, CITADEL_READ_TIMEOUT_S="2") as (port, _):
        sockets = []
        try:
            for _ in range(400):
                s = socket.create_connection(("127.0.0.1", port), timeout=20)
                with contextlib.suppress(OSError):
                    s.sendall(upgrade_head())
                sockets.append(s)
            # Each is answered (408) or closed within its deadline, the ones the
            # server could not accept at first included: 20 s is far beyond 2 s.
            assert all(answered_or_closed(s) for s in sockets)
        finally:
            for s in sockets:
                s.close()
        deadline = time.monotonic() + 10
        while not healthy(port):
            assert time.monotonic() < deadline, "/health did not answer after the flood"
            time.sleep(0.1)


def test_nothing_of_a_request_target_or_query_reaches_the_servers_output(
    tmp_path: Path,
) -> None:
    key = KEYS["sentinel"].encode()
    requests = [
        # A websocket handshake (uvicorn's websocket protocol logged its path and query).
        b"GET /encrypt?api_key=" + CANARY.encode() + b" HTTP/1.1\r\nHost: c\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        b"POST /encrypt?user=" + CANARY.encode() + b" HTTP/1.1\r\nHost: c\r\n"
        b"X-Internal-API-Key: " + key + b"\r\nContent-Length: 17\r\n\r\n"
        b'{"plaintext":"x"}',
        b"GET /nowhere/" + CANARY.encode() + b"?q=" + CANARY.encode() + b" HTTP/1.1\r\n"
        b"Host: c\r\n\r\n",
        b"GET /health?" + CANARY.encode() + b" HTTP/1.1\r\nHost: c\r\n"
        b"Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        b"GET /" + CANARY.encode() + b" HTTP/1.1 junk\r\n\r\n",
        b"POST /encrypt?" + CANARY.encode() + b" HTTP/1.1\r\nHost: c\r\n"
        b"Content-Length: +17\r\n\r\n",
    ]
    with citadel_process(tmp_path) as (port, log):
        for request in requests:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(request + b"\r\n")
                assert answered_or_closed(s)
    output = log.read_text()
    assert "audit" in output  # the output was captured
    assert CANARY not in output
