"""The request path of the operations: HTTP → security → limits → body → handler → audit.

For ``/encrypt``, ``/decrypt``, ``/sign`` and ``/rewrap`` this plain ASGI
layer does everything, in order: take or make the request id, authenticate
the caller from ``X-Internal-API-Key`` (401 whatever the body), check
``X-User-ID``, apply the rate limits, check the ACL (403), read the body within its size limit
(413) and ``CITADEL_READ_TIMEOUT_S`` (408), call the operation's handler,
then write the audit event and the metrics and send the response, or 503 if
the audit line cannot be written. Every other path goes on to FastAPI
(``/health``, ``/ready``, ``/metrics``, the docs, 404 and 405).

The operations do not go through FastAPI's routing, request objects and
exception middleware: that machinery cost more than everything Citadel does
for a request (see docs/performance.md), and the operations need none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from citadel.audit import AuditLog
from citadel.errors import (
    AuditUnavailable,
    CitadelError,
    Forbidden,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    Unauthenticated,
)
from citadel.http_errors import MethodNotAllowed, error_parts
from citadel.logs import safe_exception_text
from citadel.metrics import Metrics
from citadel.pseudonyms import Pseudonymizer
from citadel.security import Authenticator
from citadel.server import REFUSED, VALID_REQUEST_ID
from citadel.server import REQUEST_ID as REQUEST_ID_KEY

if TYPE_CHECKING:
    from citadel.config import Network
    from citadel.ratelimit import RateLimiter

log = structlog.get_logger("citadel")

OPERATIONS = {"/encrypt": "encrypt", "/decrypt": "decrypt", "/sign": "sign", "/rewrap": "rewrap"}
REQUEST_ID = VALID_REQUEST_ID
USER_ID = re.compile(rb"^[A-Za-z0-9_.:@-]{1,128}$")
_OWS = b" \t"
_JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]

Handler = Callable[["RequestContext", bytes], Awaitable[bytes]]


@dataclass(slots=True)
class RequestContext:
    """What the request path learns about one request; handlers fill in the audit fields."""

    request_id: str
    operation: str
    caller: str | None = None
    user_pseudonym: str | None = None
    ct_fp: str | None = None
    code: str | None = None
    extra: dict[str, str] | None = None


class _ClientGone(InvalidRequest):
    default_detail = "The client closed the connection before the body arrived."


class BodyDeadlines:
    """``CITADEL_READ_TIMEOUT_S`` for request bodies, one timer for all requests.

    A timer per request (``asyncio.timeout``) costs more than the rest of a
    small request's body handling; here a request reading its body registers
    its task and deadline in a dict, and one task sweeps it twice a second,
    cancelling the reads that ran over. A body therefore times out between
    ``timeout_s`` and ``timeout_s + 0.5`` seconds after its headers.
    """

    SWEEP_S = 0.5

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._reading: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.SWEEP_S)
            now = loop.time()
            for task, deadline in list(self._reading.items()):
                if deadline <= now:
                    del self._reading[task]
                    self._expired.add(task)
                    task.cancel()

    async def read(self, receive: Receive, limit: int) -> bytes:
        """The whole body; 413 past ``limit`` bytes, 408 past the deadline."""
        task = asyncio.current_task()
        assert task is not None
        self._reading[task] = asyncio.get_running_loop().time() + self.timeout_s
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise _ClientGone()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge()
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            task.uncancel()
            raise RequestTimeout() from None
        finally:
            self._reading.pop(task, None)


class CitadelMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: Authenticator,
        audit: AuditLog,
        metrics: Metrics,
        pseudonymize: Pseudonymizer,
        handlers: dict[str, Handler],
        body_limits: dict[str, int],
        deadlines: BodyDeadlines,
        limiter: RateLimiter | None = None,
        trusted_proxies: Sequence[Network] = (),
    ) -> None:
        self.app = app
        self.auth = authenticator
        self.audit = audit
        self.metrics = metrics
        self.pseudonymize = pseudonymize
        self.handlers = handlers
        self.body_limits = body_limits
        self.deadlines = deadlines
        self.limiter = limiter
        self.trusted_proxies = tuple(trusted_proxies)
        self._requests = metrics.requests
        self._request_counters: dict[tuple[str, str, str], Any] = {}
        # Request ids need to be unique, not secret: a random per-process prefix
        # and a counter cost far less than a getrandom() call per request.
        self._rid_prefix = os.urandom(8).hex()
        self._rid_counter = itertools.count(1)
        self._durations = {op: metrics.duration.labels(op) for op in OPERATIONS.values()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        operation = OPERATIONS.get(scope["path"])
        if operation is None:
            await self._pass_on(scope, receive, send)
            return
        start = perf_counter()
        api_key = user = request_id = length = forwarded = None
        repeated_key = repeated_user = repeated_rid = False
        for name, value in scope["headers"]:
            if name == b"x-internal-api-key":
                repeated_key = api_key is not None
                api_key = value
            elif name == b"x-user-id":
                repeated_user = repeated_user or user is not None
                user = value
            elif name == b"x-request-id":
                repeated_rid = repeated_rid or request_id is not None
                request_id = value
            elif name == b"content-length":
                length = value if length is None else b"repeated"
            elif name == b"x-forwarded-for":
                forwarded = value if forwarded is None else forwarded + b"," + value
        if request_id is not None:
            request_id = request_id.strip(_OWS)
        chosen = scope.get(REQUEST_ID_KEY)  # by the protocol, when it refused the body already
        ctx = RequestContext(
            chosen.decode()
            if chosen is not None
            else request_id.decode()
            if request_id is not None and not repeated_rid and REQUEST_ID.match(request_id)
            else self._new_request_id(),
            operation,
        )
        # The protocol's own refusals of this request (a 431 trailer) carry the same id.
        scope[REQUEST_ID_KEY] = ctx.request_id.encode()
        status = 200
        extra_headers: list[tuple[bytes, bytes]] = []
        body_read = False
        try:
            caller = None if repeated_key else self.auth.caller_for(_strip(api_key))
            if caller is None:
                if self.limiter is not None:
                    await self.limiter.hit_auth_failure(self._client_address(scope, forwarded))
                raise Unauthenticated()
            ctx.caller = caller
            if repeated_user or repeated_rid:
                raise InvalidRequest("X-User-ID and X-Request-ID may each be sent once.")
            if user is not None:
                user = user.strip(_OWS)
                if not USER_ID.match(user):
                    raise InvalidRequest("X-User-ID must be 1 to 128 of A-Za-z0-9_.:@-.")
                ctx.user_pseudonym = self.pseudonymize(user.decode())
            if self.limiter is not None:
                # Budgets are keyed by the pseudonym: no raw user id reaches Redis.
                await self.limiter.hit_caller(caller, ctx.user_pseudonym)
            # Before the body is read: a caller without the operation learns
            # nothing about how a body would have been handled.
            if not self.auth.allowed(caller, operation):
                raise Forbidden()
            if scope["method"] != "POST":
                raise MethodNotAllowed()
            limit = self.body_limits[operation]
            if length is not None:
                _check_length(length, limit)
            body = await self.deadlines.read(receive, limit)
            body_read = True
            payload = await self.handlers[operation](ctx, body)
            ctx.code = "ok"
        except CitadelError as err:
            # A body the HTTP parser refused mid-way: the client got the parser's answer.
            ctx.code = scope.get(REFUSED, err.code) if isinstance(err, _ClientGone) else err.code
            status, payload, extra_headers = error_parts(err)
        except Exception as exc:
            # A bug, never bad input: the type and the frames, never the message
            # (it can hold data) or the locals.
            log.error(
                "unhandled_error",
                error_type=type(exc).__name__,
                exception=safe_exception_text(exc),
                request_id=ctx.request_id,
            )
            internal = CitadelError()
            ctx.code = internal.code
            status, payload, extra_headers = error_parts(internal)
        await self._respond(send, ctx, status, payload, extra_headers, start, close=not body_read)

    async def _respond(
        self,
        send: Send,
        ctx: RequestContext,
        status: int,
        payload: bytes,
        extra_headers: list[tuple[bytes, bytes]],
        start: float,
        *,
        close: bool,
    ) -> None:
        """Audit, count, then send; a response whose audit line failed is never sent."""
        elapsed = perf_counter() - start
        assert ctx.code is not None
        try:
            await self.audit.write(
                operation=ctx.operation,
                requestor=ctx.caller,
                user_id=ctx.user_pseudonym,
                success=status < 400,
                code=ctx.code,
                duration_ms=round(elapsed * 1000, 3),
                request_id=ctx.request_id,
                ct_fp=ctx.ct_fp,
                extra=ctx.extra,
            )
        except AuditUnavailable as err:
            log.error("audit_write_failed", operation=ctx.operation, request_id=ctx.request_id)
            ctx.code = err.code
            status, payload, extra_headers = error_parts(err)
        self._count(ctx, elapsed)
        if close:
            # Answered before the body was read (401, 429, 405, 413, 408, or a 503 of
            # the audit): the rest of it may still be on its way, and the server
            # drains it and closes rather than read it as a request. Say so, or a
            # keep-alive client sends its next request into a closing socket.
            extra_headers.append((b"connection", b"close"))
        headers = [
            *_JSON_HEADERS,
            (b"content-length", str(len(payload)).encode()),
            (b"x-request-id", ctx.request_id.encode()),
            *extra_headers,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _count(self, ctx: RequestContext, elapsed: float) -> None:
        labels = (ctx.operation, ctx.caller or "unknown", ctx.code or "internal_error")
        counter = self._request_counters.get(labels)
        if counter is None:
            counter = self._request_counters[labels] = self._requests.labels(*labels)
        counter.inc()
        self._durations[ctx.operation].observe(elapsed)

    async def _pass_on(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Any other path: FastAPI answers; Citadel adds the request id, and says when it closes.

        An answer sent before the request's body arrived (FastAPI's 405 to a
        ``POST /health`` with a body) says ``Connection: close``: the server
        drains that body and closes, as after an operation's early answer.
        """
        request_id = None
        body_unread = False
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = None if request_id is not None else value.strip(_OWS)
            elif name == b"transfer-encoding" or (
                name == b"content-length" and value.strip(_OWS).strip(b"0")
            ):
                body_unread = True
        rid = (
            request_id
            if request_id is not None and REQUEST_ID.match(request_id)
            else self._new_request_id().encode()
        )
        scope[REQUEST_ID_KEY] = rid

        async def receive_body() -> Message:
            nonlocal body_unread
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_unread = False
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-request-id", rid)]
                if body_unread:
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive_body if body_unread else receive, send_with_id)

    def _new_request_id(self) -> str:
        return f"{self._rid_prefix}{next(self._rid_counter):016x}"

    def _client_address(self, scope: Scope, forwarded: bytes | None) -> str:
        """The address the auth-failure budget is counted for.

        ``X-Forwarded-For`` is believed only from ``CITADEL_TRUSTED_PROXIES``,
        and only up to the first hop that is not itself a trusted proxy, read
        from the right: anything further left was written by the client.
        """
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if forwarded is None or not self.trusted_proxies or not self._trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop if _is_address(hop) else peer
        return peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)


def _strip(value: bytes | None) -> bytes | None:
    return value.strip(_OWS) if value is not None else None


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_length(length: bytes, limit: int) -> None:
    """Content-Length against the limit, before the body is read; digits only."""
    length = length.strip(_OWS)
    if not length.isdigit():
        raise InvalidRequest("Content-Length is not one decimal number.")
    digits = length.lstrip(b"0")
    # Compare lengths first: int() of thousands of digits is slow, then refused.
    if len(digits) > len(str(limit)) or int(digits or b"0") > limit:
        raise PayloadTooLarge()
