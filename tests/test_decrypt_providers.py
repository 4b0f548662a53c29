"""``CITADEL_DECRYPT_PROVIDERS`` (issue 10): routing by prefix, /health and /ready over all providers.

A ciphertext's prefix names its provider (``cit1:`` local, ``ev:`` Evervault);
an instance decrypts (and signs with, and rewraps) those of the providers in
its list and answers ``400 invalid_ciphertext`` for the others without asking
anyone. Evervault runs as the emulator, through the real SDK.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import evervault
import httpx
import pytest
from support import (
    KEYS,
    Served,
    free_port,
    headers,
    make_settings,
    run,
    serve_citadel,
    serving,
    wait_until,
)

from citadel.keyring import KeyringError, create_keyring
from evervault_emulator import EvervaultEmulator

ACL = {"sentinel": ["encrypt"], "conductor": ["decrypt", "sign", "rewrap"]}
SECRET = "exchange-secret-0042"


def settings_for(tmp_path: Path, emu: EvervaultEmulator | None = None, **overrides: Any) -> Any:
    values: dict[str, Any] = {"acl": ACL, "rate_limit_per_caller": "100000/minute"}
    if emu is not None:
        values.update(
            evervault_app_id=emu.app_id,
            evervault_api_key=emu.api_key,
            evervault_api_url=emu.url,
            evervault_timeout_s=2,
        )
    values.update(overrides)
    return make_settings(tmp_path, **values)


def encrypt(c: httpx.Client, plaintext: str = SECRET) -> str:
    r = c.post("/encrypt", json={"plaintext": plaintext}, headers=headers("sentinel"))
    assert r.status_code == 200, r.text
    ct: str = r.json()["encrypted_data"]
    return ct


def call(c: httpx.Client, operation: str, ct: str) -> httpx.Response:
    body: dict[str, str] = {"encrypted_data": ct}
    if operation == "sign":
        body.update(algorithm="hmac-sha256", message="order")
    return c.post(f"/{operation}", json=body, headers=headers("conductor"))


def local_ciphertext(tmp_path: Path) -> str:
    """A ``cit1:`` ciphertext from a local Citadel on ``tmp_path``'s keyring (made if missing)."""
    create_keyring(tmp_path / "keyring.json", origin="operator")
    with serve_citadel(settings_for(tmp_path)) as s, s.client() as c:
        return encrypt(c)


def sdk_ciphertext(emu: EvervaultEmulator, plaintext: str = SECRET) -> str:
    client = evervault.Client(app_uuid=emu.app_id, api_key=emu.api_key, base_url=emu.url)
    ct: str = client.encrypt(plaintext, None)
    return ct


def ready(served: Served) -> None:
    with served.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200, timeout=15)


# -- routing ------------------------------------------------------------------------------------


