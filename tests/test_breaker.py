"""The circuit breaker's state machine, on an injected clock."""

from __future__ import annotations

import pytest

from citadel.breaker import BreakerOpen, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, fail_max: int = 5) -> CircuitBreaker:
    return CircuitBreaker(fail_max=fail_max, reset_s=1, reset_max_s=16, clock=clock)


def fail(b: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        b.failure(b.acquire())


def test_opens_after_fail_max_consecutive_failures() -> None:
    b = breaker(Clock())
    fail(b, 4)
    assert b.state is BreakerState.CLOSED
    fail(b, 1)
    assert b.state is BreakerState.OPEN


def test_a_success_resets_the_consecutive_count() -> None:
    b = breaker(Clock())
    fail(b, 4)
    b.success(b.acquire())
    fail(b, 4)
    assert b.state is BreakerState.CLOSED


def test_open_breaker_refuses_with_the_time_left() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 5)
    clock.now += 0.25
    with pytest.raises(BreakerOpen) as exc:
        b.acquire()
    assert exc.value.retry_after == pytest.approx(0.75)


def test_after_the_open_period_exactly_one_probe_passes() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 5)
    clock.now += 1
    probe = b.acquire()
    assert probe.probe
    assert b.state is BreakerState.HALF_OPEN
    for _ in range(10):
        with pytest.raises(BreakerOpen):
            b.acquire()


def test_successful_probe_closes_and_resets_the_period() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 5)
    clock.now += 1
    b.failure(b.acquire())  # period 2
    clock.now += 2
    b.success(b.acquire())
    assert b.state is BreakerState.CLOSED
    assert b.open_period == 1
    assert not b.acquire().probe


def test_failed_probes_double_the_period_up_to_the_cap() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 5)
    periods = []
    for _ in range(7):
        clock.now += b.open_period
        b.failure(b.acquire())
        periods.append(b.open_period)
    assert periods == [2, 4, 8, 16, 16, 16, 16]
    assert b.state is BreakerState.OPEN


def test_failures_of_calls_admitted_before_opening_do_not_extend_it() -> None:
    clock = Clock()
    b = breaker(clock, fail_max=2)
    early = [b.acquire() for _ in range(5)]
    for permit in early:
        b.failure(permit)
    assert b.state is BreakerState.OPEN
    assert b.open_period == 1


def test_released_probe_lets_another_probe_through() -> None:
    clock = Clock()
    b = breaker(clock)
    fail(b, 5)
    clock.now += 1
    b.release(b.acquire())
    assert b.acquire().probe


def test_calls_are_not_serialised_while_closed() -> None:
    b = breaker(Clock())
    permits = [b.acquire() for _ in range(100)]  # 100 calls in flight at once
    for p in permits:
        b.success(p)
    assert b.state is BreakerState.CLOSED


def test_listeners_see_every_transition() -> None:
    clock = Clock()
    b = breaker(clock)
    seen: list[tuple[str, str]] = []
    b.add_listener(lambda old, new, _period: seen.append((old.value, new.value)))
    fail(b, 5)
    clock.now += 1
    b.failure(b.acquire())
    clock.now += 2
    b.success(b.acquire())
    assert seen == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
