"""Plain ASGI middleware for the request path: HTTP → security → limits → app → audit.

One layer does, in order, what every encrypt or decrypt request needs before
the body is parsed: take or make the request id, authenticate the caller from
``X-Internal-API-Key`` (401 whatever the body), check ``X-User-ID``, apply the
rate limits, and refuse a body over the size limit (413). It then writes the
audit event and the metrics when the response starts, and fails the request
with 503 if the audit line cannot be written.

It is plain ASGI rather than ``BaseHTTPMiddleware``, which would cost a task
and a copy of every response per request.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from citadel.audit import AuditLog, Pseudonymizer
from citadel.errors import (
    AuditUnavailable,
    CitadelError,
    InvalidRequest,
    PayloadTooLarge,
    Unauthenticated,
)
from citadel.http_errors import error_parts
from citadel.metrics import Metrics
from citadel.security import Authenticator

if TYPE_CHECKING:
    from citadel.ratelimit import RateLimiter

log = structlog.get_logger("citadel")

OPERATIONS = {"/encrypt": "encrypt", "/decrypt": "decrypt"}
REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
USER_ID = re.compile(rb"^[A-Za-z0-9_.:@-]{1,128}$")
_NO_STORE = (b"cache-control", b"no-store")


@dataclass(slots=True)
class RequestContext:
    """What the request path learns about one request; carried in ``scope["citadel"]``."""

    request_id: str
    operation: str | None
    caller: str | None = None
    user_pseudonym: str | None = None
    ct_fp: str | None = None
    code: str | None = None


class CitadelMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: Authenticator,
        audit: AuditLog,
        metrics: Metrics,
        pseudonymize: Pseudonymizer,
        body_limit: int,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.app = app
        self.auth = authenticator
        self.audit = audit
        self.metrics = metrics
        self.pseudonymize = pseudonymize
        self.body_limit = body_limit
        self.limiter = limiter
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
        api_key = user = length = None
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-internal-api-key":
                api_key = value
            elif name == b"x-user-id":
                user = value
            elif name == b"x-request-id":
                request_id = value
            elif name == b"content-length":
                length = value
        rid = (
            request_id.decode()
            if request_id is not None and REQUEST_ID.match(request_id)
            else self._new_request_id()
        )
        operation = OPERATIONS.get(scope["path"])
        ctx = RequestContext(rid, operation)
        scope["citadel"] = ctx
        rid_header = (b"x-request-id", rid.encode())
        if operation is None:

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), rid_header]
                await send(message)

            await self.app(scope, receive, send_with_id)
            return
        await self._operation(scope, receive, send, ctx, rid_header, api_key, user, length)

    async def _operation(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: RequestContext,
        rid_header: tuple[bytes, bytes],
        api_key: bytes | None,
        user: bytes | None,
        length: bytes | None,
    ) -> None:
        start = perf_counter()
        started = swallow = False

        async def audited_send(message: Message) -> None:
            nonlocal started, swallow
            if message["type"] == "http.response.start":
                started = True
                if self._record(ctx, message["status"], start):
                    message["headers"] = [*message.get("headers", ()), rid_header, _NO_STORE]
                    await send(message)
                else:
                    swallow = True
                    await self._send_error(send, AuditUnavailable(), rid_header)
            elif not swallow:
                await send(message)

        try:
            caller = self.auth.caller_for(api_key)
            if caller is None:
                if self.limiter is not None:
                    client = scope.get("client")
                    await self.limiter.hit_auth_failure(client[0] if client else "unknown")
                raise Unauthenticated()
            ctx.caller = caller
            if user is not None:
                if not USER_ID.match(user):
                    raise InvalidRequest("X-User-ID must be 1 to 128 of A-Za-z0-9_.:@-.")
                ctx.user_pseudonym = self.pseudonymize(user.decode())
            if self.limiter is not None:
                # Budgets are keyed by the pseudonym: no raw user id reaches Redis.
                await self.limiter.hit_caller(caller, ctx.user_pseudonym)
            if length is None:
                receive = await self._buffer_body(receive)
            elif not length.isdigit():
                raise InvalidRequest("Content-Length is not a number.")
            elif int(length) > self.body_limit:
                raise PayloadTooLarge()
        except CitadelError as err:
            ctx.code = err.code
            ok = self._record(ctx, err.status, start)
            await self._send_error(send, err if ok else AuditUnavailable(), rid_header)
            return

        try:
            await self.app(scope, receive, audited_send)
        except Exception as exc:
            # A bug, never bad input: log the type only (messages can hold data).
            log.error("unhandled_error", error_type=type(exc).__name__, request_id=ctx.request_id)
            if started:
                raise
            ctx.code = "internal_error"
            ok = self._record(ctx, 500, start)
            await self._send_error(send, CitadelError() if ok else AuditUnavailable(), rid_header)

    def _new_request_id(self) -> str:
        return f"{self._rid_prefix}{next(self._rid_counter):016x}"

    def _record(self, ctx: RequestContext, status: int, start: float) -> bool:
        """Audit and count one response; False when the audit line could not be written."""
        elapsed = perf_counter() - start
        operation = ctx.operation or ""
        if ctx.code is None:
            ctx.code = "ok" if status < 400 else "internal_error"
        try:
            self.audit.write(
                operation=operation,
                requestor=ctx.caller,
                user_id=ctx.user_pseudonym,
                success=status < 400,
                code=ctx.code,
                duration_ms=round(elapsed * 1000, 3),
                request_id=ctx.request_id,
                ct_fp=ctx.ct_fp,
            )
            ok = True
        except AuditUnavailable:
            log.error("audit_write_failed", operation=operation, request_id=ctx.request_id)
            ok = False
        code = ctx.code if ok else AuditUnavailable.code
        labels = (operation, ctx.caller or "unknown", code)
        counter = self._request_counters.get(labels)
        if counter is None:
            counter = self._request_counters[labels] = self._requests.labels(*labels)
        counter.inc()
        self._durations[operation].observe(elapsed)
        return ok

    async def _send_error(
        self, send: Send, err: CitadelError, rid_header: tuple[bytes, bytes]
    ) -> None:
        status, body, headers = error_parts(err)
        await send(
            {"type": "http.response.start", "status": status, "headers": [*headers, rid_header]}
        )
        await send({"type": "http.response.body", "body": body})

    async def _buffer_body(self, receive: Receive) -> Receive:
        """Read a body sent without Content-Length, refusing it once it passes the limit."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.body_limit:
                raise PayloadTooLarge()
            chunks.append(chunk)
            more = message.get("more_body", False)
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks)}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        return replay
