"""The transport a request's cycle writes to, so that closing after an answer can linger.

uvicorn closes the transport itself after a ``Connection: close`` answer;
closing with body bytes still unread makes the kernel reset the connection,
and a proxy still writing the body reports 502. Each cycle therefore writes
through this wrapper, whose ``close`` asks the protocol, which drains first
(:meth:`citadel.http.protocol.GuardedHttpToolsProtocol.close_after_response`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Lingering(Protocol):
    """What the wrapper needs of the protocol."""

    def close_after_response(self) -> None:
        """Close once the answer is out, after draining what is left of the body."""


class ResponseTransport:
    """The transport a request's cycle writes to; its ``close`` may linger first."""

    __slots__ = ("_protocol", "_transport", "is_closing", "write")

    def __init__(self, protocol: Lingering, transport: asyncio.Transport) -> None:
        self._protocol = protocol
        self._transport = transport
        # The connection's own methods, not wrappers: these run for every answer.
        self.write = transport.write
        self.is_closing = transport.is_closing

    def close(self) -> None:
        """Ask the protocol to close: at once, or after draining an unread body."""
        self._protocol.close_after_response()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
