"""The Evervault API emulator itself, through the real SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import base64
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import evervault
import httpx
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from evervault.crypto.curves.koblitz import KoblitzPublicKey
from evervault.crypto.curves.p256 import P256PublicKey
from evervault.errors.evervault_errors import EvervaultError

from evervault_emulator import AppKeys, EvervaultEmulator
from evervault_emulator.crypto import sdk_spki

CURVES = ["SECP256K1", "SECP256R1"]
VALUES: list[Any] = [
    "api-key-123",
    "",
    "ünïcødé ✓",
    "with:colons:$",
    42,
    -7,
    0,
    10**20,
    3.25,
    -0.5,
    True,
    False,
    {"a": ["x", 1, {"b": True, "c": 2.5}], "d": {"e": "f"}},
    ["one", 2, False, ["nested"]],
]
ROOT = Path(__file__).resolve().parents[2]


def sdk(emu: EvervaultEmulator, curve: str = "SECP256K1", **kw: Any) -> evervault.Client:
    return evervault.Client(
        app_uuid=emu.app_id, api_key=kw.get("api_key", emu.api_key), base_url=emu.url, curve=curve
    )


def basic(emu: EvervaultEmulator) -> dict[str, str]:
    token = base64.b64encode(f"{emu.app_id}:{emu.api_key}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def raw_decrypt(emu: EvervaultEmulator, data: Any) -> httpx.Response:
    return httpx.post(emu.url + "decrypt", json={"data": data}, headers=basic(emu))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def emu() -> Iterator[EvervaultEmulator]:
    with EvervaultEmulator() as emulator:
        yield emulator


# -- keys and cryptography -----------------------------------------------------------------


def test_cages_key_serves_both_public_keys_as_the_sdk_decodes_them(emu: EvervaultEmulator) -> None:
    r = httpx.get(emu.url + "cages/key", headers={"Api-Key": emu.api_key})
    assert r.status_code == 200
    body = r.json()
    for field, curve in (("ecdhKey", ec.SECP256K1()), ("ecdhP256Key", ec.SECP256R1())):
        point = base64.b64decode(body[field])
        key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        assert key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint) == point


@pytest.mark.parametrize("curve", CURVES)
def test_precomputed_spki_matches_the_sdks_pyasn1_encoding(curve: str) -> None:
    cls = P256PublicKey if curve == "SECP256R1" else KoblitzPublicKey
    curve_cls = ec.SECP256R1 if curve == "SECP256R1" else ec.SECP256K1
    for _ in range(20):
        point = (
            ec.generate_private_key(curve_cls())
            .public_key()
            .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        )
        assert sdk_spki(curve, point) == cls(point.hex()).encode()


@pytest.mark.parametrize("curve", CURVES)
@pytest.mark.parametrize("value", VALUES, ids=[repr(v)[:14] for v in VALUES])
def test_sdk_round_trip(emu: EvervaultEmulator, curve: str, value: Any) -> None:
    client = sdk(emu, curve)
    ciphertext = client.encrypt(value, None)
    assert ciphertext != value
    result = client.decrypt(ciphertext)
    assert result == value
    assert type(result) is type(value)


@pytest.mark.parametrize("curve", CURVES)
def test_ciphertexts_carry_the_sdk_versions_and_types(emu: EvervaultEmulator, curve: str) -> None:
    client = sdk(emu, curve)
    plain, role = ("RFVC", "S0lS") if curve == "SECP256K1" else ("Tk9D", "QkTC")
    assert client.encrypt("s", None).startswith(f"ev:{plain}:")
    assert client.encrypt(1, None).startswith(f"ev:{plain}:number:")
    assert client.encrypt(True, None).startswith(f"ev:{plain}:boolean:")
    assert client.encrypt("s", "role").startswith(f"ev:{role}:")


@pytest.mark.parametrize("curve", CURVES)
@pytest.mark.parametrize("value", ["with role", 12, 1.5, True], ids=repr)
def test_data_role_ciphertexts_decrypt(emu: EvervaultEmulator, curve: str, value: Any) -> None:
    # A fresh client derives its key for the role; the second one reuses the key it derived
    # for a role-less call (the SDK caches it for 15 s whatever the role).
    fresh = sdk(emu, curve)
    assert fresh.decrypt(fresh.encrypt(value, "my-role")) == value
    warmed = sdk(emu, curve)
    warmed.encrypt("no role first", None)
    assert warmed.decrypt(warmed.encrypt(value, "my-role")) == value


def test_plain_values_come_back_unchanged_next_to_ciphertexts(emu: EvervaultEmulator) -> None:
    client = sdk(emu)
    data = {"ct": client.encrypt("secret", None), "plain": "hello", "n": 3, "none": None}
    r = raw_decrypt(emu, data)
    assert r.status_code == 200
    assert r.json() == {"data": {"ct": "secret", "plain": "hello", "n": 3, "none": None}}


# -- what cannot be decrypted ------------------------------------------------------------------


def _tamper(ciphertext: str, index: int) -> str:
    parts = ciphertext.split(":")
    field = parts[index]
    parts[index] = ("A" if field[0] != "A" else "B") + field[1:]
    return ":".join(parts)


@pytest.mark.parametrize("curve", CURVES)
@pytest.mark.parametrize("field", [-2, -3, -4], ids=["body", "ephemeral-key", "iv"])
def test_tampered_ciphertext_is_422(emu: EvervaultEmulator, curve: str, field: int) -> None:
    client = sdk(emu, curve)
    tampered = _tamper(client.encrypt("secret", None), field)
    r = raw_decrypt(emu, tampered)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json() == {
        "status": 422,
        "code": "unable-to-decrypt",
        "title": "Unable to decrypt",
        "detail": "Unable to decrypt data",
    }
    with pytest.raises(EvervaultError):
        client.decrypt(tampered)


@pytest.mark.parametrize(
    "garbage",
    [
        "ev:RFVC:!!!!:AAAA:AAAA:$",  # bad base64
        "ev:XXXX:AAAAAAAAAAAAAAAA:AAAA:AAAA:$",  # unknown version
        "ev:RFVC:AAAAAAAAAAAAAAAA:AAAA:AAAA",  # no terminator
        "ev:",
        "ev:RFVC:date:AAAAAAAAAAAAAAAA:AAAA:AAAA:$",  # unknown type
    ],
)
def test_malformed_ciphertext_is_422(emu: EvervaultEmulator, garbage: str) -> None:
    assert raw_decrypt(emu, garbage).status_code == 422
    assert raw_decrypt(emu, {"deep": [garbage]}).status_code == 422


def test_one_bad_value_fails_the_whole_request(emu: EvervaultEmulator) -> None:
    good = sdk(emu).encrypt("fine", None)
    assert raw_decrypt(emu, [good, _tamper(good, -2)]).status_code == 422


@pytest.mark.parametrize("curve", CURVES)
def test_ciphertext_of_another_app_is_422(emu: EvervaultEmulator, curve: str) -> None:
    with EvervaultEmulator() as other:
        foreign = sdk(other, curve).encrypt("elsewhere", None)
        assert raw_decrypt(other, foreign).json() == {"data": "elsewhere"}
    assert raw_decrypt(emu, foreign).status_code == 422


def test_non_json_body_is_400(emu: EvervaultEmulator) -> None:
    r = httpx.post(emu.url + "decrypt", content=b"not json", headers=basic(emu))
    assert r.status_code == 400
    r = httpx.post(emu.url + "decrypt", json={"no": "data"}, headers=basic(emu))
    assert r.status_code == 400


# -- credentials ---------------------------------------------------------------------------------


def test_wrong_or_missing_credentials_are_401(emu: EvervaultEmulator) -> None:
    key_url = emu.url + "cages/key"
    assert httpx.get(key_url, headers={"Api-Key": "wrong"}).status_code == 401
    assert httpx.get(key_url).status_code == 401
    other_app = base64.b64encode(f"app_other:{emu.api_key}".encode()).decode()
    for headers in ({"Authorization": "Basic eDp5"}, {"Authorization": f"Basic {other_app}"}, {}):
        r = httpx.post(emu.url + "decrypt", json={"data": "x"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["code"] == "unauthorized"
    # the Api-Key header is not enough for /decrypt
    r = httpx.post(emu.url + "decrypt", json={"data": "x"}, headers={"Api-Key": emu.api_key})
    assert r.status_code == 401


def test_sdk_with_a_wrong_api_key_is_refused(emu: EvervaultEmulator) -> None:
    with pytest.raises(EvervaultError):
        sdk(emu, api_key="wrong").encrypt("x", None)
    good = sdk(emu).encrypt("x", None)
    with pytest.raises(EvervaultError):
        sdk(emu, api_key="wrong").decrypt(good)


def test_fixed_port_app_id_api_key_and_keys() -> None:
    port = free_port()
    keys = AppKeys()
    with EvervaultEmulator(port=port, app_id="app_fixed", api_key="ev:key:1:fixed", keys=keys) as a:
        assert (a.url, a.app_id, a.api_key) == (
            f"http://127.0.0.1:{port}/",
            "app_fixed",
            "ev:key:1:fixed",
        )
        ciphertext = sdk(a, "SECP256R1").encrypt("shared keys", None)
    # another emulator given the same keys (e.g. from a PEM file) opens the same ciphertexts
    with EvervaultEmulator(keys=AppKeys.from_pem(keys.to_pem())) as b:
        assert sdk(b).decrypt(ciphertext) == "shared keys"


# -- faults -----------------------------------------------------------------------------------------


def test_status_fault_for_a_count_then_normal(emu: EvervaultEmulator) -> None:
    client = sdk(emu)
    ciphertext = client.encrypt("x", None)
    emu.set_fault("decrypt", status=500, count=2)
    for _ in range(2):
        with pytest.raises(EvervaultError):
            client.decrypt(ciphertext)
    assert client.decrypt(ciphertext) == "x"
    assert emu.calls("decrypt") == 3
    assert emu.faults() == {}


def test_status_fault_until_cleared(emu: EvervaultEmulator) -> None:
    emu.set_fault("/decrypt", status=503)
    for _ in range(5):
        assert raw_decrypt(emu, "x").status_code == 503
    emu.clear_faults()
    assert raw_decrypt(emu, "x").status_code == 200


def test_429_carries_retry_after(emu: EvervaultEmulator) -> None:
    emu.set_fault("decrypt", status=429, retry_after=7)
    r = requests.post(emu.url + "decrypt", json={"data": "x"}, headers=basic(emu), timeout=5)
    assert (r.status_code, r.headers["Retry-After"]) == (429, "7")
    assert r.json()["status"] == 429
    emu.set_fault("decrypt", status=429)
    assert raw_decrypt(emu, "x").headers["retry-after"] == "1"


def test_latency_fault_delays_a_normal_answer(emu: EvervaultEmulator) -> None:
    ciphertext = sdk(emu).encrypt("slow", None)
    emu.set_fault("decrypt", latency_ms=300)
    start = time.monotonic()
    # The client's timeout is the bound: a delay taken as seconds instead of
    # milliseconds (300 s) never answers within it and fails the test.
    r = httpx.post(emu.url + "decrypt", json={"data": ciphertext}, headers=basic(emu), timeout=30)
    elapsed = time.monotonic() - start
    assert r.status_code == 200
    assert r.json() == {"data": "slow"}
    # A lower bound only: a busy machine can make the answer later, never earlier.
    assert elapsed >= 0.3
    assert emu.calls("decrypt") == 1


def test_latency_and_status_together(emu: EvervaultEmulator) -> None:
    emu.set_fault("cages/key", latency_ms=200, status=502, count=1)
    start = time.monotonic()
    r = httpx.get(emu.url + "cages/key", headers={"Api-Key": emu.api_key})
    assert r.status_code == 502
    assert time.monotonic() - start >= 0.2


def test_drop_fault_closes_the_connection_without_an_answer(emu: EvervaultEmulator) -> None:
    emu.set_fault("decrypt", drop=True, count=1)
    with pytest.raises(requests.ConnectionError):
        requests.post(emu.url + "decrypt", json={"data": "x"}, headers=basic(emu), timeout=5)
    # through the SDK too, on a keep-alive connection it already holds
    client = sdk(emu)
    ciphertext = client.encrypt("x", None)
    emu.set_fault("decrypt", drop=True)
    with pytest.raises(requests.ConnectionError):
        client.decrypt(ciphertext)
    emu.clear_faults()
    assert client.decrypt(ciphertext) == "x"
    assert emu.calls("decrypt") == 3


def test_latency_does_not_block_other_connections(emu: EvervaultEmulator) -> None:
    """64 requests on 64 connections all reach the emulator while every one is still delayed.

    Checked by order of events, not by elapsed time: with a minute of latency, all
    64 requests must be counted by the emulator before any answer arrives. An
    emulator whose delay held up other connections (a blocking sleep, one
    connection at a time) would count one and stall, and the bounded wait fails.
    """
    emu.set_fault("decrypt", latency_ms=60_000, count=64)
    answered: list[int] = []

    async def load() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, headers=basic(emu), timeout=120) as client:

            async def one() -> None:
                r = await client.post(emu.url + "decrypt", json={"data": "x"})
                answered.append(r.status_code)

            tasks = [asyncio.create_task(one()) for _ in range(64)]
            deadline = time.monotonic() + 20  # a bound for a failing run, not a timing
            while emu.calls("decrypt") < 64:
                assert time.monotonic() < deadline, f"only {emu.calls('decrypt')} of 64 arrived"
                await asyncio.sleep(0.01)
            assert answered == []  # all 64 are in flight at once
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(load())
    assert emu.faults() == {}  # the fault was for 64 calls


def test_delayed_requests_on_keep_alive_connections_all_answer(emu: EvervaultEmulator) -> None:
    """128 delayed requests over 64 keep-alive connections: each is answered, each counted once."""
    ciphertext = sdk(emu).encrypt("x", None)
    emu.set_fault("decrypt", latency_ms=50)

    async def load() -> list[int]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, headers=basic(emu), timeout=60) as client:

            async def one() -> int:
                r = await client.post(emu.url + "decrypt", json={"data": ciphertext})
                return r.status_code

            return await asyncio.gather(*(one() for _ in range(128)))

    assert asyncio.run(load()) == [200] * 128
    assert emu.calls("decrypt") == 128


def test_invalid_faults_are_refused(emu: EvervaultEmulator) -> None:
    with pytest.raises(ValueError):
        emu.set_fault("decrypt", count=0)
    with pytest.raises(ValueError):
        emu.set_fault("decrypt", status=99)
    with pytest.raises(ValueError):
        emu.set_fault("decrypt", latency_ms=-1)
    base = emu.url + "_emulator/faults"
    for bad in ({"path": "decrypt", "status": "500"}, {"path": "decrypt", "nope": 1}, [1]):
        r = httpx.post(base, json=bad)
        assert r.status_code == 400, bad
    assert httpx.post(base, content=b"{not json").status_code == 400
    assert emu.faults() == {}


# -- counters and control over HTTP ---------------------------------------------------------------


def test_counters_count_every_request_that_reached_the_path(emu: EvervaultEmulator) -> None:
    assert emu.stats() == {"cages/key": 0, "decrypt": 0}
    client = sdk(emu)
    ciphertext = client.encrypt("x", None)  # one key fetch
    client.encrypt("y", None)  # cached key: no fetch
    emu.set_fault("decrypt", status=500, count=1)
    with pytest.raises(EvervaultError):
        client.decrypt(ciphertext)
    client.decrypt(ciphertext)
    httpx.post(emu.url + "decrypt", json={"data": "x"})  # 401 still reached the path
    assert (emu.calls("cages/key"), emu.calls("decrypt")) == (1, 3)
    assert emu.stats() == {"cages/key": 1, "decrypt": 3}
    emu.reset()
    assert emu.stats() == {"cages/key": 0, "decrypt": 0}


def test_faults_and_counters_over_http(emu: EvervaultEmulator) -> None:
    base = emu.url + "_emulator/"
    r = httpx.post(base + "faults", json={"path": "decrypt", "status": 503, "count": None})
    assert r.status_code == 200
    assert r.json()["decrypt"]["status"] == 503
    assert httpx.get(base + "faults").json()["decrypt"]["count"] is None
    assert raw_decrypt(emu, "x").status_code == 503
    assert httpx.delete(base + "faults").status_code == 200
    assert raw_decrypt(emu, "x").status_code == 200
    httpx.post(base + "faults", json={"path": "cages/key", "latency_ms": 1, "count": 2})
    assert emu.faults()["cages/key"].count == 2
    assert httpx.get(base + "stats").json() == {"cages/key": 0, "decrypt": 2}
    info = httpx.get(emu.url + "_emulator").json()
    assert info["app_id"] == emu.app_id
    assert set(info["keys"]) == {"ecdhKey", "ecdhP256Key"}
    assert httpx.post(base + "reset").status_code == 200
    assert httpx.get(base + "stats").json() == {"cages/key": 0, "decrypt": 0}
    assert httpx.get(base + "faults").json() == {}


def test_drop_and_429_over_http(emu: EvervaultEmulator) -> None:
    base = emu.url + "_emulator/"
    httpx.post(base + "faults", json={"path": "decrypt", "drop": True, "count": 1})
    with pytest.raises(requests.ConnectionError):
        requests.post(emu.url + "decrypt", json={"data": "x"}, headers=basic(emu), timeout=5)
    httpx.post(base + "faults", json={"path": "decrypt", "status": 429, "retry_after": 9})
    r = requests.post(emu.url + "decrypt", json={"data": "x"}, headers=basic(emu), timeout=5)
    assert (r.status_code, r.headers["Retry-After"]) == (429, "9")


# -- HTTP details ---------------------------------------------------------------------------------


def test_chunked_body_and_unknown_routes(emu: EvervaultEmulator) -> None:
    ciphertext = sdk(emu).encrypt("chunked", None).encode()

    def body() -> Iterator[bytes]:
        yield b'{"data": "'
        yield ciphertext
        yield b'"}'

    r = httpx.post(emu.url + "decrypt", content=body(), headers=basic(emu))
    assert r.json() == {"data": "chunked"}
    assert httpx.get(emu.url + "nope").status_code == 404
    assert httpx.get(emu.url + "decrypt", headers=basic(emu)).status_code == 405


def test_malformed_request_line_is_400(emu: EvervaultEmulator) -> None:
    with socket.create_connection(("127.0.0.1", emu.port), timeout=5) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.1 400 ")


# -- lifecycle ------------------------------------------------------------------------------------


def test_stop_and_start_on_the_same_port(emu: EvervaultEmulator) -> None:
    url = emu.url
    client = sdk(emu, "SECP256R1")
    ciphertext = client.encrypt("survives a restart", None)
    emu.stop()
    assert not emu.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "cages/key")
    with pytest.raises(requests.ConnectionError):  # the SDK does not wrap transport errors
        sdk(emu).encrypt("no key while down", None)
    with pytest.raises(requests.ConnectionError):
        client.decrypt(ciphertext)
    emu.start()
    assert emu.running
    assert emu.url == url
    assert httpx.get(url + "cages/key", headers={"Api-Key": emu.api_key}).status_code == 200
    assert client.decrypt(ciphertext) == "survives a restart"
    emu.stop()
    emu.stop()  # idempotent


def test_start_up_with_the_upstream_down_then_recovery() -> None:
    emu = EvervaultEmulator()
    emu.start()
    emu.stop()  # a known port with nothing behind it
    client = sdk(emu)
    with pytest.raises(requests.ConnectionError):
        client.encrypt("x", None)
    with emu:
        assert client.decrypt(client.encrypt("x", None)) == "x"


def test_command_line(tmp_path: Path) -> None:
    port = free_port()
    keys_file = tmp_path / "keys.pem"
    argv = [sys.executable, "-m", "evervault_emulator", "--port", str(port)]
    argv += ["--app-id", "app_cli", "--api-key", "ev:key:1:cli", "--keys-file", str(keys_file)]
    ciphertext = ""
    for _ in range(2):  # the second run reads the keys the first one wrote
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            url = f"http://127.0.0.1:{port}/"
            assert url in line and "app_cli" in line and "ev:key:1:cli" in line
            client = evervault.Client(app_uuid="app_cli", api_key="ev:key:1:cli", base_url=url)
            ciphertext = ciphertext or client.encrypt("persisted", None)
            assert client.decrypt(ciphertext) == "persisted"
        finally:
            proc.terminate()
            assert proc.wait(10) == 0
    assert keys_file.stat().st_mode & 0o777 == 0o600
