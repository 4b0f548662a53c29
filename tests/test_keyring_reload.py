"""A running LocalProvider follows its keyring file: the watcher and the unknown-key re-read."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from support import make_settings

import citadel.providers.local as local
from citadel.config import SettingError
from citadel.errors import InvalidCiphertext, KeyRetired
from citadel.keyring import (
    KeyringError,
    change_keyring,
    create_keyring,
    load_keyring,
    rotate_keyring,
)
from citadel.metrics import Metrics
from citadel.providers.local import LocalProvider, file_stamp

pytestmark = pytest.mark.anyio


class Reads:
    """A keyring loader that counts how often the file is read."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, path: Path) -> Any:
        self.count += 1
        return load_keyring(path)


class Events:
    """Stands in for the module's structlog logger and keeps what was logged."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))

    info = warning = error = exception = _record

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for name, kw in self.lines if name == event]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Events:
    recorder = Events()
    monkeypatch.setattr(local, "log", recorder)
    return recorder


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def ring_file(tmp_path: Path) -> Path:
    path = tmp_path / "keyring.json"
    create_keyring(path, origin="operator")
    return path


def follower(path: Path, **kw: Any) -> LocalProvider:
    """A provider on ``path`` as from_settings makes it, with test-sized intervals."""
    seen = file_stamp(path)
    return LocalProvider(load_keyring(path), path=path, seen=seen, **kw)


@pytest.fixture
async def running() -> AsyncIterator[list[LocalProvider]]:
    started: list[LocalProvider] = []
    yield started
    for provider in started:
        await provider.aclose()


async def test_watcher_picks_up_a_rotation(tmp_path: Path, running: list[LocalProvider]) -> None:
    path = ring_file(tmp_path)
    provider = follower(path, poll_interval_s=0.02)
    await provider.start()
    running.append(provider)
    new_kid = rotate_keyring(path)
    await eventually(lambda: provider.active_key_id == new_kid)
    assert (await provider.encrypt("x")).startswith(f"cit1:{new_kid}:")


async def test_unknown_key_id_rereads_the_file_before_failing(tmp_path: Path) -> None:
    path = ring_file(tmp_path)
    reads = Reads()
    stale = follower(path, loader=reads)  # never started: no watcher, only the re-read
    rotate_keyring(path)
    fresh = follower(path)
    ct = await fresh.encrypt("made by another instance after rotate")
    assert await stale.decrypt(ct) == "made by another instance after rotate"
    assert reads.count == 1


async def test_a_burst_of_random_key_ids_costs_one_read(tmp_path: Path) -> None:
    path = ring_file(tmp_path)
    reads = Reads()
    provider = follower(path, loader=reads)
    forged = [f"cit1:{os.urandom(4).hex()}:" + "A" * 60 for _ in range(300)]
    results = await asyncio.gather(*(provider.decrypt(ct) for ct in forged), return_exceptions=True)
    assert all(isinstance(r, InvalidCiphertext) for r in results)
    assert reads.count == 1


async def test_sustained_random_key_ids_read_at_most_once_per_interval(tmp_path: Path) -> None:
    path = ring_file(tmp_path)
    reads = Reads()
    interval = 0.1
    provider = follower(path, loader=reads, reread_interval_s=interval)
    started = time.monotonic()
    for _ in range(10):
        wave = [f"cit1:{os.urandom(4).hex()}:" + "A" * 60 for _ in range(20)]
        await asyncio.gather(*(provider.decrypt(ct) for ct in wave), return_exceptions=True)
    elapsed = time.monotonic() - started
    # Each wave waits for a read of its own, so there are about ten; never more
    # than the interval allows, however fast the requests come.
    assert 1 <= reads.count <= 1 + elapsed / interval
    assert reads.count <= 10


async def test_a_key_added_just_after_a_reread_is_found_by_the_next_one(tmp_path: Path) -> None:
    path = ring_file(tmp_path)
    reads = Reads()
    provider = follower(path, loader=reads, reread_interval_s=0.2)
    with pytest.raises(InvalidCiphertext):
        await provider.decrypt(f"cit1:{os.urandom(4).hex()}:" + "A" * 60)  # spends the budget
    rotate_keyring(path)
    ct = await follower(path).encrypt("new key, read budget just spent")
    assert await provider.decrypt(ct) == "new key, read budget just spent"
    assert reads.count == 2


async def test_retired_key_id_is_key_retired_without_a_reread(tmp_path: Path) -> None:
    path = ring_file(tmp_path)
    reads = Reads()
    old_ct = await follower(path).encrypt("x")
    old = load_keyring(path).active
    rotate_keyring(path)
    change_keyring(path, lambda ring: ring.retire(old))
    provider = follower(path, loader=reads)
    with pytest.raises(KeyRetired):
        await provider.decrypt(old_ct)
    assert reads.count == 0


async def test_retire_and_restore_reach_a_running_provider(
    tmp_path: Path, running: list[LocalProvider]
) -> None:
    path = ring_file(tmp_path)
    provider = follower(path, poll_interval_s=0.02)
    await provider.start()
    running.append(provider)
    old = provider.active_key_id
    ct = await provider.encrypt("before retirement")
    rotate_keyring(path)
    change_keyring(path, lambda ring: ring.retire(old))
    await eventually(lambda: old in provider.keyring.retired_ids())
    with pytest.raises(KeyRetired):
        await provider.decrypt(ct)
    change_keyring(path, lambda ring: ring.restore(old))
    await eventually(lambda: old not in provider.keyring.retired_ids())
    assert await provider.decrypt(ct) == "before retirement"


async def test_broken_file_keeps_the_keyring_in_force_and_logs_once(
    tmp_path: Path, running: list[LocalProvider], events: Events
) -> None:
    path = ring_file(tmp_path)
    material = path.read_text()
    provider = follower(path, poll_interval_s=0.02)
    await provider.start()
    running.append(provider)
    ct = await provider.encrypt("still served")
    path.write_text('{"format": "citadel-keyring/1", "keys": ')
    await eventually(lambda: bool(events.named("keyring_reload_failed")))
    # Unknown ids re-read the broken file too; the problem is still logged once.
    with pytest.raises(InvalidCiphertext):
        await provider.decrypt(f"cit1:{os.urandom(4).hex()}:" + "A" * 60)
    await asyncio.sleep(0.1)
    assert await provider.decrypt(ct) == "still served"
    (failure,) = events.named("keyring_reload_failed")
    assert "not valid JSON" in failure["problem"]
    assert str(events.lines).count("keyring_reload_failed") == 1
    for line in material.splitlines():
        if '"key":' in line:
            assert line.split('"')[3] not in str(events.lines)


async def test_repaired_file_is_loaded_again(
    tmp_path: Path, running: list[LocalProvider], events: Events
) -> None:
    path = ring_file(tmp_path)
    good = path.read_bytes()
    provider = follower(path, poll_interval_s=0.02)
    await provider.start()
    running.append(provider)
    path.write_text("{broken")
    await eventually(lambda: bool(events.named("keyring_reload_failed")))
    path.write_bytes(good)
    new_kid = rotate_keyring(path)
    await eventually(lambda: provider.active_key_id == new_kid)


async def test_a_secret_volume_symlink_swap_is_seen(
    tmp_path: Path, running: list[LocalProvider]
) -> None:
    mount = tmp_path / "secret"
    (mount / "..2026_01").mkdir(parents=True)
    create_keyring(mount / "..2026_01" / "keyring.json", origin="operator")
    (mount / "..data").symlink_to("..2026_01")
    (mount / "keyring.json").symlink_to("..data/keyring.json")
    provider = follower(mount / "keyring.json", poll_interval_s=0.02)
    await provider.start()
    running.append(provider)
    # The kubelet's update: a new timestamped directory, then ..data renamed over.
    (mount / "..2026_02").mkdir()
    (mount / "..2026_02" / "keyring.json").write_bytes(
        (mount / "..2026_01" / "keyring.json").read_bytes()
    )
    new_kid = rotate_keyring(mount / "..2026_02" / "keyring.json")
    (mount / "..data_tmp").symlink_to("..2026_02")
    os.replace(mount / "..data_tmp", mount / "..data")
    await eventually(lambda: provider.active_key_id == new_kid)


async def test_decrypts_during_reloads_never_fail(
    tmp_path: Path, running: list[LocalProvider]
) -> None:
    path = ring_file(tmp_path)
    provider = follower(path, poll_interval_s=0.005)
    await provider.start()
    running.append(provider)
    made: list[tuple[str, str]] = []
    for i in range(20):
        rotate_keyring(path)
        other = follower(path)
        made.append((f"p{i}", await other.encrypt(f"p{i}")))
        made.append((f"q{i}", await provider.encrypt(f"q{i}")))
        await asyncio.sleep(0)
    assert [await provider.decrypt(ct) for _, ct in made] == [p for p, _ in made]


def test_from_settings_creates_a_development_keyring_and_says_so(
    tmp_path: Path, events: Events
) -> None:
    settings = make_settings(tmp_path)
    provider = LocalProvider.from_settings(settings, Metrics(), create=True)
    assert provider.active_key_id == load_keyring(settings.local_keyring).active
    assert events.named("keyring_created") == [{"path": str(settings.local_keyring)}]


def test_from_settings_without_create_needs_an_existing_keyring(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with pytest.raises(
        KeyringError, match=r"does not exist \(create one with `citadel keyring init`\)"
    ):
        LocalProvider.from_settings(settings, Metrics(), create=False)
    assert not settings.local_keyring.exists()


def test_from_settings_in_production_creates_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, env="production")
    with pytest.raises(KeyringError):
        LocalProvider.from_settings(settings, Metrics(), create=True)
    assert not settings.local_keyring.exists()


def test_from_settings_in_production_refuses_an_auto_created_keyring(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, env="production")
    create_keyring(settings.local_keyring, origin="auto")
    with pytest.raises(SettingError) as info:
        LocalProvider.from_settings(settings, Metrics(), create=True)
    assert "CITADEL_LOCAL_KEYRING" in str(info.value)


def test_provider_names_itself_and_its_prefix(tmp_path: Path) -> None:
    provider = follower(ring_file(tmp_path))
    assert (provider.name, provider.prefix) == ("local", "cit1:")
    assert provider.encrypt_sync("x").startswith(provider.prefix + provider.active_key_id + ":")
