"""A lean HTTP/1.1 transport for high-volume callers: one kept-alive connection.

httpx's default transport (httpcore over anyio) spends several hundred
microseconds of CPU per request on pool bookkeeping, socket probes and
typed-attribute lookups: for a job that makes tens of thousands of calls in a
row (``citadel rewrap``), more than Citadel spends answering them. This
transport speaks just what Citadel (or a proxy in front of it) answers, HTTP/1.1 with
``Content-Length`` or chunked bodies, over one asyncio stream, for one request at a time: give each
concurrent lane its own client and transport::

    transport = AsyncKeepAliveTransport()
    client = AsyncCitadelClient(url, api_key, transport=transport)

Failures are httpx's own exceptions (``ConnectError``, ``ReadError``,
``WriteError``, ``ReadTimeout``, ``RemoteProtocolError``), so the client's
retry rules apply unchanged. A kept-alive connection that the server closed
while idle is noticed before a request is sent and replaced without a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import httpx

__all__ = ["AsyncKeepAliveTransport"]

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024


class AsyncKeepAliveTransport(httpx.AsyncBaseTransport):
    """One HTTP/1.1 connection, reused; requests must not overlap (one lane, one transport)."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._origin: tuple[str, str, int] | None = None
        self._busy = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request on a kept-alive connection (a new one if none is free)."""
        if self._busy:
            raise RuntimeError("AsyncKeepAliveTransport serves one request at a time")
        self._busy = True
        try:
            return await self._exchange(request)
        finally:
            self._busy = False

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        body = request.content  # the client always sends a complete body
        head = [f"{request.method} {url.raw_path.decode('ascii')} HTTP/1.1\r\n".encode()]
        head.extend(b"%s: %s\r\n" % (name, value) for name, value in request.headers.raw)
        if "content-length" not in request.headers:
            head.append(b"content-length: %d\r\n" % len(body))
        head.append(b"\r\n")
        reader, writer = await self._connection(origin, timeouts.get("connect"))
        try:
            writer.write(b"".join(head) + body)
            async with asyncio.timeout(timeouts.get("read")):
                status, headers = await self._read_head(reader)
                length = _content_length(headers)
                if length is None:
                    content = await _read_chunked(reader)
                else:
                    content = await reader.readexactly(length) if length else b""
        except TimeoutError:
            self._drop()
            raise httpx.ReadTimeout("Citadel did not answer in time.", request=request) from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self._drop()
            raise httpx.ReadError("The connection to Citadel broke.", request=request) from None
        except httpx.RemoteProtocolError:
            self._drop()
            raise
        if any(k == b"connection" and v.lower() == b"close" for k, v in headers):
            self._drop()
        return httpx.Response(status, headers=headers, content=content, request=request)

    async def _connection(
        self, origin: tuple[str, str, int], connect_s: float | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._stream is not None and (origin != self._origin or self._stale()):
            self._drop()
        if self._stream is None:
            scheme, host, port = origin
            context = None
            if scheme == "https":
                context = self._ssl_context or ssl.create_default_context()
            try:
                async with asyncio.timeout(connect_s):
                    self._stream = await asyncio.open_connection(
                        host, port, ssl=context, limit=MAX_HEAD_BYTES
                    )
            except TimeoutError:
                raise httpx.ConnectTimeout("Citadel could not be reached in time.") from None
            except OSError:
                raise httpx.ConnectError("Citadel could not be reached.") from None
            self._origin = origin
        return self._stream

    def _stale(self) -> bool:
        """The server closed the idle connection (or sent something unasked)."""
        assert self._stream is not None
        reader, writer = self._stream
        return reader.at_eof() or bool(reader._buffer) or writer.is_closing()  # type: ignore[attr-defined]

    async def _read_head(
        self, reader: asyncio.StreamReader
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError("Citadel's answer is not HTTP/1.1.")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx.RemoteProtocolError("Citadel's answer has a malformed header.")
            headers.append((name.strip().lower(), value.strip()))
        return int(parts[1]), headers

    def _drop(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
        self._stream = None

    async def aclose(self) -> None:
        """Close every kept-alive connection."""
        if self._stream is not None:
            writer = self._stream[1]
            self._stream = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body's length, or None for a chunked body (a proxy in between may chunk)."""
    for name, value in headers:
        if name == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise httpx.RemoteProtocolError("Citadel's answer has an unknown encoding.")
            return None
    values = {value for name, value in headers if name == b"content-length"}
    if len(values) != 1:
        raise httpx.RemoteProtocolError("Citadel's answer has no single Content-Length.")
    (value,) = values
    if not value.isdigit() or int(value) > MAX_BODY_BYTES:
        raise httpx.RemoteProtocolError("Citadel's answer has an unusable Content-Length.")
    return int(value)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = (await reader.readuntil(b"\r\n"))[:-2].split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise httpx.RemoteProtocolError("Citadel's answer has a malformed chunk.") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, ignored
                pass
            return bytes(body)
        if size < 0 or len(body) + size > MAX_BODY_BYTES:
            raise httpx.RemoteProtocolError("Citadel's answer is too large.")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise httpx.RemoteProtocolError("Citadel's answer has a malformed chunk.")
