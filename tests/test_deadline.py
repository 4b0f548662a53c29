"""The connection deadline that moves per request (citadel/http/deadline.py), and what it saves.

A keep-alive connection starts and stops its head deadline and its idle
deadline once per request; each fresh timer costs about 2.8 µs on uvloop. The
deadline must still fire exactly as a fresh timer would: once, for the last
start, never after a stop. Waits are bounded; nothing asserts how long
anything took beyond "not before it was due".
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from test_protocol_properties import Transport, echo_app, post
from uvicorn.server import ServerState

from citadel.http.deadline import Deadline
from citadel.http.protocol import GuardedHttpToolsProtocol

pytestmark = pytest.mark.anyio

SECONDS = 0.05
BOUND_S = 5.0


class CountingLoop:
    """The running loop, with the timers asked of it counted."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.timers = 0

    def call_at(self, when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_at(when, callback, *args)

    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        self.timers += 1
        return self._loop.call_later(delay, callback, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


async def test_a_started_deadline_fires_once_when_due() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    done = asyncio.Event()
    deadline = Deadline(loop, SECONDS, lambda: (fired.append(loop.time()), done.set()))
    started = loop.time()
    deadline.start()
    await asyncio.wait_for(done.wait(), BOUND_S)
    assert len(fired) == 1 and fired[0] >= started + SECONDS - 0.002
    assert not deadline.running


async def test_a_deadline_started_again_fires_for_the_last_start_only() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    done = asyncio.Event()
    deadline = Deadline(loop, SECONDS, lambda: (fired.append(loop.time()), done.set()))
    deadline.start()
    await asyncio.sleep(SECONDS / 2)
    deadline.stop()
    restarted = loop.time()
    deadline.start()
    await asyncio.wait_for(done.wait(), BOUND_S)
    # Not at the first start's time, which passed while it was running again.
    assert fired == [fired[0]] and fired[0] >= restarted + SECONDS - 0.002


async def test_a_stopped_deadline_never_fires() -> None:
    loop = asyncio.get_running_loop()
    fired: list[bool] = []
    deadline = Deadline(loop, SECONDS, lambda: fired.append(True))
    deadline.start()
    deadline.stop()
    # A later deadline on the same loop fires: by then the stopped one was due too.
    later = asyncio.Event()
    Deadline(loop, SECONDS * 2, later.set).start()
    await asyncio.wait_for(later.wait(), BOUND_S)
    assert fired == []


async def test_starting_and_stopping_many_times_asks_for_one_timer() -> None:
    loop = CountingLoop(asyncio.get_running_loop())
    deadline = Deadline(loop, 10.0, lambda: None)  # type: ignore[arg-type]
    for _ in range(1000):
        deadline.start()
        deadline.stop()
    deadline.close()
    assert loop.timers == 1


async def test_a_closed_deadline_leaves_no_timer_behind() -> None:
    real = asyncio.get_running_loop()
    before = len(getattr(real, "_scheduled", ()))
    deadline = Deadline(real, 10.0, lambda: None)
    deadline.start()
    deadline.close()
    assert not deadline.running
    if hasattr(real, "_scheduled"):  # the pure-Python loop keeps its timers in a heap
        assert sum(not handle.cancelled() for handle in real._scheduled) <= before


async def test_a_keep_alive_connection_asks_for_timers_per_connection_not_per_request() -> None:
    loop = CountingLoop(asyncio.get_running_loop())
    config = uvicorn.Config(echo_app, lifespan="off", log_config=None, ws="none")
    config.load()
    protocol = GuardedHttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=loop
    )
    transport = Transport()
    protocol.connection_made(transport)
    requests = 50
    for _ in range(requests):
        answered = len(transport.out)
        protocol.data_received(post(b"/b", b'{"plaintext":"x"}'))
        for _ in range(1000):
            if len(transport.out) > answered and not protocol.tasks:
                break
            await asyncio.sleep(0)
    protocol.connection_lost(None)
    assert transport.out.count(b"HTTP/1.1 200") == requests
    # One for the head deadline, one for the idle one: before, two per request.
    assert loop.timers <= 4
