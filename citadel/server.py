"""The HTTP server: uvicorn's settings and the guards that must act while parsing.

uvicorn's httptools protocol accepts request headers of any size and takes
as long as the client likes to send them; its parser's cost grows
quadratically with a header sent in many pieces, so one client sending an
80 MB header stalled every other request. :class:`GuardedHttpToolsProtocol`
refuses a request whose headers pass 64 KiB with 431, counted as the bytes
arrive and before the parser sees them (a chunked body's framing and
trailers too), and closes a connection whose headers do not complete within
``CITADEL_READ_TIMEOUT_S`` (counted from the connection for its first
request, so that a connection sending nothing is not held either). Bodies are timed
by the request path (:mod:`citadel.middleware`), which can audit the 408.

uvicorn's own ``X-Forwarded-For`` handling is off: it trusts 127.0.0.1 by
default, so a sidecar passing the header through would let any client pick
its address. Citadel reads the header itself, from ``CITADEL_TRUSTED_PROXIES``
only.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 64 * 1024
# A chunk's size line and the CRLF after its data, as an honest client sends them.
CHUNK_LINE_BYTES = 32


# Set in a request's scope when the protocol answers it itself while the app
# is still reading its body, so the audit line names the code the client got.
REFUSED = "citadel.refused"


def _refusal(status: int, reason: bytes, code: str, detail: str) -> tuple[str, bytes]:
    body = orjson.dumps({"detail": detail, "code": code})
    return code, b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"cache-control: no-store\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
    )


_TOO_LARGE = _refusal(
    431,
    b"Request Header Fields Too Large",
    "headers_too_large",
    "The request headers are over 64 KiB.",
)
_BAD_REQUEST = _refusal(400, b"Bad Request", "bad_request", "The request is not valid HTTP/1.1.")
_TIMEOUT = _refusal(
    408, b"Request Timeout", "request_timeout", "The request headers did not arrive in time."
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """httptools with a header size limit, a header deadline and JSON refusals."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Bytes of the current request's head seen so far; None while its body is read.
        self._head_bytes: int | None = 0
        self._head_timer: asyncio.TimerHandle | None = None
        # While a body is read: bytes received that were not body (chunk framing,
        # extensions, trailers), against what is allowed; messages completed so far.
        self._overhead = 0
        self._overhead_room = MAX_HEADER_BYTES
        self._messages = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # The deadline of the first head runs from the connection, not its first
        # byte: a connection that never sends one must not be held forever.
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is None:
            self._body_received(data)
            return
        while self._head_bytes is not None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)
            room = MAX_HEADER_BYTES - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                break
            if room <= 0:
                self._refuse(_TOO_LARGE)
                return
            # Feed only what fits. If the head ends inside it, the rest is body
            # (or, pipelined, the next request, whose head is counted afresh).
            self._head_bytes = MAX_HEADER_BYTES
            super().data_received(data[:room])
            if self.transport.is_closing():
                return
            if self._head_bytes == MAX_HEADER_BYTES:  # the same head, and more of it
                self._refuse(_TOO_LARGE)
                return
            data = data[room:]
        super().data_received(data)

    def _body_received(self, data: bytes) -> None:
        """Feed body bytes; refuse a chunked body whose framing and trailers pass 64 KiB.

        Trailers are parsed like header fields (a long one in many pieces costs
        the parser quadratic time), so they count against the same limit, with
        chunk size lines and extensions; each chunk is allowed its size line.
        """
        messages = self._messages
        super().data_received(data)
        if self._head_bytes is None and self._messages == messages:  # still this body
            self._overhead = max(0, self._overhead + len(data))
            if self._overhead > self._overhead_room and not self.transport.is_closing():
                self._refuse(_TOO_LARGE)

    def on_body(self, body: bytes) -> None:
        self._overhead -= len(body)
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._overhead_room += CHUNK_LINE_BYTES

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head, the parser reports a chunked body's trailer fields here.
        # They are not headers (RFC 9110 6.5): merged into the request's headers,
        # a key or user id sent after the body would pass any proxy that checks
        # the headers. They are dropped.
        if self._head_bytes is not None:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._overhead = 0
        self._overhead_room = MAX_HEADER_BYTES
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._messages += 1
        self._head_bytes = 0  # the next bytes on this connection start a new request

    def on_response_complete(self) -> None:
        # A response sent before its request's body arrived (an early 401, a
        # 413): the rest of that body must not be read as the next request,
        # nor may a client trickling it hold the connection.
        if self.cycle is not None and self.cycle.more_body and not self.pipeline:
            self.transport.close()
            return
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(_BAD_REQUEST)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._head_bytes is not None and not self.transport.is_closing():
            self._refuse(_TIMEOUT)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, refusal: tuple[str, bytes]) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            code, response = refusal
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.scope[REFUSED] = code  # type: ignore[literal-required]
            self.transport.write(response)
            self.transport.close()


def protocol_for(header_timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with this instance's header deadline."""
    return type(
        "CitadelHttpProtocol", (GuardedHttpToolsProtocol,), {"header_timeout_s": header_timeout_s}
    )


def uvicorn_options(header_timeout_s: float) -> dict[str, Any]:
    """The uvicorn settings every Citadel server runs with (``citadel serve`` and the tests)."""
    return {
        "http": protocol_for(header_timeout_s),
        "proxy_headers": False,
        "server_header": False,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
