"""Reading an operation's body within its size limit and ``CITADEL_READ_TIMEOUT_S``."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive

from citadel.errors import InvalidRequest, PayloadTooLarge, RequestTimeout


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """One operation's body limits: the single form's, and a batch's (read up to this)."""

    single: int
    batch: int


class ClientGone(InvalidRequest):
    """The connection ended (or the protocol refused the body) before the body arrived."""

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
        """Start the sweeping task (in the app's lifespan, on the serving loop)."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def aclose(self) -> None:
        """Stop the sweeping task."""
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
                    raise ClientGone()
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
