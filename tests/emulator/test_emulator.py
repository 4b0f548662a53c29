"""The Evervault API emulator itself, through the real SDK and raw HTTP."""

from __future__ import annotations

import base64
import time
from typing import Any

import evervault
import httpx
import pytest
import requests
from evervault.errors.evervault_errors import EvervaultError

from evervault_emulator import EvervaultEmulator

VALUES: list[Any] = [
    "api-key-123",
    "",
    "ünïcødé",
    42,
    -7,
    3.25,
    True,
    False,
    {"a": ["x", 1, {"b": True}]},
]


def sdk(emu: EvervaultEmulator, curve: str = "SECP256K1", **kw: Any) -> evervault.Client:
    return evervault.Client(
        app_uuid=emu.app_id, api_key=kw.get("api_key", emu.api_key), base_url=emu.url, curve=curve
    )


def basic(emu: EvervaultEmulator) -> dict[str, str]:
    token = base64.b64encode(f"{emu.app_id}:{emu.api_key}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.mark.parametrize("curve", ["SECP256K1", "SECP256R1"])
@pytest.mark.parametrize("value", VALUES, ids=[repr(v)[:12] for v in VALUES])
def test_sdk_round_trip(emulator: EvervaultEmulator, curve: str, value: Any) -> None:
    client = sdk(emulator, curve)
    assert client.decrypt(client.encrypt(value, None)) == value


@pytest.mark.parametrize("curve", ["SECP256K1", "SECP256R1"])
def test_data_role_ciphertexts_decrypt(emulator: EvervaultEmulator, curve: str) -> None:
    client = sdk(emulator, curve)
    assert client.decrypt(client.encrypt("with role", "my-role")) == "with role"


def test_tampered_ciphertext_is_422(emulator: EvervaultEmulator) -> None:
    client = sdk(emulator)
    parts = client.encrypt("secret", None).split(":")
    parts[-2] = ("A" if parts[-2][0] != "A" else "B") + parts[-2][1:]
    r = httpx.post(
        emulator.url + "decrypt", json={"data": ":".join(parts)}, headers=basic(emulator)
    )
    assert r.status_code == 422
    with pytest.raises(EvervaultError):
        client.decrypt(":".join(parts))


def test_ciphertext_of_another_app_is_422(emulator: EvervaultEmulator) -> None:
    with EvervaultEmulator() as other:
        foreign = sdk(other).encrypt("elsewhere", None)
    r = httpx.post(emulator.url + "decrypt", json={"data": foreign}, headers=basic(emulator))
    assert r.status_code == 422


def test_wrong_credentials_are_401(emulator: EvervaultEmulator) -> None:
    assert httpx.get(emulator.url + "cages/key", headers={"Api-Key": "wrong"}).status_code == 401
    r = httpx.post(
        emulator.url + "decrypt", json={"data": "x"}, headers={"Authorization": "Basic eDp5"}
    )
    assert r.status_code == 401
    with pytest.raises(EvervaultError):
        sdk(emulator, api_key="wrong").encrypt("x", None)


def test_status_fault_for_a_count_then_normal(emulator: EvervaultEmulator) -> None:
    client = sdk(emulator)
    ct = client.encrypt("x", None)
    emulator.set_fault("decrypt", status=500, count=2)
    for _ in range(2):
        with pytest.raises(EvervaultError):
            client.decrypt(ct)
    assert client.decrypt(ct) == "x"
    assert emulator.calls("decrypt") == 3


def test_429_carries_retry_after(emulator: EvervaultEmulator) -> None:
    emulator.set_fault("decrypt", status=429, retry_after=9)
    r = httpx.post(emulator.url + "decrypt", json={"data": "x"}, headers=basic(emulator))
    assert (r.status_code, r.headers["retry-after"]) == (429, "9")


def test_latency_fault_delays_the_answer(emulator: EvervaultEmulator) -> None:
    emulator.set_fault("cages/key", latency_ms=300)
    start = time.monotonic()
    r = httpx.get(emulator.url + "cages/key", headers={"Api-Key": emulator.api_key})
    assert r.status_code == 200
    assert time.monotonic() - start >= 0.3


def test_drop_fault_closes_the_connection_without_an_answer(emulator: EvervaultEmulator) -> None:
    emulator.set_fault("decrypt", drop=True)
    with pytest.raises(requests.ConnectionError):
        requests.post(
            emulator.url + "decrypt", json={"data": "x"}, headers=basic(emulator), timeout=5
        )


def test_faults_and_counters_over_http(emulator: EvervaultEmulator) -> None:
    base = emulator.url + "_emulator/"
    httpx.post(base + "faults", json={"path": "decrypt", "status": 503})
    assert (
        httpx.post(
            emulator.url + "decrypt", json={"data": "x"}, headers=basic(emulator)
        ).status_code
        == 503
    )
    httpx.delete(base + "faults")
    assert (
        httpx.post(
            emulator.url + "decrypt", json={"data": "x"}, headers=basic(emulator)
        ).status_code
        == 200
    )
    assert httpx.get(base + "stats").json() == {"decrypt": 2}
    httpx.post(base + "reset")
    assert httpx.get(base + "stats").json() == {}


def test_stop_and_start_on_the_same_port(emulator: EvervaultEmulator) -> None:
    url = emulator.url
    emulator.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "cages/key")
    emulator.start()
    assert emulator.url == url
    assert httpx.get(url + "cages/key", headers={"Api-Key": emulator.api_key}).status_code == 200
