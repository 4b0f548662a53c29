from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import respx
from support import CLIENT_BASE, FakeTime, RedisServer, Served, make_settings, serve_citadel

from citadel.config import Settings
from evervault_emulator import EvervaultEmulator


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def citadel(settings: Settings) -> Iterator[Served]:
    with serve_citadel(settings) as served:
        yield served


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def emulator() -> Iterator[EvervaultEmulator]:
    with EvervaultEmulator() as emu:
        yield emu


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


@pytest.fixture
def mocked() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=CLIENT_BASE, assert_all_called=False) as router:
        yield router
