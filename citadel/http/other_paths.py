"""Every path that is not an operation: FastAPI answers; Citadel adds the request id.

``/health``, ``/ready``, ``/metrics``, the docs, and FastAPI's 404 and 405.
An answer sent before the request's body arrived (FastAPI's 405 to a
``POST /health`` with a body) says ``Connection: close``: the protocol drains
that body and closes, as after an operation's early answer, and a keep-alive
client must not send its next request into the closing socket.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from citadel.http import request_ids

_OWS = b" \t"


class OtherPaths:
    """The FastAPI app behind the pipeline, with Citadel's request id and close rule."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve ``scope`` with FastAPI; its answer carries the request's id."""
        body_unread = any(
            name == b"transfer-encoding"
            or (name == b"content-length" and value.strip(_OWS).strip(b"0"))
            for name, value in scope["headers"]
        )
        rid = request_ids.for_scope(scope)

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
