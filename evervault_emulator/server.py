"""A small asyncio HTTP/1.1 server for the emulator, run in a thread of its own.

Hand-rolled rather than an ASGI app so that a fault can drop the TCP
connection without any response, as a crashing upstream would, and so that 64
keep-alive connections with injected latency cost no thread each.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from evervault_emulator.crypto import AppKeys, UndecryptableError

REASONS = {200: "OK", 401: "Unauthorized", 404: "Not Found", 422: "Unprocessable Entity"}


@dataclass
class Fault:
    """What the next ``count`` calls to a path get (``count=None``: until cleared)."""

    status: int | None = None
    count: int | None = None
    latency_ms: float = 0
    drop: bool = False
    retry_after: int | None = None


class EvervaultEmulator:
    """The emulator on 127.0.0.1; a context manager that starts and stops it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        app_id: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.app_id = app_id or "app_" + secrets.token_hex(6)
        self.api_key = api_key or "ev:key:1:" + secrets.token_hex(16)
        self.keys = AppKeys()
        self._faults: dict[str, Fault] = {}
        self._calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- control -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def set_fault(
        self,
        path: str,
        *,
        status: int | None = None,
        count: int | None = None,
        latency_ms: float = 0,
        drop: bool = False,
        retry_after: int | None = None,
    ) -> None:
        with self._lock:
            self._faults[path.strip("/")] = Fault(status, count, latency_ms, drop, retry_after)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def calls(self, path: str) -> int:
        with self._lock:
            return self._calls[path.strip("/")]

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self._calls.clear()

    def start(self) -> EvervaultEmulator:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(
                        self._handle, self.host, self.port, reuse_address=True, backlog=1024
                    )
                )
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                ready.set()
                return
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="evervault-emulator", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def shutdown() -> None:
            server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = self._server = self._thread = None

    def __enter__(self) -> EvervaultEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep = await self._respond(writer, method, target.split("?")[0], headers, body)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            ValueError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
    ) -> bool:
        path = target.strip("/")
        if path.startswith("_emulator/"):
            status, payload, extra = self._control(method, path, body)
            self._send(writer, status, payload, extra)
            return True
        with self._lock:
            self._calls[path] += 1
            fault = self._faults.get(path)
            if fault is not None and fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    del self._faults[path]
        if fault is not None:
            if fault.latency_ms:
                await asyncio.sleep(fault.latency_ms / 1000)
            if fault.drop:
                writer.transport.abort()
                return False
            if fault.status is not None:
                extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
                payload = {"status": fault.status, "code": "injected-fault", "detail": "Injected"}
                self._send(writer, fault.status, payload, extra)
                return True
        status, payload = self._api(method, path, headers, body)
        self._send(writer, status, payload, {})
        return True

    def _api(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        if method == "GET" and path == "cages/key":
            if headers.get("api-key") != self.api_key:
                return 401, _problem(401, "unauthorized", "Invalid API key")
            return 200, self.keys.served()
        if method == "POST" and path == "decrypt":
            expected = base64.b64encode(f"{self.app_id}:{self.api_key}".encode()).decode()
            if headers.get("authorization") != f"Basic {expected}":
                return 401, _problem(401, "unauthorized", "Invalid credentials")
            try:
                data = json.loads(body)["data"]
                return 200, {"data": self.keys.decrypt(data)}
            except (UndecryptableError, ValueError, KeyError, TypeError):
                return 422, _problem(422, "unable-to-decrypt", "Unable to decrypt data")
        return 404, _problem(404, "not-found", "Not found")

    def _control(self, method: str, path: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        if path == "_emulator/stats" and method == "GET":
            with self._lock:
                return 200, dict(self._calls), {}
        if path == "_emulator/reset" and method == "POST":
            self.reset()
            return 200, {"reset": True}, {}
        if path == "_emulator/faults" and method == "DELETE":
            self.clear_faults()
            return 200, {"faults": {}}, {}
        if path == "_emulator/faults" and method == "POST":
            spec = json.loads(body or b"{}")
            self.set_fault(
                spec.pop("path", "decrypt"),
                **{
                    k: spec[k]
                    for k in ("status", "count", "latency_ms", "drop", "retry_after")
                    if k in spec
                },
            )
            return 200, {"ok": True}, {}
        return 404, _problem(404, "not-found", "Not found"), {}

    @staticmethod
    def _send(
        writer: asyncio.StreamWriter, status: int, payload: Any, extra: dict[str, str]
    ) -> None:
        data = json.dumps(payload).encode()
        reason = REASONS.get(status, "Status")
        head = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
        ]
        head += [f"{k}: {v}" for k, v in extra.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)


def _problem(status: int, code: str, detail: str) -> dict[str, Any]:
    return {"status": status, "code": code, "title": detail, "detail": detail}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
