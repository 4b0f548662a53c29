"""The emulator: a small asyncio HTTP/1.1 server run on an event loop thread of its own.

Hand-rolled rather than an ASGI app so that a fault can drop the TCP connection
without any response, as a crashing upstream would, and so that 64+ keep-alive
connections with injected latency cost a coroutine each, not a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import threading
from dataclasses import asdict, dataclass
from http import HTTPStatus
from typing import Any, Final

from evervault_emulator.crypto import AppKeys, UndecryptableError

#: The paths the SDK calls; ``stats()`` always lists them, even at zero.
API_PATHS: Final = ("cages/key", "decrypt")
_FAULT_FIELDS: Final = ("status", "count", "latency_ms", "drop", "retry_after")
_JSON: Final = "application/json"
_PROBLEM: Final = "application/problem+json; charset=utf-8"
_MAX_BODY: Final = 64 * 1024 * 1024


@dataclass
class Fault:
    """What the next ``count`` calls to a path get (``count=None``: every call until cleared).

    ``latency_ms`` delays the answer; with ``status`` the answer is that status (429 and
    ``retry_after`` add a ``Retry-After`` header); ``drop`` closes the connection without
    any answer. Latency alone still answers normally.
    """

    status: int | None = None
    count: int | None = None
    latency_ms: float = 0
    drop: bool = False
    retry_after: int | None = None

    def __post_init__(self) -> None:
        if self.status is not None and (
            isinstance(self.status, bool) or not isinstance(self.status, int)
        ):
            raise ValueError("status must be an integer or null")
        if self.status is not None and not 200 <= self.status <= 599:
            raise ValueError("status must be between 200 and 599")
        if self.count is not None and (
            isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1
        ):
            raise ValueError("count must be a positive integer or null")
        if (
            isinstance(self.latency_ms, bool)
            or not isinstance(self.latency_ms, int | float)
            or not 0 <= self.latency_ms <= 600_000
        ):
            raise ValueError("latency_ms must be a number from 0 to 600000")
        if not isinstance(self.drop, bool):
            raise ValueError("drop must be true or false")
        if self.retry_after is not None and (
            isinstance(self.retry_after, bool)
            or not isinstance(self.retry_after, int)
            or self.retry_after < 0
        ):
            raise ValueError("retry_after must be a non-negative integer or null")


def normalise(path: str) -> str:
    """``/decrypt``, ``decrypt/`` and ``decrypt?x=1`` are all ``decrypt``."""
    return path.split("?", 1)[0].strip("/")


def problem(status: int, code: str, detail: str, title: str | None = None) -> dict[str, Any]:
    """Evervault's error body: Problem JSON with ``code``, ``title``, ``status``, ``detail``."""
    return {
        "status": status,
        "code": code,
        "title": title or HTTPStatus(status).phrase,
        "detail": detail,
    }


class _Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        self.status = status
        self.body = json.dumps(payload, separators=(",", ":")).encode()
        self.content_type = content_type or (_JSON if status < 400 else _PROBLEM)
        self.headers = headers or {}


class _BadRequest(Exception):
    pass


