"""What the run is doing, on standard error: lines done, their rate, and what it waits for.

On a terminal one status line is redrawn twice a second, so it never looks frozen:
while the clients wait out a ``429`` (its ``Retry-After``) or a ``503``, the line
says so and counts down. In a pipe or a log a line is written every 30 seconds,
and one when a wait starts (at most one every 10 seconds), so a log shows why a
run stalled. The counts are lines, not bytes: what the rejects file and
``--resume`` speak of.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import IO, Final

from citadel_client.errors import (
    AuditUnavailable,
    CitadelConnectionError,
    CitadelError,
    ProviderUnavailable,
    RateLimited,
)

REDRAW_S: Final = 0.5
LOG_EVERY_S: Final = 30.0
WAIT_NOTICE_EVERY_S: Final = 10.0
_CHUNK: Final = 1 << 20


def count_lines(source: IO[bytes]) -> int:
    """Lines of a seekable input from its current position (a last line without a newline
    counts), read in 1 MiB pieces so that memory stays flat; the position is restored."""
    start = source.tell()
    count, last = 0, b"\n"
    while chunk := source.read(_CHUNK):
        count += chunk.count(b"\n")
        last = chunk[-1:]
    source.seek(start)
    return count + (last != b"\n")


def waiting_for(err: CitadelError) -> str:
    """Why a call waits before its next attempt, in words an operator can act on."""
    after = f", Retry-After {err.retry_after} s" if err.retry_after is not None else ""
    if isinstance(err, RateLimited):
        return f"rate limited (429{after})"
    if isinstance(err, AuditUnavailable):
        return f"Citadel's audit log is unavailable (503{after})"
    if isinstance(err, ProviderUnavailable):
        return f"the provider is unavailable (503{after})"
    if isinstance(err, CitadelConnectionError):
        return err.detail.rstrip(".")  # "Citadel could not be reached (ConnectError)"
    return f"{err.code} ({err.status})"


class Progress:
    """The run's status line; ``waiting`` is the clients' ``on_retry`` hook."""

    def __init__(
        self,
        err: IO[str],
        name: str,
        done: Callable[[], int],
        rejected: Callable[[], int],
        *,
        total: int | None,
        terminal: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._err = err
        self._name = name
        self._done = done
        self._rejected = rejected
        self._total = total
        self._terminal = terminal
        self._clock = clock
        self._started = clock()
        self._first = done()
        self._wait_until = 0.0
        self._wait_reason = ""
        self._noticed_at: float | None = None
        self._noticed_reason = ""
        self._logged_at = self._started
        self._width = 0
        self._closed = False

    def waiting(self, err: CitadelError, seconds: float) -> None:
        """A call waits ``seconds`` before retrying after ``err``: show it, count it down."""
        now = self._clock()
        if now + seconds >= self._wait_until:
            self._wait_until, self._wait_reason = now + seconds, waiting_for(err)
        if self._terminal:
            self.draw()
            return
        reason = waiting_for(err)
        recent = self._noticed_at is not None and now - self._noticed_at < WAIT_NOTICE_EVERY_S
        if recent and reason == self._noticed_reason:
            return
        self._noticed_at, self._noticed_reason = now, reason
        self._write_line(f"waiting {_seconds(seconds)}: {reason}; {self._lines()}")

    def status(self) -> str:
        """The status: lines done (of how many), lines/s, rejected, and any wait under way."""
        now = self._clock()
        done = self._done()
        elapsed = now - self._started
        rate = (done - self._first) / elapsed if elapsed > 0 else 0.0
        text = f"{self._lines()}, {rate:,.0f} lines/s, {self._rejected():,} rejected"
        if now < self._wait_until:
            text += f"; waiting {_seconds(self._wait_until - now)}: {self._wait_reason}"
        return text

    def _lines(self) -> str:
        done = self._done()
        if self._total:
            return f"{done:,} of {self._total:,} lines ({100 * done / self._total:.1f} %)"
        return f"{done:,} lines"

    def draw(self) -> None:
        """Redraw the status line (terminal), or write it once ``LOG_EVERY_S`` passed (log)."""
        if self._terminal:
            line = f"{self._name}: {self.status()}"
            pad = max(self._width - len(line), 0)
            self._width = len(line)
            self._err.write("\r" + line + " " * pad)
            self._err.flush()
        elif self._clock() - self._logged_at >= LOG_EVERY_S:
            self._logged_at = self._clock()
            self._write_line(self.status())

    def _write_line(self, text: str) -> None:
        self._err.write(f"{self._name}: {text}\n")
        self._err.flush()

    async def run(self) -> None:
        """Redraw until cancelled: a wait or a slow server never leaves a frozen line."""
        while True:
            await asyncio.sleep(REDRAW_S)
            self.draw()

    def close(self) -> None:
        """Draw the last status and end its line, so that the summary has a line of its own
        (once: a second call does nothing)."""
        if self._terminal and not self._closed:
            self._closed = True
            self.draw()
            self._err.write("\n")
            self._err.flush()


def _seconds(value: float) -> str:
    return f"{math.ceil(value)} s" if value >= 0.5 else "a moment"
