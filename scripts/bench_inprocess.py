"""One keep-alive connection served in-process: Citadel's protocol and app, a fake socket.

Used by ``scripts/bench_compare.py`` under callgrind, whose instruction counts
do not depend on what else the machine is doing (wall-clock figures on a
shared machine vary by a third from one run to the next). Runs against this
tree or an older one (2.1.0 kept its protocol in ``citadel.server``):

    PYTHONPATH=TREE:TREE/client python scripts/bench_inprocess.py /decrypt REQUESTS
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.server import ServerState

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench


class Socket(asyncio.Transport):
    """Takes what the server writes; an answer's body (a JSON object) ends a request."""

    def __init__(self, answered: list[asyncio.Event]) -> None:
        super().__init__()
        self.answered = answered
        self.last = b""

    def write(self, data: Any) -> None:
        self.last = bytes(data)
        if self.last[:1] == b"{":
            self.answered[0].set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise RuntimeError("the connection was closed")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def request(path: str, key: str, body: dict[str, str]) -> bytes:
    raw = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
        f"X-Internal-API-Key: {key}\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    return head.encode() + raw


async def serve(path: str, requests: int) -> float:
    """Seconds per request for ``requests`` requests to ``path`` on one connection."""
    os.environ.update(bench.citadel_env(Path(tempfile.mkdtemp())))
    from citadel.app import app_from_env

    try:
        from citadel.http.protocol import GuardedHttpToolsProtocol as protocol_class
        from citadel.http.serving import uvicorn_options

        options = uvicorn_options()
    except ImportError:  # 2.1.0
        from citadel.server import GuardedHttpToolsProtocol as protocol_class  # type: ignore
        from citadel.server import uvicorn_options  # type: ignore

        options = uvicorn_options(10.0)
    options.pop("http")
    app = app_from_env()
    config = Config(app, lifespan="on", **options)
    config.load()
    startup: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    started = asyncio.Event()

    async def send_lifespan(message: Any) -> None:
        started.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan = asyncio.ensure_future(app(scope, startup.get, send_lifespan))
    await asyncio.wait_for(started.wait(), 30)
    answered = [asyncio.Event()]
    sock = Socket(answered)
    protocol = protocol_class(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    protocol.connection_made(sock)

    async def one(data: bytes) -> bytes:
        answered[0] = asyncio.Event()
        protocol.data_received(data)
        await answered[0].wait()
        return sock.last

    ciphertext = json.loads(
        await one(request("/encrypt", bench.SENTINEL, {"plaintext": bench.PLAINTEXT}))
    )["encrypted_data"]
    body, key = bench.operation_body(path, ciphertext)
    data = request(path, key, body)
    start = time.perf_counter()
    for _ in range(requests):
        answer = await one(data)
    elapsed = time.perf_counter() - start
    if b'"error"' in answer:
        raise RuntimeError(answer.decode())
    lifespan.cancel()
    return elapsed / max(1, requests)


if __name__ == "__main__":
    seconds = uvloop.run(serve(sys.argv[1], int(sys.argv[2])))
    print(f"{sys.argv[1]} {seconds * 1e6:.1f} us/request", file=sys.stderr)
