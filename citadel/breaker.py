"""A circuit breaker for calls that run off the event loop, without serialising them.

States and transitions (all in :meth:`CircuitBreaker._set_state`)::

    CLOSED ──(fail_max consecutive failures)──▶ OPEN
    OPEN ──(open period elapsed; the next call is the probe)──▶ HALF_OPEN
    HALF_OPEN ──(probe succeeds)──▶ CLOSED          (open period back to reset_s)
    HALF_OPEN ──(probe fails)──▶ OPEN               (open period doubles, up to reset_max_s)

While OPEN, and while a probe is in flight, :meth:`acquire` raises at once
without calling upstream. Only the outcome counts: ``success`` (upstream
answered, including answers the caller is at fault for) and ``failure``
(5xx, timeouts, refused or broken connections). Listeners observe transitions
for logs and metrics; the breaker knows nothing of either.

Why not pybreaker: its ``call`` holds one lock for the whole guarded call, so
calls through one breaker run one at a time (at 50 ms a call, 20 a second per
process), and its async support is for Tornado. Here the bookkeeping is a few
synchronous steps on the event loop, which is single-threaded, so no lock is
needed and calls themselves run concurrently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    """The breaker's three states; also what ``/health`` and the providers report.

    Defined here, beside the transitions, so that every provider (with a
    breaker or without) reports the same values.
    """

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def gauge(self) -> int:
        """The value of ``citadel_breaker_state``: 0 closed, 1 half-open, 2 open."""
        return {"closed": 0, "half_open": 1, "open": 2}[self.value]


Listener = Callable[[BreakerState, BreakerState, float], None]


class BreakerOpen(Exception):
    """The breaker refused the call; ``retry_after`` is the time left in the open period."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("circuit breaker open")
        self.retry_after = retry_after


@dataclass(slots=True)
class Permit:
    """One admitted call; ``probe`` marks the single call let through while half-open."""

    probe: bool


class CircuitBreaker:
    """Stops calling an upstream that keeps failing, then lets one probe find out if it is back.

    Callers fail fast (``BreakerOpen``) instead of queueing behind timeouts;
    the transitions are drawn in the module docstring.
    """

    def __init__(
        self,
        *,
        fail_max: int,
        reset_s: float,
        reset_max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fail_max = fail_max
        self.reset_s = reset_s
        self.reset_max_s = max(reset_max_s, reset_s)
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._period = reset_s
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._listeners: list[Listener] = []

    @property
    def state(self) -> BreakerState:
        """The state as callers see it: OPEN turns HALF_OPEN only when a probe is admitted."""
        return self._state

    @property
    def open_period(self) -> float:
        """How long an opening lasts; doubled by each failed probe, up to ``reset_max_s``."""
        return self._period

    def add_listener(self, listener: Listener) -> None:
        """``listener(old, new, open_period)`` is called on every transition."""
        self._listeners.append(listener)

    def acquire(self) -> Permit:
        """Admit a call or raise :class:`BreakerOpen`; O(1), no I/O, no waiting."""
        if self._state is BreakerState.CLOSED:
            return Permit(probe=False)
        if self._state is BreakerState.OPEN:
            remaining = self._opened_at + self._period - self._clock()
            if remaining > 0:
                raise BreakerOpen(remaining)
            self._set_state(BreakerState.HALF_OPEN)
        if self._probe_in_flight:
            raise BreakerOpen(self.reset_s)
        self._probe_in_flight = True
        return Permit(probe=True)

    def success(self, permit: Permit) -> None:
        """Upstream answered: the failure count restarts; a successful probe closes the breaker."""
        self._failures = 0
        if permit.probe:
            self._probe_in_flight = False
            self._period = self.reset_s
            self._set_state(BreakerState.CLOSED)

    def failure(self, permit: Permit) -> None:
        """Upstream failed: ``fail_max`` in a row open the breaker; a failed probe reopens it."""
        if permit.probe:
            self._probe_in_flight = False
            self._period = min(self._period * 2, self.reset_max_s)
            self._open()
            return
        if self._state is not BreakerState.CLOSED:
            return  # a call admitted before the breaker opened; already counted
        self._failures += 1
        if self._failures >= self.fail_max:
            self._period = self.reset_s
            self._open()

    def release(self, permit: Permit) -> None:
        """The call ended without telling anything about upstream (cancelled, say)."""
        if permit.probe:
            self._probe_in_flight = False

    def _open(self) -> None:
        self._failures = 0
        self._opened_at = self._clock()
        self._set_state(BreakerState.OPEN)

    def _set_state(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old is not new or new is BreakerState.OPEN:
            for listener in self._listeners:
                listener(old, new, self._period)
