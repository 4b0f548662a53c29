from __future__ import annotations

import inspect
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import respx
import support
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


# -- the fast subset: `make test-fast` is `pytest -m "not slow"` ------------------------------
#
# A test is marked `slow` here, at collection, so that no test needs to remember it:
#  * when it, a fixture it uses, or a function or class of its module that either calls,
#    starts a process: support.run / support.serving (`python -m citadel` as a child),
#    subprocess, a real redis-server (support.RedisServer; the `redis_server` fixture, whose
#    users are also marked `redis`);
#  * when it uses a fixture that builds a virtual environment or runs nginx (SLOW_FIXTURES);
#  * when its file is in SLOW_FILES, or the test in SLOW_TESTS (each with its reason);
#  * when it carries `slow`, `nginx` or `redis` itself.
# The whole suite (`make test`) still runs every test.

SLOW_FILES = {
    "test_properties.py": "long property tests (hypothesis, hundreds of examples a test)",
    "test_protocol_properties.py": "long property tests over the HTTP protocol",
    "test_deployment.py": "installs the image's commands into a clean virtual environment",
    "test_ccxt_covered.py": "every covered ccxt exchange, sync and async, about 3 minutes",
    "test_ccxt_no_plaintext.py": "signs in a child process, then scans its memory",
    "test_ccxt_readme.py": "runs the README's ccxt blocks in child processes",
}
SLOW_TESTS = {
    "evervault/test_provider.py::test_sdk_encrypt_is_safe_under_concurrent_re_derivation": (
        "a concurrency soak, about 15 s"
    ),
    "test_bulk.py::test_10000_lines_come_out_rewrapped_in_order_with_rejects": (
        "10,000 lines through the rewrap tool, about 13 s"
    ),
    "test_security.py::test_keys_file_rotation_without_restart_or_failed_request": (
        "rotates a keys file under traffic for several seconds"
    ),
}
SLOW_FIXTURES = {"client_venv", "nginx", "redis_server"}
TESTS = Path(__file__).resolve().parent
_PROCESS_STARTERS = {
    "run": support.run,
    "serving": support.serving,
    "RedisServer": support.RedisServer,
    "subprocess": subprocess,
}


def _starts_processes(func: Any, seen: set[int] | None = None) -> bool:
    """Whether ``func`` starts a process: its code names a process starter (or a fixture in
    SLOW_FIXTURES, as ``request.getfixturevalue`` does), directly or through a function or
    class of its own module."""
    func = inspect.unwrap(func)
    code = getattr(func, "__code__", None)
    if code is None:
        return False
    seen = set() if seen is None else seen
    if id(code) in seen:
        return False
    seen.add(id(code))
    module_globals = getattr(func, "__globals__", {})
    codes = [code]
    while codes:
        current = codes.pop()
        codes.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
        if SLOW_FIXTURES & {c for c in current.co_consts if isinstance(c, str)}:
            return True
        names = set(current.co_names)
        for name in names:
            value = module_globals.get(name)
            starter = _PROCESS_STARTERS.get(name)
            if starter is not None and (
                value is starter or (value is None and ("support" in names or name == "subprocess"))
            ):
                return True  # a module-level name, or one imported inside the function
            if getattr(value, "__module__", None) != func.__module__:
                continue
            # a helper function or class of the same test module: look inside it too
            if inspect.isfunction(value) and _starts_processes(value, seen):
                return True
            if inspect.isclass(value) and any(
                _starts_processes(member, seen)
                for member in vars(value).values()
                if inspect.isfunction(member)
            ):
                return True
    return False


def _check_slow_lists() -> None:
    for name in SLOW_FILES:
        if not (TESTS / name).is_file():
            raise pytest.UsageError(f"tests/conftest.py SLOW_FILES names a missing file: {name}")
    for node in SLOW_TESTS:
        file, test = node.split("::")
        path = TESTS / file
        if not path.is_file() or f"def {test}(" not in path.read_text():
            raise pytest.UsageError(f"tests/conftest.py SLOW_TESTS names a missing test: {node}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _check_slow_lists()
    for item in items:
        path = Path(str(item.path)).resolve()
        relative = path.relative_to(TESTS).as_posix() if path.is_relative_to(TESTS) else path.name
        name = getattr(item, "originalname", item.name)
        fixtures = set(getattr(item, "fixturenames", ()))
        if "redis_server" in fixtures:
            item.add_marker(pytest.mark.redis)
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        funcs = [getattr(item, "function", None)]
        funcs += [d.func for name_ in fixtures for d in defs.get(name_, ())]
        slow = (
            relative in SLOW_FILES
            or f"{relative}::{name}" in SLOW_TESTS
            or bool(fixtures & SLOW_FIXTURES)
            or any(item.get_closest_marker(m) for m in ("slow", "nginx", "redis"))
            or any(f is not None and _starts_processes(f) for f in funcs)
        )
        if slow:
            item.add_marker(pytest.mark.slow)
