from __future__ import annotations

from collections.abc import Iterator

import pytest

from evervault_emulator import EvervaultEmulator


@pytest.fixture
def emulator() -> Iterator[EvervaultEmulator]:
    with EvervaultEmulator() as emu:
        yield emu
