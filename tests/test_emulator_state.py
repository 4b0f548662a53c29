"""``make emulator`` remembers (issue 19, item 5): identity and keys kept across restarts.

The emulator runs as ``python -m evervault_emulator`` does for a person, twice
in the same working directory; the real SDK encrypts against the first run and
decrypts through the second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import evervault
import httpx
from support import free_port

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def emulator_process(cwd: Path, port: int, *args: str) -> Iterator[str]:
    """The emulator's first printed line, while it runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "evervault_emulator", "--port", str(port), *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        if "--ephemeral" not in args:
            banner += proc.stdout.readline()
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/_emulator", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, banner
                time.sleep(0.05)
        yield banner
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def settings_in(env_file: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in env_file.read_text().splitlines())


def client(env: dict[str, str]) -> evervault.Client:
    return evervault.Client(
        app_uuid=env["EVERVAULT_APP_ID"],
        api_key=env["EVERVAULT_API_KEY"],
        base_url=env["EVERVAULT_API_URL"],
    )


def test_a_restarted_emulator_decrypts_the_ciphertexts_of_its_last_run(tmp_path: Path) -> None:
    port = free_port()
    env_file = tmp_path / ".citadel" / "evervault-emulator" / "env"
    with emulator_process(tmp_path, port):
        first = settings_in(env_file)
        ciphertexts = [client(first).encrypt(f"secret-{i}", None) for i in range(5)]
    with emulator_process(tmp_path, port):
        second = settings_in(env_file)
        decrypted = [client(second).decrypt(ct) for ct in ciphertexts]
    assert second == first
    assert decrypted == [f"secret-{i}" for i in range(5)]


def test_the_emulator_says_where_its_credentials_are_and_keeps_them_owner_only(
    tmp_path: Path,
) -> None:
    with emulator_process(tmp_path, free_port()) as banner:
        state = tmp_path / ".citadel" / "evervault-emulator"
        assert ".citadel/evervault-emulator/env" in banner
        modes = {p.name: p.stat().st_mode & 0o777 for p in state.iterdir()}
    assert modes == {"env": 0o600, "identity.json": 0o600, "keys.pem": 0o600}


def test_an_ephemeral_emulator_keeps_nothing(tmp_path: Path) -> None:
    with emulator_process(tmp_path, free_port(), "--ephemeral"):
        pass
    assert not (tmp_path / ".citadel").exists()
