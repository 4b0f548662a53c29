"""The evervault provider through the real SDK, against the Evervault API emulator."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import evervault
import evervault.crypto.client as sdk_crypto
import httpx
import pytest
from support import Served, headers, make_settings, serve_citadel, wait_until

from citadel.metrics import Metrics
from citadel.providers.evervault import EvervaultProvider
from evervault_emulator import EvervaultEmulator


def ev_settings(tmp_path: Path, emu: EvervaultEmulator, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "provider": "evervault",
        "evervault_app_id": emu.app_id,
        "evervault_api_key": emu.api_key,
        "evervault_api_url": emu.url,
        "evervault_timeout_s": 2,
        "breaker_reset_s": 0.2,
        "breaker_reset_max_s": 1,
        "rate_limit_per_caller": "100000/minute",
        "acl": {"sentinel": ["encrypt"], "conductor": ["decrypt"]},
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


@contextmanager
def ready_citadel(tmp_path: Path, emu: EvervaultEmulator, **overrides: Any) -> Iterator[Served]:
    with serve_citadel(ev_settings(tmp_path, emu, **overrides)) as served, served.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200)
        yield served


def encrypt(c: httpx.Client, plaintext: str = "binance-secret") -> str:
    r = c.post("/encrypt", json={"plaintext": plaintext}, headers=headers("sentinel"))
    assert r.status_code == 200, r.text
    ct: str = r.json()["encrypted_data"]
    return ct


def decrypt(c: httpx.Client, ciphertext: str) -> httpx.Response:
    return c.post("/decrypt", json={"encrypted_data": ciphertext}, headers=headers("conductor"))


@pytest.mark.parametrize("curve", ["SECP256K1", "SECP256R1"])
def test_round_trip_on_both_curves(tmp_path: Path, emulator: EvervaultEmulator, curve: str) -> None:
    with ready_citadel(tmp_path, emulator, evervault_curve=curve) as s, s.client() as c:
        ct = encrypt(c, "my_binance_api_key")
        assert ct.startswith("ev:" + ("RFVC" if curve == "SECP256K1" else "Tk9D") + ":")
        r = decrypt(c, ct)
    assert r.status_code == 200
    assert r.json() == {"plaintext": "my_binance_api_key"}
    assert s.audit.events()[-1]["ct_fp"]


def test_ciphertext_decrypts_in_the_emulator_without_citadel(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    with ready_citadel(tmp_path, emulator) as s, s.client() as c:
        ct = encrypt(c, "independent")
    auth = base64.b64encode(f"{emulator.app_id}:{emulator.api_key}".encode()).decode()
    r = httpx.post(
        emulator.url + "decrypt", json={"data": ct}, headers={"Authorization": f"Basic {auth}"}
    )
    assert r.json() == {"data": "independent"}


def test_no_upstream_call_per_encrypt_after_start_up(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    with ready_citadel(tmp_path, emulator) as s, s.client() as c:
        before = (emulator.calls("cages/key"), emulator.calls("decrypt"))
        for i in range(50):
            encrypt(c, f"secret-{i}")
        after = (emulator.calls("cages/key"), emulator.calls("decrypt"))
    assert before == after == (1, 0)


def test_malformed_ciphertext_is_400_without_an_upstream_call(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    with ready_citadel(tmp_path, emulator) as s, s.client() as c:
        for bad in ("ev:RFVC:short:$", "cit1:00000000:AAAA", "ev:XXXX:a:b:c:$", "plain"):
            r = decrypt(c, bad)
            assert (r.status_code, r.json()["code"]) == (400, "invalid_ciphertext")
    assert emulator.calls("decrypt") == 0


def test_flood_of_undecryptable_ciphertexts_leaves_the_breaker_closed(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    with ready_citadel(tmp_path, emulator) as s, s.client() as c:
        good = encrypt(c)
        body = good.split(":")
        body[-2] = body[-2][:-4] + ("AAAA" if body[-2][-4:] != "AAAA" else "BBBB")
        tampered = ":".join(body)
        results = [decrypt(c, tampered).status_code for _ in range(20)]
        health = c.get("/health").json()
        assert decrypt(c, good).status_code == 200
    assert results == [400] * 20
    assert emulator.calls("decrypt") == 21
    assert health["breaker"] == "closed"


def test_five_500s_open_the_breaker_and_it_recovers(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    with ready_citadel(tmp_path, emulator, breaker_reset_s=0.3) as s, s.client() as c:
        ct = encrypt(c)
        emulator.set_fault("decrypt", status=500)
        failures = [decrypt(c, ct) for _ in range(5)]
        assert [r.status_code for r in failures] == [503] * 5
        assert all(r.json()["code"] == "provider_unavailable" for r in failures)
        assert all(int(r.headers["retry-after"]) >= 1 for r in failures)
        assert emulator.calls("decrypt") == 5
        assert c.get("/health").json() | {"version": "-"} == {
            "status": "degraded",
            "service": "citadel",
            "version": "-",
            "provider": "evervault",
            "breaker": "open",
            "decrypt_providers": ["evervault"],
        }
        assert c.get("/ready").status_code == 503
        sixth = decrypt(c, ct)
        assert sixth.status_code == 503
        assert emulator.calls("decrypt") == 5  # failed fast, never reached Evervault
        assert encrypt(c, "encrypt still works").startswith("ev:")
        assert 'citadel_breaker_state{provider="evervault"} 2.0' in c.get("/metrics").text
        emulator.clear_faults()
        wait_until(lambda: decrypt(c, ct).status_code == 200, timeout=5)
        assert c.get("/health").json()["breaker"] == "closed"
        assert c.get("/ready").status_code == 200
        metrics = c.get("/metrics").text
    assert 'citadel_breaker_state{provider="evervault"} 0.0' in metrics
    assert 'outcome="failure",provider="evervault"} 5.0' in metrics
    assert 'outcome="rejected",provider="evervault"}' in metrics


def test_dropped_connections_count_as_failures(tmp_path: Path, emulator: EvervaultEmulator) -> None:
    with (
        ready_citadel(tmp_path, emulator, breaker_fail_max=2, breaker_reset_s=30) as s,
        s.client() as c,
    ):
        ct = encrypt(c)
        emulator.set_fault("decrypt", drop=True)
        assert [decrypt(c, ct).status_code for _ in range(3)] == [503, 503, 503]
        assert c.get("/health").json()["breaker"] == "open"
    assert emulator.calls("decrypt") == 2


def test_upstream_rate_limit_passes_retry_after_and_does_not_count(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    with ready_citadel(tmp_path, emulator, breaker_fail_max=2) as s, s.client() as c:
        ct = encrypt(c)
        emulator.set_fault("decrypt", status=429, retry_after=7)
        responses = [decrypt(c, ct) for _ in range(4)]
        health = c.get("/health").json()
    assert [r.status_code for r in responses] == [503] * 4
    assert {r.headers["retry-after"] for r in responses} == {"7"}
    assert health["breaker"] == "closed"


def test_slow_upstream_gives_503_within_the_timeout(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    # Upstream would answer after a minute; Citadel's 0.5 s timeout must answer first.
    # The bound is the test client's own 10 s timeout: without Citadel's timeout the
    # call waits for the upstream and fails with httpx.ReadTimeout, however fast or
    # busy the machine, and no elapsed time is compared.
    with ready_citadel(tmp_path, emulator, evervault_timeout_s=0.5) as s, s.client() as c:
        ct = encrypt(c)
        emulator.set_fault("decrypt", latency_ms=60_000)
        r = decrypt(c, ct)
        health = c.get("/health").json()
    assert (r.status_code, r.json()["code"]) == (503, "provider_unavailable")
    assert "retry-after" in r.headers
    assert emulator.calls("decrypt") >= 1  # it did reach the upstream, then gave up
    assert health["breaker"] == "closed"  # one timeout is one failure, below the threshold


def test_start_up_with_upstream_down_then_recovery(tmp_path: Path) -> None:
    emu = EvervaultEmulator()
    emu.start()
    emu.stop()  # a known port with nothing behind it
    settings = ev_settings(tmp_path, emu)
    with serve_citadel(settings) as s, s.client() as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health").json()["status"] == "degraded"
        assert c.get("/ready").status_code == 503
        r = c.post("/encrypt", json={"plaintext": "x"}, headers=headers("sentinel"))
        assert (r.status_code, r.json()["code"]) == (503, "provider_unavailable")
        assert "retry-after" in r.headers
        emu.start()
        try:
            wait_until(lambda: c.get("/ready").status_code == 200, timeout=15)
            ct = encrypt(c)
            assert decrypt(c, ct).json() == {"plaintext": "binance-secret"}
        finally:
            emu.stop()


def test_wrong_credentials_show_as_not_ready_and_name_the_problem(
    tmp_path: Path, emulator: EvervaultEmulator, capfd: pytest.CaptureFixture[str]
) -> None:
    from citadel.logs import configure_logging

    wrong = "ev:key:CANARY-WRONG-KEY-0001"
    settings = ev_settings(tmp_path, emulator, evervault_api_key=wrong)
    configure_logging(settings)
    seen: list[str] = []

    def logged() -> bool:
        seen.append(capfd.readouterr().out)
        return "evervault_key_fetch_failed" in "".join(seen)

    with serve_citadel(settings) as s, s.client() as c:
        wait_until(logged, timeout=5)
        assert c.get("/ready").status_code == 503
    out = "".join(seen)
    assert "EVERVAULT_APP_ID / EVERVAULT_API_KEY rejected" in out
    assert "CANARY-WRONG-KEY" not in out


def test_sdk_encrypt_is_safe_under_concurrent_re_derivation(
    emulator: EvervaultEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 threads, 10,000 encryptions, a fresh ephemeral key on every call: all decrypt."""
    monkeypatch.setattr(sdk_crypto, "KEY_INTERVAL", -1)
    settings = ev_settings(Path("/nonexistent"), emulator)
    provider = EvervaultProvider.from_settings(settings, Metrics())
    assert provider._warm_up() is None  # fetch the app key, as start-up does
    threads, per_thread = 8, 1250
    results: list[list[tuple[str, str]]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads)

    def work(n: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            plaintext = f"t{n}-{i}"
            results[n].append((plaintext, provider.encrypt_sync(plaintext)))

    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    pairs = [pair for chunk in results for pair in chunk]
    assert len(pairs) == 10_000
    assert len({ct.split(":")[3] for _, ct in pairs}) > 1000  # many ephemeral keys were used
    auth = base64.b64encode(f"{emulator.app_id}:{emulator.api_key}".encode()).decode()
    with httpx.Client(headers={"Authorization": f"Basic {auth}"}, timeout=60) as client:
        for start in range(0, len(pairs), 1000):
            batch = pairs[start : start + 1000]
            r = client.post(emulator.url + "decrypt", json={"data": [ct for _, ct in batch]})
            assert r.status_code == 200, r.text
            assert r.json()["data"] == [p for p, _ in batch]


def test_the_unguarded_sdk_pairs_one_calls_key_with_anothers_header(
    emulator: EvervaultEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the lock exists: the SDK's race, reproduced deterministically in one thread.

    Another encryption that re-derives the key is run at the exact moment the
    first has read ``shared_key`` but not yet ``compressed_public_key``, as a
    second thread could. The first ciphertext then names the second's
    ephemeral key: nobody can decrypt it.
    """
    client = evervault.Client(
        app_uuid=emulator.app_id, api_key=emulator.api_key, base_url=emulator.url
    )
    client.encrypt("warm-up", None)
    monkeypatch.setattr(sdk_crypto, "KEY_INTERVAL", -1)
    real_aesgcm = sdk_crypto.AESGCM
    interleaved: list[str] = []
    started = []

    def aesgcm_then_interleave(key: bytes) -> Any:
        cipher = real_aesgcm(key)
        if not started:
            started.append(True)
            interleaved.append(client.encrypt("the other thread", None))
        return cipher

    monkeypatch.setattr(sdk_crypto, "AESGCM", aesgcm_then_interleave)
    broken = client.encrypt("lost forever", None)
    monkeypatch.setattr(sdk_crypto, "AESGCM", real_aesgcm)
    auth = base64.b64encode(f"{emulator.app_id}:{emulator.api_key}".encode()).decode()
    r = httpx.post(
        emulator.url + "decrypt", json={"data": broken}, headers={"Authorization": f"Basic {auth}"}
    )
    assert r.status_code == 422
    assert broken.split(":")[3] == interleaved[0].split(":")[3]  # the other call's header


def test_no_canary_on_evervault_error_paths(
    tmp_path: Path, emulator: EvervaultEmulator, capfd: pytest.CaptureFixture[str]
) -> None:
    from citadel.logs import configure_logging

    canary = "CANARY-EV-PLAINTEXT-31"
    settings = ev_settings(
        tmp_path, emulator, breaker_fail_max=2, breaker_reset_s=30, log_level="debug"
    )
    configure_logging(settings)
    with serve_citadel(settings) as s, s.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200)
        ct = encrypt(c, canary)
        responses = []
        for status in (422, 500, 500, None):
            if status:
                emulator.set_fault("decrypt", status=status, count=1)
            responses.append(decrypt(c, ct))
        emulator.set_fault("decrypt", drop=True)
        metrics = c.get("/metrics").text
        audit = s.audit.text()
    out, err = capfd.readouterr()
    assert [r.status_code for r in responses] == [400, 503, 503, 503]
    for text in ("\n".join(r.text for r in responses), audit, metrics, out, err):
        assert canary not in text