def test_each_prefix_is_decrypted_by_its_own_provider(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    local_ct = local_ciphertext(tmp_path)
    ev_ct = sdk_ciphertext(emulator, "from-evervault")
    settings = settings_for(tmp_path, emulator, provider="evervault", decrypt_providers_raw="local")
    with serve_citadel(settings) as s, s.client() as c:
        ready(s)
        before = emulator.calls("decrypt")
        local_answer = call(c, "decrypt", local_ct)
        after_local = emulator.calls("decrypt")
        ev_answer = call(c, "decrypt", ev_ct)
        after_ev = emulator.calls("decrypt")
    assert local_answer.json() == {"plaintext": SECRET}
    assert ev_answer.json() == {"plaintext": "from-evervault"}
    assert after_local == before  # a cit1: ciphertext never reaches Evervault
    assert after_ev == before + 1


@pytest.mark.parametrize("operation", ["decrypt", "sign", "rewrap"])
def test_ev_ciphertext_on_a_local_only_instance_is_400_invalid_ciphertext(
    tmp_path: Path, emulator: EvervaultEmulator, operation: str
) -> None:
    ev_ct = sdk_ciphertext(emulator)
    with serve_citadel(settings_for(tmp_path)) as s, s.client() as c:
        r = call(c, operation, ev_ct)
    assert (r.status_code, r.json()["code"]) == (400, "invalid_ciphertext")
    assert emulator.calls("decrypt") == 0


def test_a_ciphertext_of_a_provider_not_enabled_here_says_which_and_the_setting(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    ev_ct = sdk_ciphertext(emulator)
    with serve_citadel(settings_for(tmp_path)) as s, s.client() as c:
        detail = call(c, "decrypt", ev_ct).json()["detail"]
    assert "evervault" in detail and "CITADEL_DECRYPT_PROVIDERS" in detail
    assert ev_ct[3:20] not in detail


@pytest.mark.parametrize("operation", ["decrypt", "sign", "rewrap"])
def test_local_ciphertext_on_an_evervault_only_instance_is_400_invalid_ciphertext(
    tmp_path: Path, emulator: EvervaultEmulator, operation: str
) -> None:
    local_ct = local_ciphertext(tmp_path)
    settings = settings_for(tmp_path, emulator, provider="evervault")
    with serve_citadel(settings) as s, s.client() as c:
        ready(s)
        r = call(c, operation, local_ct)
    assert (r.status_code, r.json()["code"]) == (400, "invalid_ciphertext")
    assert emulator.calls("decrypt") == 0


@pytest.mark.parametrize("ct", ["cit2:00000000:AAAA", "EV:RFVC:x:y:z:$", "vault:v1:abcd", ":"])
def test_unknown_prefix_is_400_with_both_providers_decrypting(
    tmp_path: Path, emulator: EvervaultEmulator, ct: str
) -> None:
    settings = settings_for(tmp_path, emulator, decrypt_providers_raw="evervault")
    with serve_citadel(settings) as s, s.client() as c:
        ready(s)
        r = call(c, "decrypt", ct)
    assert (r.status_code, r.json()["code"]) == (400, "invalid_ciphertext")
    assert emulator.calls("decrypt") == 0


def test_sign_routes_an_ev_secret_through_evervault_on_a_local_instance(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    ev_ct = sdk_ciphertext(emulator, "hmac-key-from-ev")
    settings = settings_for(tmp_path, emulator, decrypt_providers_raw="evervault")
    with serve_citadel(settings) as s, s.client() as c:
        ready(s)
        r = call(c, "sign", ev_ct)
    assert r.json() == {
        "signature": hmac.new(b"hmac-key-from-ev", b"order", hashlib.sha256).hexdigest()
    }


# -- /health and /ready -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "provider,decrypt,expected",
    [
        ("local", None, ["local"]),
        ("local", "evervault", ["local", "evervault"]),
        ("evervault", "local", ["evervault", "local"]),
        ("evervault", "evervault,local,evervault", ["evervault", "local"]),
        ("local", "local", ["local"]),
    ],
)
def test_health_shows_the_decrypting_providers(
    tmp_path: Path,
    emulator: EvervaultEmulator,
    provider: str,
    decrypt: str | None,
    expected: list[str],
) -> None:
    create_keyring(tmp_path / "keyring.json", origin="operator")
    settings = settings_for(tmp_path, emulator, provider=provider, decrypt_providers_raw=decrypt)
    with serve_citadel(settings) as s, s.client() as c:
        ready(s)
        health = c.get("/health").json()
    assert health["provider"] == provider
    assert health["decrypt_providers"] == expected


def _closed_port_emulator() -> EvervaultEmulator:
    emu = EvervaultEmulator()
    emu.start()
    emu.stop()  # a known port with nothing behind it; start() serves on it again
    return emu


def test_ready_is_503_while_an_evervault_decrypt_provider_is_not_ready(tmp_path: Path) -> None:
    emu = _closed_port_emulator()
    settings = settings_for(tmp_path, emu, decrypt_providers_raw="evervault")
    with serve_citadel(settings) as s, s.client() as c:
        ready_status = c.get("/ready")
        health = c.get("/health").json()
        ct = encrypt(c)  # the encrypting provider (local) serves all the same
        local = call(c, "decrypt", ct)
    assert ready_status.status_code == 503
    assert ready_status.json()["decrypt_providers"] == ["local", "evervault"]
    assert health["status"] == "degraded"
    assert ct.startswith("cit1:")
    assert local.json() == {"plaintext": SECRET}


def test_ready_turns_200_once_the_evervault_decrypt_provider_is_reachable(tmp_path: Path) -> None:
    emu = _closed_port_emulator()
    settings = settings_for(tmp_path, emu, decrypt_providers_raw="evervault")
    with serve_citadel(settings) as s, s.client() as c:
        assert c.get("/ready").status_code == 503
        emu.start()
        try:
            wait_until(lambda: c.get("/ready").status_code == 200, timeout=20)
            assert c.get("/health").json()["status"] == "healthy"
        finally:
            emu.stop()


def test_ready_is_503_while_the_evervault_decrypt_breaker_is_open(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    settings = settings_for(
        tmp_path,
        emulator,
        decrypt_providers_raw="evervault",
        breaker_fail_max=2,
        breaker_reset_s=30,
    )
    ev_ct = sdk_ciphertext(emulator)
    with serve_citadel(settings) as s, s.client() as c:
        ready(s)
        emulator.set_fault("decrypt", status=500)
        failures = [call(c, "decrypt", ev_ct).status_code for _ in range(2)]
        ready_status = c.get("/ready").status_code
        health = c.get("/health").json()
        local = call(c, "decrypt", encrypt(c))
    assert failures == [503, 503]
    assert ready_status == 503
    assert (health["status"], health["breaker"]) == ("degraded", "open")
    assert local.json() == {"plaintext": SECRET}  # local data keeps decrypting


# -- configuration ------------------------------------------------------------------------------


def test_local_as_a_decrypt_only_provider_needs_an_existing_keyring(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    settings = settings_for(tmp_path, emulator, provider="evervault", decrypt_providers_raw="local")
    with pytest.raises(KeyringError), serve_citadel(settings):
        pass
    assert not (tmp_path / "keyring.json").exists()  # never created for decrypting only


def test_citadel_decrypt_providers_from_the_environment_of_a_real_process(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    env = {
        "CITADEL_PROVIDER": "local",
        "CITADEL_DECRYPT_PROVIDERS": "evervault",
        "CITADEL_LOCAL_KEYRING": str(tmp_path / "keyring.json"),
        "CITADEL_API_KEYS": json.dumps({"sentinel": [KEYS["sentinel"]]}),
        "EVERVAULT_APP_ID": emulator.app_id,
        "EVERVAULT_API_KEY": emulator.api_key,
        "EVERVAULT_API_URL": emulator.url,
    }
    with serving(tmp_path, **env) as (url, _proc):
        wait_until(lambda: httpx.get(url + "/ready").status_code == 200, timeout=15)
        health = httpx.get(url + "/health").json()
    assert health["decrypt_providers"] == ["local", "evervault"]


def test_unknown_decrypt_provider_stops_start_up_naming_the_setting(tmp_path: Path) -> None:
    result = run(
        ["serve", "--port", str(free_port())],
        tmp_path,
        CITADEL_DECRYPT_PROVIDERS="local,vault-secret-XYZ",
    )
    assert result.returncode == 2
    assert "CITADEL_DECRYPT_PROVIDERS" in result.stderr + result.stdout
    assert "vault-secret-XYZ" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_evervault_in_decrypt_providers_requires_the_evervault_settings(tmp_path: Path) -> None:
    result = run(
        ["serve", "--port", str(free_port())],
        tmp_path,
        CITADEL_DECRYPT_PROVIDERS="local,evervault",
    )
    assert result.returncode == 2
    assert "EVERVAULT_APP_ID" in result.stderr
    assert "Traceback" not in result.stderr


def test_local_decrypt_only_process_without_a_keyring_stops_naming_the_setting(
    tmp_path: Path,
) -> None:
    result = run(
        ["serve", "--port", str(free_port())],
        tmp_path,
        CITADEL_PROVIDER="evervault",
        CITADEL_DECRYPT_PROVIDERS="local",
        EVERVAULT_APP_ID="app_0123456789ab",
        EVERVAULT_API_KEY="ev:key:1:CANARY-EV-KEY-77",
        CITADEL_LOCAL_KEYRING=str(tmp_path / "keyring.json"),
    )
    assert result.returncode == 2
    assert "CITADEL_LOCAL_KEYRING" in result.stderr
    assert "CANARY-EV-KEY-77" not in result.stdout + result.stderr
    assert not (tmp_path / "keyring.json").exists()