class EvervaultEmulator:
    """The Evervault API on ``host:port``, as the ``evervault`` SDK uses it.

    A context manager: ``with EvervaultEmulator() as emu: evervault.Client(app_uuid=emu.app_id,
    api_key=emu.api_key, base_url=emu.url)``. ``port=0`` picks a free port on first
    :meth:`start`; :meth:`stop` then :meth:`start` serve again on the same port, with the
    same keys, faults and counters.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        app_id: str | None = None,
        api_key: str | None = None,
        *,
        keys: AppKeys | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.app_id = app_id or "app_" + secrets.token_hex(6)
        self.api_key = api_key or "ev:key:1:" + secrets.token_urlsafe(24)
        self.keys = keys or AppKeys()
        self._faults: dict[str, Fault] = {}
        self._calls: dict[str, int] = dict.fromkeys(API_PATHS, 0)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- control from Python ------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, with the trailing ``/`` the SDK's ``base_url`` needs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def running(self) -> bool:
        return self._server is not None

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
        """Fault the next ``count`` calls to ``path`` (``None``: until cleared); replaces any."""
        fault = Fault(status, count, latency_ms, drop, retry_after)
        with self._lock:
            self._faults[normalise(path)] = fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def faults(self) -> dict[str, Fault]:
        """The faults in force, per path (``count`` is what is left)."""
        with self._lock:
            return {path: Fault(**asdict(f)) for path, f in self._faults.items()}

    def calls(self, path: str) -> int:
        """Requests that reached ``path`` since start or :meth:`reset`, faulted ones included."""
        with self._lock:
            return self._calls.get(normalise(path), 0)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._calls)

    def reset(self) -> None:
        """Clear faults and counters."""
        with self._lock:
            self._faults.clear()
            self._calls = dict.fromkeys(API_PATHS, 0)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> EvervaultEmulator:
        """Serve (on a daemon thread) until :meth:`stop`; a no-op if already serving."""
        if self.running:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            try:
                server = loop.run_until_complete(
                    asyncio.start_server(
                        self._handle, self.host, self.port, reuse_address=True, backlog=2048
                    )
                )
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                loop.close()
                ready.set()
                return
            self._loop, self._server = loop, server
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        thread = threading.Thread(target=run, name=f"evervault-emulator-{self.port}", daemon=True)
        thread.start()
        if not ready.wait(30):
            raise RuntimeError("the emulator did not start within 30 s")
        if errors:
            thread.join()
            raise errors[0]
        self._thread = thread
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection; the port is kept for :meth:`start`."""
        loop, server, thread = self._loop, self._server, self._thread
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

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(10)
            self._loop = self._server = self._thread = None

    def __enter__(self) -> EvervaultEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EvervaultEmulator {self.url} app_id={self.app_id} {state}>"

    # -- HTTP/1.1 ----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read and answer one request; whether to keep the connection open."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed the connection between requests
        except asyncio.LimitOverrunError:
            await self._send(
                writer, _Response(431, problem(431, "bad-request", "Headers too large")), False
            )
            return False
        try:
            lines = head[:-4].decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            if not version.startswith("HTTP/1."):
                raise _BadRequest("unsupported HTTP version")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise _BadRequest("malformed header line")
                headers[name.strip().lower()] = value.strip()
            connection = headers.get("connection", "").lower()
            keep_alive = (
                "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
            )
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if "chunked" in headers.get("transfer-encoding", "").lower():
                body = await self._read_chunked(reader)
            else:
                length = int(headers.get("content-length") or 0)
                if not 0 <= length <= _MAX_BODY:
                    raise _BadRequest("bad Content-Length")
                body = await reader.readexactly(length)
        except (ValueError, _BadRequest) as exc:
            detail = str(exc) if isinstance(exc, _BadRequest) else "Malformed request"
            await self._send(writer, _Response(400, problem(400, "bad-request", detail)), False)
            return False

        path = normalise(target)
        if path == "_emulator" or path.startswith("_emulator/"):
            response = self._control(method, path, body)
        else:
            with self._lock:
                self._calls[path] = self._calls.get(path, 0) + 1
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
            if fault is not None and fault.status is not None:
                response = self._injected(fault)
            else:
                response = self._api(method, path, headers, body)
        await self._send(writer, response, keep_alive)
        return keep_alive

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            total += size
            if total > _MAX_BODY:
                raise _BadRequest("body too large")
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: _Response, keep_alive: bool) -> None:
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = "Unknown"
        head = (
            f"HTTP/1.1 {response.status} {reason}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
            "Server: evervault-emulator\r\n"
        )
        for name, value in response.headers.items():
            head += f"{name}: {value}\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + response.body)
        await writer.drain()

    # -- the API -----------------------------------------------------------------------

    @staticmethod
    def _injected(fault: Fault) -> _Response:
        status = fault.status
        assert status is not None
        headers: dict[str, str] = {}
        retry_after = fault.retry_after
        if retry_after is None and status == 429:
            retry_after = 1
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Injected fault"
        slug = "-".join(phrase.lower().replace("'", "").split())
        body = problem(status, slug, "Injected by the Evervault emulator", phrase)
        return _Response(status, body, headers)

    def _authorized_basic(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return secrets.compare_digest(given, f"{self.app_id}:{self.api_key}".encode())

    def _api(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Response:
        if path == "cages/key":
            if method != "GET":
                return _not_allowed("GET")
            api_key = headers.get("api-key")
            if not (
                (
                    api_key is not None
                    and secrets.compare_digest(api_key.encode(), self.api_key.encode())
                )
                or self._authorized_basic(headers)
            ):
                return _unauthorized()
            return _Response(200, self.keys.served())
        if path == "decrypt":
            if method != "POST":
                return _not_allowed("POST")
            if not self._authorized_basic(headers):
                return _unauthorized()
            if "octet-stream" in headers.get("content-type", ""):
                return _undecryptable("File decryption is not emulated")
            try:
                request = json.loads(body)
            except ValueError:
                return _Response(400, problem(400, "bad-request", "The body must be JSON"))
            if not isinstance(request, dict) or "data" not in request:
                detail = 'The body must be a JSON object with a "data" field'
                return _Response(400, problem(400, "bad-request", detail))
            try:
                return _Response(200, {"data": self.keys.decrypt(request["data"])})
            except UndecryptableError:
                return _undecryptable("Unable to decrypt data")
        return _Response(404, problem(404, "not-found", f"No route for /{path}"))

    # -- control over HTTP -------------------------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> _Response:
        if path == "_emulator/stats":
            return _Response(200, self.stats()) if method == "GET" else _not_allowed("GET")
        if path == "_emulator/reset":
            if method != "POST":
                return _not_allowed("POST")
            self.reset()
            return _Response(200, {"reset": True})
        if path == "_emulator/faults":
            if method == "GET":
                return _Response(200, self._faults_json())
            if method == "DELETE":
                self.clear_faults()
                return _Response(200, {})
            if method == "POST":
                try:
                    spec = json.loads(body or b"{}")
                    if not isinstance(spec, dict):
                        raise ValueError("the body must be a JSON object")
                    unknown = set(spec) - {"path", *_FAULT_FIELDS}
                    if unknown:
                        raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
                    target = spec.get("path", "decrypt")
                    if not isinstance(target, str) or not normalise(target):
                        raise ValueError("path must be a non-empty string, e.g. decrypt")
                    fields = {k: spec[k] for k in _FAULT_FIELDS if k in spec}
                    self.set_fault(target, **fields)
                except ValueError as exc:
                    return _Response(400, problem(400, "bad-request", str(exc)))
                return _Response(200, self._faults_json())
            return _not_allowed("GET, POST, DELETE")
        if path == "_emulator" and method == "GET":
            return _Response(
                200,
                {
                    "url": self.url,
                    "app_id": self.app_id,
                    "keys": self.keys.served(),
                    "faults": self._faults_json(),
                    "stats": self.stats(),
                },
            )
        return _Response(404, problem(404, "not-found", f"No route for /{path}"))

    def _faults_json(self) -> dict[str, dict[str, Any]]:
        return {path: asdict(fault) for path, fault in self.faults().items()}


def _unauthorized() -> _Response:
    return _Response(401, problem(401, "unauthorized", "Invalid or missing API key"))


def _undecryptable(detail: str) -> _Response:
    return _Response(422, problem(422, "unable-to-decrypt", detail, "Unable to decrypt"))


def _not_allowed(allow: str) -> _Response:
    body = problem(405, "method-not-allowed", f"Use {allow}")
    return _Response(405, body, {"Allow": allow})
