"""A connection's deadline that moves once per request without a new timer each time.

A keep-alive connection starts and stops two deadlines per request: its next
head's (``CITADEL_READ_TIMEOUT_S``) and uvicorn's idle one (keep-alive).
Scheduling a timer and cancelling it costs about 2.8 µs on uvloop, twice per
request: more than authenticating the request. A :class:`Deadline` keeps at
most one timer: starting it only moves the time it is due, and a timer that
fires before that time (it was set for an earlier start) is set again for
what is left. Stopping it costs nothing. It fires once, at the time of the
last start, and only if it was not stopped since.

The head deadline's length comes from the app being served
(:func:`head_deadline_s`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# The head deadline of an app that is not Citadel's (the protocol's own tests).
DEFAULT_HEAD_DEADLINE_S = 10.0


def head_deadline_s(app: object) -> float:
    """``CITADEL_READ_TIMEOUT_S`` of the Citadel app being served, through uvicorn's wrappers.

    The one source of the header deadline: each worker process builds its app
    from its settings, and every connection's protocol reads it from there.
    """
    for _ in range(8):
        settings = getattr(getattr(app, "state", None), "settings", None)
        if settings is not None:
            return float(settings.read_timeout_s)
        app = getattr(app, "app", None)
        if app is None:
            break
    return DEFAULT_HEAD_DEADLINE_S


# A timer may fire a little before the time it was set for (the loop's clock is
# in milliseconds): within this, the deadline has passed.
_SLACK_S = 0.002


class Deadline:
    """A deadline started, stopped and started again per request, with one timer behind it."""

    __slots__ = ("_due", "_loop", "_on_late", "_seconds", "_timer")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, seconds: float, on_late: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._seconds = seconds
        self._on_late = on_late
        self._due: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        """Whether the deadline is started and has neither passed nor been stopped."""
        return self._due is not None

    def start(self) -> None:
        """Due ``seconds`` from now, whatever it was due before."""
        self._due = self._loop.time() + self._seconds
        if self._timer is None:
            self._timer = self._loop.call_at(self._due, self._fire)

    def stop(self) -> None:
        """Not due any more; the timer, if any, finds that when it fires."""
        self._due = None

    def close(self) -> None:
        """Stopped for good, its timer cancelled (the connection is gone)."""
        self._due = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        due = self._due
        if due is None:
            return
        if due - self._loop.time() > _SLACK_S:
            # Set for an earlier start: wait for the latest one.
            self._timer = self._loop.call_at(due, self._fire)
            return
        self._due = None
        self._on_late()
