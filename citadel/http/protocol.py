"""The HTTP/1.1 protocol: uvicorn's httptools protocol with the guards that act while parsing.

uvicorn's httptools protocol accepts request headers of any size and takes
as long as the client likes to send them; its parser's cost grows
quadratically with a header sent in many pieces, so one client sending an
80 MB header stalled every other request. :class:`GuardedHttpToolsProtocol`:

- refuses a request whose head passes 64 KiB with 431, counted as the bytes
  arrive and before the parser sees them. The protocol finds where each head
  ends itself (its blank line) and where a ``Content-Length`` body ends, so
  every head is counted from its first byte, also when it arrives in the same
  read as the end of the request before it; a chunked body's framing and
  trailers count against the same 64 KiB;
- closes a connection whose head does not complete within the app's
  ``CITADEL_READ_TIMEOUT_S`` (counted from the connection for its first
  request, so that a connection sending nothing is not held either);
- ignores ``Upgrade`` (RFC 9110 7.8): Citadel serves no websockets or h2c
  (uvicorn's websocket protocol is off), and httptools, which skips the body
  of any request asking for an upgrade, gets the request again without it;
- after an answer sent before its request's body arrived (an early 401, 403,
  413), reads and drops the rest of that body, within 4 MiB and the read
  deadline, before it closes (a lingering close, as Apache and nginx do):
  closing with unread bytes makes the kernel reset the connection, and a proxy
  still writing the body then reports 502 instead of the answer;
- answers what it refuses itself (:mod:`citadel.http.refusals`) in JSON with
  a code and the request's ``X-Request-ID``.

Bodies are timed by the pipeline (:mod:`citadel.http.body`), which can audit
the 408. The private names of uvicorn this relies on are listed, and checked,
in ``tests/test_uvicorn_contract.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from citadel.http import framing, refusals, request_ids
from citadel.http.deadline import Deadline, head_deadline_s
from citadel.http.refusals import Refusal
from citadel.http.response_transport import ResponseTransport
from citadel.tls import PEER_IDENTITIES, peer_identities

MAX_HEADER_BYTES = 64 * 1024
# A chunk's size line and the CRLF after its data, as an honest client sends them.
CHUNK_LINE_BYTES = 32
# The most of an unread body drained after an early answer, before closing.
LINGER_BYTES = 4 * 1024 * 1024


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """httptools with a head limit and deadline, no upgrades, a lingering close, JSON refusals."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = head_deadline_s(self.app)
        # Bytes of the current request's head seen so far; None while its body is read.
        self._head_bytes: int | None = 0
        # The current head's deadline, and uvicorn's keep-alive one (moved, not rescheduled).
        self._head_deadline = Deadline(self.loop, self.header_timeout_s, self._head_late)
        self._idle = Deadline(self.loop, self.timeout_keep_alive, self.timeout_keep_alive_handler)
        # The last bytes of a head in progress, to find a blank line split across reads.
        self._carry = b""
        # While a body is read: what is left of a Content-Length body (None: chunked);
        # bytes received that were not body (chunk framing, extensions, trailers),
        # against what is allowed; body bytes and messages completed so far.
        self._body_left: int | None = None
        self._overhead = 0
        self._overhead_room = MAX_HEADER_BYTES
        self._body_seen = 0
        self._messages = 0
        # An upgrade request: its head rebuilt without the upgrade, to parse again.
        self._upgrading = False
        self._replaying = False
        self._replay: bytes | None = None
        # After an early answer: draining the rest of its body, then closing.
        self._lingering = False
        self._linger_left = 0
        self._linger_timer: asyncio.TimerHandle | None = None
        self._response_transport: ResponseTransport | None = None
        # A refusal of a pipelined head, sent once the answer before it is out.
        self._deferred: Refusal | None = None
        # Once anything is refused, nothing more of this connection is served.
        self._refused = False
        # Bytes of the head (then of the trailers) as the parser reported them.
        self._parsed = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the first head's deadline with the connection; wrap the cycles' transport."""
        super().connection_made(transport)
        # A TLS client certificate's names, for the pipeline's caller binding.
        self._tls_peer = peer_identities(transport)
        self._response_transport = ResponseTransport(self, transport)
        # The deadline of the first head runs from the connection, not its first
        # byte: a connection that never sends one must not be held forever.
        self._head_deadline.start()

    # -- reading ----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Cut the stream at heads and bodies, counting each head before the parser sees it."""
        self._unset_keepalive_if_required()
        if self._refused:
            return
        if self._lingering:
            self._linger_left -= len(data)
            if self._linger_left < 0:
                self.transport.close()
                return
        while data and not self.transport.is_closing():
            data = self._body_received(data) if self._head_bytes is None else self._head(data)

    def _head(self, data: bytes) -> bytes:
        """Feed head bytes up to the blank line that ends the head; the rest is returned."""
        if not self._head_deadline.running:
            self._head_deadline.start()
        end = framing.head_end(self._carry, data)
        piece = data if end < 0 else data[:end]
        self._head_bytes = (self._head_bytes or 0) + len(piece)
        if self._head_bytes > MAX_HEADER_BYTES:
            self._refuse(refusals.HEADERS_TOO_LARGE)
            return b""
        self._carry = (self._carry + piece[-3:])[-3:] if end < 0 else b""
        self._feed(piece)
        return data[len(piece) :]

    def _body_received(self, data: bytes) -> bytes:
        """Feed body bytes; a chunked body's framing and trailers count against 64 KiB.

        Trailers are parsed like header fields (a long one in many pieces costs
        the parser quadratic time), so they count against the same limit, with
        chunk size lines and extensions; each chunk is allowed its size line.
        A ``Content-Length`` body is fed exactly, so the next head is counted
        from its first byte. Where a chunked body ends inside a read, the next
        head starts charged with what the parser reported of it in that read.
        """
        if self._body_left is not None:
            piece = data if len(data) <= self._body_left else data[: self._body_left]
            self._feed(piece)
            return data[len(piece) :]
        messages, body_seen = self._messages, self._body_seen
        self._feed(data)
        not_body = len(data) - (self._body_seen - body_seen)
        if self._messages == messages:  # still this body
            self._overhead += not_body
            if self._overhead > self._overhead_room and not self.transport.is_closing():
                self._refuse(refusals.HEADERS_TOO_LARGE)
        elif self._head_bytes is not None:
            # Where the body ended inside this read is not known: the next head is
            # charged with what the parser reported of it (its url and fields).
            self._head_bytes = max(self._head_bytes, self._parsed)
            self._carry = data[-3:]
            if self._head_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._refuse(refusals.HEADERS_TOO_LARGE)
        return b""

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._parse_again(data[exc.args[0] :])
        except httptools.HttpParserError:
            self._refuse(refusals.BAD_REQUEST)

    def _parse_again(self, rest: bytes) -> None:
        """After httptools stopped at an upgrade: the same request without it, then ``rest``."""
        head, self._replay, self._upgrading = self._replay, None, False
        if head is None:  # CONNECT, or an upgrade again: nothing to serve
            self._refuse(refusals.BAD_REQUEST)
            return
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self._head_bytes = 0
        self._carry = b""
        # No larger than the head already counted; the body follows in rest.
        self._replaying = True
        try:
            self._feed(head)
        finally:
            self._replaying = False
        if rest and not self.transport.is_closing():
            self.data_received(rest)

    def _rebuilt_head(self) -> bytes | None:
        """This request's head without ``Upgrade``, to parse again; None for CONNECT or a replay."""
        method = self.parser.get_method()
        if method == b"CONNECT" or self._replaying:
            return None
        version = self.parser.get_http_version().encode()
        return framing.head_without_upgrade(method, self.url, version, self.headers)

    # -- parser callbacks -------------------------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        """Count body bytes (they end a Content-Length body) before uvicorn queues them."""
        if self._refused:
            return
        self._body_seen += len(body)
        if self._body_left is not None:
            self._body_left -= len(body)
        super().on_body(body)

    def on_chunk_header(self) -> None:
        """Allow each chunk its size line against the 64 KiB of framing."""
        self._overhead_room += CHUNK_LINE_BYTES

    def on_message_begin(self) -> None:
        """A new request: the parser's own count of its head starts again."""
        if self._refused:
            return
        self._parsed = 0
        super().on_message_begin()
        if self._tls_peer is not None:
            self.scope[PEER_IDENTITIES] = self._tls_peer  # type: ignore[literal-required]

    def on_url(self, url: bytes) -> None:
        """Count the target as parsed, then let uvicorn keep it."""
        if self._refused:
            return
        self._parsed += len(url)
        self.url += url  # uvicorn's on_url

    def on_header(self, name: bytes, value: bytes) -> None:
        # The fields as parsed are counted too: a head, or trailers, that came
        # whole within one read (after the end of the request before it) are
        # refused past 64 KiB like any other.
        """Count each field as parsed; keep a head's fields, drop a chunked body's trailers."""
        if self._refused:
            return
        self._parsed += len(name) + len(value) + 4
        if self._parsed > MAX_HEADER_BYTES:
            self._refuse(refusals.HEADERS_TOO_LARGE)
            return
        # After the head, the parser reports a chunked body's trailer fields here.
        # They are not headers (RFC 9110 6.5): merged into the request's headers,
        # a key or user id sent after the body would pass any proxy that checks
        # the headers. They are dropped.
        if self._head_bytes is not None:
            # uvicorn's on_header, inline: it runs for every field of every request.
            name = name.lower()
            if name == b"expect" and value.lower() == b"100-continue":
                self.expect_100_continue = True
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        """The head is whole: stop its deadline; start the request (or parse an upgrade again)."""
        self._head_deadline.stop()
        if self._refused:
            return
        if self.parser.should_upgrade():
            # httptools skips the body of an upgrade request and stops after its
            # head; _feed parses the head again without the upgrade.
            self._upgrading = True
            self._replay = self._rebuilt_head()
            self._head_bytes = 0
            return
        self._head_bytes = None
        self._parsed = 0  # from here on, of the trailers
        self._overhead = 0
        self._overhead_room = MAX_HEADER_BYTES
        self._body_left = framing.content_length(self.headers)
        super().on_headers_complete()
        self.cycle.transport = self._response_transport  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        """The request is whole: the next bytes start a new head (or, lingering, it closes)."""
        if self._upgrading or self._refused:
            return  # the end of an upgrade request without its body: it is parsed again
        super().on_message_complete()
        self._messages += 1
        self._head_bytes = 0  # the next bytes on this connection start a new request
        self._parsed = 0
        self._body_left = None
        if self._lingering:
            self.transport.close()

    # -- answering --------------------------------------------------------------------------------

    def close_after_response(self) -> None:
        """Close once the answer is out: at once, or after draining the rest of the body.

        An answer sent before its request's body arrived (an early 401, a 413)
        leaves the rest of that body on its way. Closing now would reset the
        connection, and a proxy still writing the body reports a 502 instead
        of the answer; so the rest is read and dropped (never served as a
        request) until the body ends, 4 MiB pass or the read deadline, then closed.
        """
        if self._head_bytes is not None or self.transport.is_closing():
            self.transport.close()
            return
        left = LINGER_BYTES if self._body_left is None else self._body_left
        if left > LINGER_BYTES:
            self.transport.close()
            return
        self._lingering = True
        self._linger_left = LINGER_BYTES
        self._linger_timer = self.loop.call_later(self.header_timeout_s, self.transport.close)
        # uvicorn stops reading a body the app does not read; the drain must go on.
        self.flow.resume_reading()

    def on_response_complete(self) -> None:
        """After an answer: a deferred refusal, or drain an unread body, or go on as uvicorn."""
        if self._deferred is not None and not self.pipeline:
            self.server_state.total_requests += 1
            self._write_refusal(self._deferred, None)
            return
        if self._lingering or self.transport.is_closing():
            self.server_state.total_requests += 1
            return
        if self._head_bytes is None and self.cycle is not None and not self.pipeline:
            # A keep-alive answer (FastAPI's 405, say) sent before the body arrived:
            # the rest of that body must not be read as the next request.
            self.close_after_response()
            self.server_state.total_requests += 1
            return
        self._next_request()

    def _next_request(self) -> None:
        # uvicorn's on_response_complete, but for its keep-alive timer: the idle
        # deadline is moved rather than a new timer made (tests/test_uvicorn_contract.py
        # fails if uvicorn's method changes).
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._idle.stop()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle.start()

    def _unset_keepalive_if_required(self) -> None:
        """Data arrived, or a cycle ended: the connection is not idle (its deadline stops)."""
        self._idle.stop()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's plain-text 400, replaced by Citadel's JSON refusal."""
        self._refuse(refusals.BAD_REQUEST)

    def _unsupported_upgrade_warning(self) -> None:
        """Never reached (upgrades are parsed again); nothing of a request is ever logged."""

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop this connection's timers, then let uvicorn end its cycles."""
        self._head_deadline.close()
        self._idle.close()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def _head_late(self) -> None:
        if self._head_bytes is not None and not self.transport.is_closing():
            self._refuse(refusals.HEAD_TIMEOUT)

    def _refuse(self, refusal: Refusal) -> None:
        """Answer ``refusal`` and close: now, or after the answer the client awaits first."""
        self._head_deadline.close()
        if self.transport.is_closing() or self._refused:
            return
        self._refused = True
        cycle = self.cycle
        if self._head_bytes is None and self.pipeline and self.pipeline[0][0] is cycle:
            # The refused request waits behind one still being answered: it is
            # never started, and its refusal follows the answers before it.
            self.pipeline.popleft()
            self._deferred = refusal
            self.flow.pause_reading()
            return
        if cycle is not None and not cycle.response_complete:
            if self._head_bytes is not None:
                # A head after a request still being answered (pipelined): the
                # refusal follows that answer, and nothing more is read.
                self._deferred = refusal
                self.flow.pause_reading()
                return
            if cycle.response_started:
                # The app's answer is on its way: nothing more can be said on this connection.
                self.transport.close()
                return
            # This request's body (its framing, its trailers) is refused: the app,
            # still reading it, audits the code the client got, under the id it gets.
            cycle.scope[refusals.SCOPE_KEY] = refusal.code  # type: ignore[literal-required]
            # The app reading the body learns it will not come (and audits the refusal),
            # even when it gets to run before the connection is gone.
            cycle.disconnected = True
            cycle.message_event.set()
            self._write_refusal(refusal, request_ids.for_scope(cycle.scope))
            return
        self._write_refusal(refusal, None)

    def _write_refusal(self, refusal: Refusal, request_id: bytes | None) -> None:
        self.transport.write(refusal.bytes_with(request_id or request_ids.new_request_id()))
        self.transport.close()
