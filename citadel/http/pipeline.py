"""The request pipeline of the four operations, from headers to the audited answer.

For ``/encrypt``, ``/decrypt``, ``/sign`` and ``/rewrap``, :class:`Pipeline`
runs these steps in this order, each a method named for it; the first to
raise decides the answer:

1. :meth:`~Pipeline.identify`: take the client's ``X-Request-ID`` or make one;
2. :meth:`~Pipeline.authenticate`: the caller from ``X-Internal-API-Key``
   (401 whatever the body; failures count against the client address); with
   ``CITADEL_TLS_CALLER_IDENTITIES``, the client certificate must name that
   caller too (:class:`citadel.tls.CallerBinding`);
3. :meth:`~Pipeline.check_headers`: repeated fields, ``X-User-ID`` (422);
4. :meth:`~Pipeline.limit`: the caller's and the user's rate limits (429);
5. :meth:`~Pipeline.authorize`: the ACL (403), then the method (405), before
   any of the body is read, so a caller without the operation learns nothing
   about how a body would have been handled;
6. :meth:`~Pipeline.read_body`: within its size limit (413) and
   ``CITADEL_READ_TIMEOUT_S`` (408);
7. :meth:`citadel.http.operations.Operations.prepare`: the whole body checked
   (422, 413), single form or batch, before anything is done;
8. :meth:`~Pipeline.limit_items`: a batch's other items against the same
   budgets (429, charged nothing when it does not fit);
9. :meth:`citadel.http.operations.Call.run`: the work, through the vault;
10. :meth:`~Pipeline.respond`: the audit line, one per item for a batch
    (fail-closed: 503 when it cannot be written), the metrics, then the answer.

Every other path goes to FastAPI (:class:`~citadel.http.other_paths.OtherPaths`).
The operations do not go through FastAPI's routing, request objects and
exception middleware: that machinery cost more than everything Citadel does
for a request (docs/performance.md), and the operations need none of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from citadel.audit import AuditLog
from citadel.errors import (
    AuditUnavailable,
    CitadelError,
    Forbidden,
    InternalError,
    PayloadTooLarge,
    Unauthenticated,
)
from citadel.http import refusals, request_ids
from citadel.http.addresses import ClientAddresses
from citadel.http.body import BodyDeadlines, BodyLimits, ClientGone
from citadel.http.errors import error_parts, post_only
from citadel.http.head import RequestHead
from citadel.http.operations import PATHS, Item, Operations, Outcome
from citadel.http.other_paths import OtherPaths
from citadel.logs import safe_exception_text
from citadel.metrics import Metrics
from citadel.pseudonyms import Pseudonymizer
from citadel.security import Authenticator
from citadel.tls import PEER_IDENTITIES, CallerBinding

if TYPE_CHECKING:
    from citadel.ratelimit import RateLimiter

log = structlog.get_logger("citadel")

# A batch body: a JSON object whose first key is "batch" (it can have no other).
_BATCH_START = re.compile(rb'\A[ \t\r\n]*\{[ \t\r\n]*"batch"')
_JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


@dataclass(slots=True)
class Request:
    """What the pipeline has learned about one request so far."""

    request_id: str
    operation: str
    caller: str | None = None
    user_pseudonym: str | None = None
    body_read: bool = False


@dataclass(slots=True)
class Answer:
    """What is sent, and what the audit line (or, for a batch, each item's line) says."""

    status: int
    payload: bytes
    code: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    audit: dict[str, Any] | None = None
    items: tuple[Item, ...] | None = None

    @classmethod
    def of_error(cls, err: CitadelError, audit: dict[str, Any] | None = None) -> Answer:
        """The contract's answer for ``err``, with the audit fields an operation already knew."""
        status, payload, headers = error_parts(err)
        return cls(status, payload, err.code, headers, audit)

    @classmethod
    def of_outcome(cls, outcome: Outcome) -> Answer:
        """A call's answer: the single form's body or error, or a batch's results (200)."""
        if outcome.batch:
            return cls(200, outcome.body(), "ok", items=outcome.items)
        item = outcome.items[0]
        if item.error is not None:
            return cls.of_error(item.error, item.audit)
        return cls(200, outcome.body(), "ok", audit=item.audit)


class Pipeline:
    """The ASGI app Citadel serves: the operations here, every other path to FastAPI."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        operations: Operations,
        authenticator: Authenticator,
        audit: AuditLog,
        metrics: Metrics,
        pseudonymize: Pseudonymizer,
        body_limits: dict[str, BodyLimits],
        deadlines: BodyDeadlines,
        limiter: RateLimiter | None = None,
        addresses: ClientAddresses | None = None,
        caller_binding: CallerBinding | None = None,
    ) -> None:
        self.app = app
        self.other_paths = OtherPaths(app)
        self.operations = operations
        self.auth = authenticator
        self.audit = audit
        self.metrics = metrics
        self.pseudonymize = pseudonymize
        self.body_limits = body_limits
        self.deadlines = deadlines
        self.limiter = limiter
        self.addresses = addresses or ClientAddresses()
        self.caller_binding = caller_binding
        self._request_counters: dict[tuple[str, str, str], Any] = {}
        self._item_counters: dict[tuple[str, str], Any] = {}
        self._durations = {op: metrics.duration.labels(op) for op in PATHS.values()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route: an operation's path to :meth:`serve`, anything else to FastAPI."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        operation = PATHS.get(scope["path"])
        if operation is None:
            await self.other_paths(scope, receive, send)
            return
        await self.serve(operation, scope, receive, send)

    async def serve(self, operation: str, scope: Scope, receive: Receive, send: Send) -> None:
        """The steps of the module's docstring, in order, for one operation's request."""
        start = perf_counter()
        head = RequestHead.read(scope["headers"])
        request = Request(self.identify(scope, head), operation)
        try:
            await self.authenticate(request, head, scope)
            self.check_headers(request, head)
            await self.limit(request)
            self.authorize(request, scope)
            body = await self.read_body(request, head, receive)
            call = self.operations.prepare(operation, body)
            if call.items > 1:
                await self.limit_items(request, call.items)
            answer = Answer.of_outcome(await call.run())
        except ClientGone as err:
            # A body the protocol refused mid-way: the client got the protocol's answer.
            answer = Answer.of_error(err)
            answer.code = scope.get(refusals.SCOPE_KEY, err.code)
        except CitadelError as err:
            answer = Answer.of_error(err)
        except Exception as exc:
            # A bug, never bad input: the type and the frames, never the message
            # (it can hold data) or the locals.
            log.error(
                "unhandled_error",
                error_type=type(exc).__name__,
                exception=safe_exception_text(exc),
                request_id=request.request_id,
            )
            answer = Answer.of_error(InternalError())
        await self.respond(send, request, answer, start)

    def identify(self, scope: Scope, head: RequestHead) -> str:
        """The request's id, kept in the scope so the protocol's own refusals carry it too."""
        return request_ids.for_scope(scope, head.request_ids).decode()

    async def authenticate(self, request: Request, head: RequestHead, scope: Scope) -> None:
        """The caller the API key belongs to; a repeated or unknown key is 401."""
        caller = None if head.repeated_key else self.auth.caller_for(head.api_key)
        binding = self.caller_binding
        if caller is not None and binding is not None:
            # A key alone is not enough: the certificate must name its caller.
            caller = caller if binding.binds(caller, scope.get(PEER_IDENTITIES)) else None
        if caller is None:
            if self.limiter is not None:
                client = scope.get("client")
                peer = client[0] if client else "unknown"
                address = self.addresses.of(peer, head.forwarded_for)
                await self.limiter.hit_auth_failure(address)
            raise Unauthenticated()
        request.caller = caller

    def check_headers(self, request: Request, head: RequestHead) -> None:
        """Fields sent more than once, and the end user's id, pseudonymised at once."""
        head.check_repeats()
        user = head.end_user()
        if user is not None:
            request.user_pseudonym = self.pseudonymize(user)

    async def limit(self, request: Request) -> None:
        """The caller's and the user's budgets, keyed by the pseudonym (no raw id reaches Redis)."""
        if self.limiter is not None:
            assert request.caller is not None
            await self.limiter.hit_caller(request.caller, request.user_pseudonym)

    async def limit_items(self, request: Request, items: int) -> None:
        """A batch's items beyond the first (charged by :meth:`limit`): all of them, or none.

        A batch that does not fit in what is left of a budget is refused whole,
        and the unit :meth:`limit` took for it is given back.
        """
        if self.limiter is not None:
            assert request.caller is not None
            await self.limiter.hit_caller(
                request.caller, request.user_pseudonym, cost=items - 1, already=1
            )

    def authorize(self, request: Request, scope: Scope) -> None:
        """The ACL, then the method: both before any of the body is read."""
        assert request.caller is not None
        if not self.auth.allowed(request.caller, request.operation):
            raise Forbidden()
        if scope["method"] != "POST":
            raise post_only()

    async def read_body(self, request: Request, head: RequestHead, receive: Receive) -> bytes:
        """The whole body, within the operation's size limit and the read deadline.

        The limit read to is a batch's; a body over the single form's limit must
        be a batch (a JSON object whose first key is ``batch``), else 413.
        """
        limits = self.body_limits[request.operation]
        head.check_length(limits.batch)
        body = await self.deadlines.read(receive, limits.batch)
        request.body_read = True
        if len(body) > limits.single and not _BATCH_START.match(body):
            raise PayloadTooLarge()
        return body

    async def respond(self, send: Send, request: Request, answer: Answer, start: float) -> None:
        """Audit, count, then send; a response whose audit line failed is never sent."""
        elapsed = perf_counter() - start
        common: dict[str, Any] = {
            "operation": request.operation,
            "requestor": request.caller,
            "user_id": request.user_pseudonym,
            "duration_ms": round(elapsed * 1000, 3),
            "request_id": request.request_id,
        }
        try:
            if answer.items is None:
                await self.audit.write(
                    common, success=answer.status < 400, code=answer.code, extra=answer.audit
                )
            else:
                await self.audit.write_batch(
                    common, [(item.code, item.audit) for item in answer.items]
                )
        except AuditUnavailable as err:
            log.error(
                "audit_write_failed", operation=request.operation, request_id=request.request_id
            )
            answer = Answer.of_error(err)
        self._count(request, answer.code, elapsed)
        if answer.items is not None:
            self._count_items(request, answer.items)
        headers = [
            *_JSON_HEADERS,
            (b"content-length", str(len(answer.payload)).encode()),
            (b"x-request-id", request.request_id.encode()),
            *answer.headers,
        ]
        if not request.body_read:
            # Answered before the body was read (401, 429, 405, 413, 408): the
            # rest of it may still be on its way, and the protocol drains it and
            # closes rather than read it as a request. Say so, or a keep-alive
            # client sends its next request into a closing socket.
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.payload})

    def _count_items(self, request: Request, items: tuple[Item, ...]) -> None:
        for item in items:
            labels = (request.operation, item.code)
            counter = self._item_counters.get(labels)
            if counter is None:
                counter = self._item_counters[labels] = self.metrics.batch_items.labels(*labels)
            counter.inc()

    def _count(self, request: Request, code: str, elapsed: float) -> None:
        labels = (request.operation, request.caller or "unknown", code)
        counter = self._request_counters.get(labels)
        if counter is None:
            counter = self._request_counters[labels] = self.metrics.requests.labels(*labels)
        counter.inc()
        self._durations[request.operation].observe(elapsed)
