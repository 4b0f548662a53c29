"""Where log lines go: standard output without blocking the event loop, or a stream.

The audit log and the operational logs share one sink per process, so that
their lines never interleave. A sink offers two writes: :meth:`FdSink.write`
for audit lines (waits a bounded time, then fails closed) and
:meth:`FdSink.try_write` for operational lines (never waits, drops instead).
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
from typing import IO

from citadel.errors import AuditUnavailable

# The contract's 503 always carries Retry-After; a sink recovers when its reader
# does, so the caller is told to try again soon.
AUDIT_RETRY_AFTER_S = 1


def _unavailable() -> AuditUnavailable:
    return AuditUnavailable(retry_after=AUDIT_RETRY_AFTER_S)


class FdSink:
    """A file descriptor (standard output) written without ever blocking the event loop.

    The audit line must be written before the response, but a stalled reader
    (a log shipper that stopped reading a pipe) must not stall the process:
    every write first asks ``poll(0)`` whether the descriptor can take data
    now. Audit lines wait for room at most ``timeout_s``, then fail (the
    request gets 503); once a wait has timed out, later audit lines fail at
    once until the descriptor drains, so nothing queues behind a stalled
    sink. Operational log lines never wait: they are dropped (and counted)
    when there is no room. A line cut short by a partial write is finished
    before any other byte, so lines never interleave.

    Small writes to a pipe are atomic (``PIPE_BUF``), which also keeps the
    lines of several worker processes sharing one pipe whole.
    """

    def __init__(self, fd: int = 1, timeout_s: float = 1.0) -> None:
        self._fd = fd
        self._timeout = timeout_s
        self._poll = select.poll()
        self._poll.register(fd, select.POLLOUT)
        self._pending = b""
        self._stalled = False
        self._broken = False
        self._lock = threading.Lock()
        self._waiters: list[asyncio.Future[None]] = []
        self._watching: asyncio.AbstractEventLoop | None = None
        self.dropped = 0

    def _state(self) -> int:
        events = self._poll.poll(0)
        return events[0][1] if events else 0

    def _room(self) -> bool:
        state = self._state()
        if state & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            self._broken = True
            return False
        return bool(state & select.POLLOUT)

    def _put(self, data: bytes) -> bool:
        """Write ``data`` after any pending tail; True when all of it is out. Lock held."""
        if self._pending:
            self._pending = self._pending[os.write(self._fd, self._pending) :]
            if self._pending:
                self._pending += data
                return False
        n = os.write(self._fd, data) if data else 0
        if n < len(data):
            self._pending = data[n:]
            return False
        return True

    def try_write(self, data: bytes) -> bool:
        """Best effort, for operational logs: write now or drop; never raises, never waits."""
        with self._lock:
            try:
                if self._room() and (not self._pending or self._put(b"")):
                    self._put(data)
                    return True
            except OSError:
                self._broken = True
            self.dropped += 1
            return False

    async def write(self, data: bytes) -> None:
        """Write one whole line, waiting at most ``timeout_s``; ``AuditUnavailable`` otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        to_write = data
        while True:
            with self._lock:
                try:
                    if self._room():
                        if self._put(to_write):
                            self._stalled = self._broken = False
                            return
                        to_write = b""  # handed over; only the pending tail remains
                    elif self._broken or self._stalled:
                        raise _unavailable()
                except OSError:
                    self._broken = True
                    raise _unavailable() from None
            left = deadline - loop.time()
            if left <= 0 or not await self._wait_for_room(loop, left):
                self._stalled = True
                raise _unavailable()

    async def _wait_for_room(self, loop: asyncio.AbstractEventLoop, seconds: float) -> bool:
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if self._watching is None:
            try:
                loop.add_writer(self._fd, self._on_room)
            except (OSError, ValueError):
                return False  # cannot be watched: treat as stalled
            self._watching = loop
        try:
            await asyncio.wait_for(waiter, seconds)
            return True
        except TimeoutError:
            return False
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _on_room(self) -> None:
        if self._watching is not None:
            self._watching.remove_writer(self._fd)
            self._watching = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def healthy(self) -> bool:
        """False while the descriptor is closed or errored, or after a stalled audit write."""
        with self._lock:
            if self._stalled and self._room():
                self._stalled = False
            else:
                self._room()
            return not (self._broken or self._stalled)


class StreamSink:
    """A binary stream (tests, embedding); writes are synchronous.

    For a stream the caller owns, such as a buffer a test reads back; it has
    no descriptor to poll, so it cannot guard against a stalled reader.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._ok = True

    def try_write(self, data: bytes) -> bool:
        """Best effort, for operational logs: False instead of raising when the stream fails."""
        try:
            self._put(data)
            return True
        except (OSError, ValueError):
            return False

    async def write(self, data: bytes) -> None:
        """Write one whole line; ``AuditUnavailable`` when the stream fails, as for a descriptor."""
        try:
            self._put(data)
        except (OSError, ValueError):
            self._ok = False
            raise _unavailable() from None
        self._ok = True

    def _put(self, data: bytes) -> None:
        with self._lock:
            self._stream.write(data)
            self._stream.flush()

    def healthy(self) -> bool:
        """False after a failed audit write, until one succeeds: what ``/ready`` reports."""
        return self._ok


Sink = FdSink | StreamSink
# One FdSink per process: two on one descriptor would each finish its own
# partial line and interleave the other's.
_STDOUT: list[FdSink] = []


def stdout_sink() -> FdSink:
    """The process's one sink on standard output, shared by audit and operational logs."""
    if not _STDOUT:
        _STDOUT.append(FdSink(1))
    return _STDOUT[0]
