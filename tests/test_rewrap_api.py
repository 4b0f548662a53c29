"""``POST /rewrap`` (issue 10) over real HTTP: rotation, retirement, and local <-> evervault.

The keyring is changed the way an operator changes it (``citadel.keyring``'s
functions, or ``citadel keyring`` as a process) while Citadel runs; the test
then waits, bounded, for the server's watcher to pick the change up (the
contract gives it 2 seconds), never for a fixed time.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import KEYS, Served, make_settings, run, serve_citadel, wait_until

from citadel.keyring import change_keyring, create_keyring, load_keyring, rotate_keyring
from evervault_emulator import EvervaultEmulator

MIGRATOR_KEY = "migrator-key-" + "e" * 40
API_KEYS = {**{caller: [key] for caller, key in KEYS.items()}, "migrator": [MIGRATOR_KEY]}
ACL = {"sentinel": ["encrypt"], "conductor": ["decrypt"], "migrator": ["rewrap"]}
SECRET = "binance-api-secret-Zx81"


def h(caller: str) -> dict[str, str]:
    return {"X-Internal-API-Key": MIGRATOR_KEY if caller == "migrator" else KEYS[caller]}


def settings_for(tmp_path: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "api_keys": API_KEYS,
        "acl": ACL,
        "rate_limit_per_caller": "100000/minute",
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


def encrypt(c: httpx.Client, plaintext: str = SECRET) -> str:
    r = c.post("/encrypt", json={"plaintext": plaintext}, headers=h("sentinel"))
    assert r.status_code == 200, r.text
    ct: str = r.json()["encrypted_data"]
    return ct


def decrypt(c: httpx.Client, ct: str) -> httpx.Response:
    return c.post("/decrypt", json={"encrypted_data": ct}, headers=h("conductor"))


def rewrap(c: httpx.Client, ct: str, caller: str = "migrator", **hdrs: str) -> httpx.Response:
    extra = {k.replace("_", "-"): v for k, v in hdrs.items()}
    return c.post("/rewrap", json={"encrypted_data": ct}, headers={**h(caller), **extra})


def key_id(ct: str) -> str:
    assert ct.startswith("cit1:")
    return ct.split(":")[1]


def fp(ct: str) -> str:
    return hashlib.sha256(ct.encode()).hexdigest()[:16]


def wait_for_active(c: httpx.Client, kid: str) -> None:
    """Until the server encrypts under ``kid`` (its watcher reloads within ~2 s)."""
    wait_until(lambda: key_id(encrypt(c, "probe")) == kid, timeout=10, interval=0.1)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    settings = settings_for(tmp_path)
    with serve_citadel(settings) as s:
        yield s, settings.local_keyring


# -- within the local provider --------------------------------------------------------------------


def test_rewrap_after_rotation_is_under_the_new_active_key(local: tuple[Served, Path]) -> None:
    served, keyring = local
    with served.client() as c:
        old = encrypt(c)
        new_id = rotate_keyring(keyring)
        wait_for_active(c, new_id)
        r = rewrap(c, old)
        assert r.status_code == 200, r.text
        new = r.json()["encrypted_data"]
        back = decrypt(c, new)
    assert key_id(old) != new_id
    assert key_id(new) == new_id
    assert new != old
    assert back.json() == {"plaintext": SECRET}


def test_rewrap_after_add_then_activate_through_the_cli(
    local: tuple[Served, Path], tmp_path: Path
) -> None:
    served, keyring = local
    with served.client() as c:
        old = encrypt(c)
        added = run(["keyring", "add", "--path", str(keyring)], tmp_path)
        assert added.returncode == 0, added.stderr
        ring = load_keyring(keyring)
        (new_id,) = ring.ids - {ring.active}
        # Added, not active yet: rewrap still answers under the old active key.
        assert key_id(rewrap(c, old).json()["encrypted_data"]) == key_id(old)
        activated = run(["keyring", "activate", new_id, "--path", str(keyring)], tmp_path)
        assert activated.returncode == 0, activated.stderr
        wait_for_active(c, new_id)
        new = rewrap(c, old).json()["encrypted_data"]
        assert key_id(new) == new_id
        assert decrypt(c, new).json() == {"plaintext": SECRET}


def test_rewrap_of_a_ciphertext_already_under_the_active_key_is_a_fresh_one(
    local: tuple[Served, Path],
) -> None:
    served, _ = local
    with served.client() as c:
        ct = encrypt(c)
        new = rewrap(c, ct).json()["encrypted_data"]
        assert key_id(new) == key_id(ct)
        assert new != ct
        assert decrypt(c, new).json() == {"plaintext": SECRET}


def test_rewrap_response_holds_only_the_new_ciphertext(local: tuple[Served, Path]) -> None:
    served, _ = local
    with served.client() as c:
        r = rewrap(c, encrypt(c))
    assert r.status_code == 200
    assert set(r.json()) == {"encrypted_data"}
    assert SECRET not in r.text
    assert base64.b64encode(SECRET.encode()).decode()[:12] not in r.text
    assert r.headers["cache-control"] == "no-store"


def test_rewrap_audit_line_has_ct_fp_and_ct_fp_new(local: tuple[Served, Path]) -> None:
    served, _ = local
    with served.client() as c:
        old = encrypt(c)
        new = rewrap(c, old, X_Request_ID="rewrap-audit-1").json()["encrypted_data"]
    (event,) = [e for e in served.audit.events() if e["request_id"] == "rewrap-audit-1"]
    assert event["operation"] == "rewrap"
    assert event["requestor"] == "migrator"
    assert (event["success"], event["code"]) == (True, "ok")
    assert event["ct_fp"] == fp(old)
    assert event["ct_fp_new"] == fp(new)
    assert SECRET not in served.audit.text()


def test_rewrap_is_granted_to_no_one_by_default(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_keys=API_KEYS)
    with serve_citadel(settings) as s, s.client() as c:
        ct = encrypt(c)
        answers = {caller: rewrap(c, ct, caller) for caller in [*KEYS, "migrator"]}
    assert {k: (r.status_code, r.json()["code"]) for k, r in answers.items()} == dict.fromkeys(
        answers, (403, "forbidden")
    )


def test_decrypt_grant_does_not_imply_rewrap(local: tuple[Served, Path]) -> None:
    served, _ = local
    with served.client() as c:
        r = rewrap(c, encrypt(c), "conductor")
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")


def test_rewrap_of_a_retired_key_is_400_key_retired(local: tuple[Served, Path]) -> None:
    served, keyring = local
    with served.client() as c:
        old = encrypt(c)
        new_id = rotate_keyring(keyring)
        change_keyring(keyring, lambda ring: ring.retire(key_id(old)))
        wait_until(lambda: rewrap(c, old).status_code == 400, timeout=10, interval=0.1)
        r = rewrap(c, old, X_Request_ID="rewrap-retired")
        assert decrypt(c, old).json()["code"] == "key_retired"
        assert key_id(encrypt(c)) == new_id
    assert (r.status_code, r.json()["code"]) == (400, "key_retired")
    (event,) = [e for e in served.audit.events() if e["request_id"] == "rewrap-retired"]
    assert (event["code"], event["ct_fp"]) == ("key_retired", fp(old))


def test_restored_key_rewraps_again(local: tuple[Served, Path]) -> None:
    served, keyring = local
    with served.client() as c:
        old = encrypt(c)
        new_id = rotate_keyring(keyring)
        change_keyring(keyring, lambda ring: ring.retire(key_id(old)))
        wait_until(lambda: rewrap(c, old).status_code == 400, timeout=10, interval=0.1)
        change_keyring(keyring, lambda ring: ring.restore(key_id(old)))
        wait_until(lambda: rewrap(c, old).status_code == 200, timeout=10, interval=0.1)
        new = rewrap(c, old).json()["encrypted_data"]
    assert key_id(new) == new_id


@pytest.mark.parametrize(
    "ct",
    [
        "garbage",
        "cit1:0000000a:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "cit1:nothex!!:AAAA",
    ],
)
def test_rewrap_of_an_invalid_ciphertext_is_400(local: tuple[Served, Path], ct: str) -> None:
    served, _ = local
    with served.client() as c:
        r = rewrap(c, ct)
    assert (r.status_code, r.json()["code"]) == (400, "invalid_ciphertext")


def test_rewrap_of_a_tampered_ciphertext_is_400(local: tuple[Served, Path]) -> None:
    served, _ = local
    with served.client() as c:
        ct = encrypt(c)
        head, body = ct.rsplit(":", 1)
        r = rewrap(c, f"{head}:{body[:-3]}{'A' if body[-3] != 'A' else 'B'}{body[-2:]}")
    assert (r.status_code, r.json()["code"]) == (400, "invalid_ciphertext")


@pytest.mark.parametrize(
    "body",
    [{}, {"encrypted_data": ""}, {"encrypted_data": 5}, {"encrypted_data": "x", "plaintext": "y"}],
)
def test_rewrap_body_problems_are_422(local: tuple[Served, Path], body: dict[str, Any]) -> None:
    served, _ = local
    with served.client() as c:
        r = c.post("/rewrap", json=body, headers=h("migrator"))
    assert (r.status_code, r.json()["code"]) == (422, "invalid_request")


def test_rewrap_counts_the_old_key_in_keyring_decrypts_metric(local: tuple[Served, Path]) -> None:
    served, keyring = local
    with served.client() as c:
        old = encrypt(c)
        new_id = rotate_keyring(keyring)
        wait_for_active(c, new_id)
        for _ in range(3):
            assert rewrap(c, old).status_code == 200
        metrics = c.get("/metrics").text
    assert f'citadel_keyring_decrypts_total{{key_id="{key_id(old)}"}} 3.0' in metrics


# -- between providers ----------------------------------------------------------------------------


def ev_values(emu: EvervaultEmulator) -> dict[str, Any]:
    return {
        "evervault_app_id": emu.app_id,
        "evervault_api_key": emu.api_key,
        "evervault_api_url": emu.url,
        "evervault_timeout_s": 2,
    }


def emulator_decrypt(emu: EvervaultEmulator, ct: str) -> httpx.Response:
    auth = base64.b64encode(f"{emu.app_id}:{emu.api_key}".encode()).decode()
    return httpx.post(
        emu.url + "decrypt", json={"data": ct}, headers={"Authorization": f"Basic {auth}"}
    )


def ready(served: Served) -> None:
    with served.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200, timeout=15)


def test_rewrap_from_local_to_evervault_decrypts_in_the_emulator(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    keyring = tmp_path / "keyring.json"
    assert create_keyring(keyring, origin="operator")
    with serve_citadel(settings_for(tmp_path)) as old_site, old_site.client() as c:
        local_ct = encrypt(c)
    assert local_ct.startswith("cit1:")
    settings = settings_for(
        tmp_path, provider="evervault", decrypt_providers_raw="local", **ev_values(emulator)
    )
    with serve_citadel(settings) as s, s.client() as c:
        ready(s)
        r = rewrap(c, local_ct, X_Request_ID="to-ev")
        assert r.status_code == 200, r.text
        ev_ct = r.json()["encrypted_data"]
        through_citadel = decrypt(c, ev_ct)
        still_local = decrypt(c, local_ct)
    assert ev_ct.startswith("ev:")
    assert through_citadel.json() == {"plaintext": SECRET}
    assert emulator_decrypt(emulator, ev_ct).json() == {"data": SECRET}
    assert still_local.json() == {"plaintext": SECRET}  # the old one still decrypts until retired
    (event,) = [e for e in s.audit.events() if e["request_id"] == "to-ev"]
    assert (event["ct_fp"], event["ct_fp_new"]) == (fp(local_ct), fp(ev_ct))


def test_rewrap_from_evervault_back_to_local(tmp_path: Path, emulator: EvervaultEmulator) -> None:
    ev_only = settings_for(tmp_path / "ev", provider="evervault", **ev_values(emulator))
    with serve_citadel(ev_only) as s, s.client() as c:
        ready(s)
        ev_ct = encrypt(c)
    assert ev_ct.startswith("ev:")
    keyring = tmp_path / "keyring.json"
    settings = settings_for(tmp_path, decrypt_providers_raw="evervault", **ev_values(emulator))
    with serve_citadel(settings) as s, s.client() as c:
        ready(s)
        before = emulator.calls("decrypt")
        r = rewrap(c, ev_ct)
        assert r.status_code == 200, r.text
        local_ct = r.json()["encrypted_data"]
        calls = emulator.calls("decrypt") - before
        back = decrypt(c, local_ct)
    assert key_id(local_ct) == load_keyring(keyring).active
    assert back.json() == {"plaintext": SECRET}
    assert calls == 1  # the ev: ciphertext was decrypted by Evervault, once


def test_round_trip_local_to_evervault_and_back_keeps_the_plaintext(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    keyring = tmp_path / "keyring.json"
    create_keyring(keyring, origin="operator")
    both = settings_for(tmp_path, decrypt_providers_raw="evervault", **ev_values(emulator))
    to_ev = settings_for(
        tmp_path, provider="evervault", decrypt_providers_raw="local", **ev_values(emulator)
    )
    with serve_citadel(both) as local_site, serve_citadel(to_ev) as ev_site:
        ready(local_site)
        ready(ev_site)
        with local_site.client() as lc, ev_site.client() as ec:
            start = encrypt(lc, "round-trip-secret")
            ev_ct = rewrap(ec, start).json()["encrypted_data"]
            back = rewrap(lc, ev_ct).json()["encrypted_data"]
            plain = decrypt(lc, back).json()
    assert ev_ct.startswith("ev:")
    assert key_id(back) == key_id(start)
    assert back != start
    assert plain == {"plaintext": "round-trip-secret"}


def test_rewrap_of_an_undecryptable_ev_ciphertext_is_400(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    keyring = tmp_path / "keyring.json"
    create_keyring(keyring, origin="operator")
    settings = settings_for(
        tmp_path, provider="evervault", decrypt_providers_raw="local", **ev_values(emulator)
    )
    with serve_citadel(settings) as s, s.client() as c:
        ready(s)
        ct = encrypt(c)
        emulator.set_fault("decrypt", status=422)
        r = rewrap(c, ct)
        health = c.get("/health").json()
    assert (r.status_code, r.json()["code"]) == (400, "invalid_ciphertext")
    assert health["breaker"] == "closed"


def test_rewrap_into_evervault_while_evervault_is_unreachable_is_503(tmp_path: Path) -> None:
    emu = EvervaultEmulator()
    emu.start()
    emu.stop()  # a known port with nothing behind it
    keyring = tmp_path / "keyring.json"
    create_keyring(keyring, origin="operator")
    with serve_citadel(settings_for(tmp_path)) as old_site, old_site.client() as c:
        local_ct = encrypt(c)
    settings = settings_for(
        tmp_path, provider="evervault", decrypt_providers_raw="local", **ev_values(emu)
    )
    with serve_citadel(settings) as s, s.client() as c:
        r = rewrap(c, local_ct)
        still_local = decrypt(c, local_ct)
    assert (r.status_code, r.json()["code"]) == (503, "provider_unavailable")
    assert int(r.headers["retry-after"]) >= 1
    assert SECRET not in r.text
    assert still_local.json() == {"plaintext": SECRET}


def test_no_plaintext_canary_on_any_rewrap_path(
    tmp_path: Path, emulator: EvervaultEmulator, capfd: pytest.CaptureFixture[str]
) -> None:
    from citadel.logs import configure_logging

    canary = "CANARYREWRAP5e6f7a"
    keyring = tmp_path / "keyring.json"
    create_keyring(keyring, origin="operator")
    settings = settings_for(
        tmp_path,
        provider="evervault",
        decrypt_providers_raw="local",
        log_level="debug",
        rate_limits={"alchemist": "1/minute"},
        acl={**ACL, "alchemist": ["rewrap"]},
        breaker_fail_max=1,
        breaker_reset_s=30,
        **ev_values(emulator),
    )
    with serve_citadel(settings_for(tmp_path)) as old_site, old_site.client() as c:
        local_ct = encrypt(c, canary)
        old_kid = key_id(local_ct)
    configure_logging(settings)
    with serve_citadel(settings) as s, s.client() as c:
        ready(s)
        ev_ct = rewrap(c, local_ct).json()["encrypted_data"]
        answers = [
            rewrap(c, ev_ct),  # ev: -> ev:, through Evervault's decrypt
            rewrap(c, local_ct, "conductor"),  # 403
            rewrap(c, local_ct, "alchemist"),
            rewrap(c, local_ct, "alchemist"),  # 429
        ]
        s.audit.fail = True
        answers.append(rewrap(c, ev_ct))  # 503: rewrapped, but the audit line cannot be written
        s.audit.fail = False
        emulator.set_fault("decrypt", status=500)
        answers.append(rewrap(c, ev_ct))  # 503, opens the breaker
        answers.append(rewrap(c, ev_ct))  # 503 at once
        emulator.clear_faults()
        rotate_keyring(keyring)
        change_keyring(keyring, lambda ring: ring.retire(old_kid))
        wait_until(lambda: rewrap(c, local_ct).status_code == 400, timeout=10, interval=0.1)
        answers.append(rewrap(c, local_ct))  # 400 key_retired
        metrics = c.get("/metrics").text
        audit = s.audit.text()
    out, err = capfd.readouterr()
    assert [r.status_code for r in answers] == [200, 403, 200, 429, 503, 503, 503, 400]
    assert [r.json()["code"] for r in answers[4:]] == ["provider_unavailable"] * 3 + ["key_retired"]
    forms = [canary, base64.b64encode(canary.encode()).decode()[:12], canary.encode().hex()]
    haystacks = {
        "responses": "\n".join(f"{r.headers}\n{r.text}" for r in answers),
        "audit": audit,
        "metrics": metrics,
        "stdout": out,
        "stderr": err,
    }
    for name, text in haystacks.items():
        for form in forms:
            assert form not in text, f"{form!r} in {name}"


def test_rewrap_of_a_ciphertext_under_a_key_this_server_has_not_seen_yet(
    local: tuple[Served, Path],
) -> None:
    """Another instance activated a key and encrypted under it: the unknown key id is re-read."""
    from citadel.providers.local import LocalProvider

    served, keyring = local
    with served.client() as c:
        encrypt(c)  # the server is up and serving under the first key
        new_id = rotate_keyring(keyring)
        other_instance = LocalProvider(load_keyring(keyring))
        ct = other_instance.encrypt_sync(SECRET)  # at once, before any watcher poll
        r = rewrap(c, ct)
    assert r.status_code == 200, r.text
    assert key_id(r.json()["encrypted_data"]) == new_id
    assert other_instance.decrypt_sync(r.json()["encrypted_data"]) == SECRET


def test_rewrap_requests_are_counted_by_operation_caller_and_code(
    local: tuple[Served, Path],
) -> None:
    served, _ = local
    with served.client() as c:
        assert rewrap(c, encrypt(c)).status_code == 200
        assert rewrap(c, "garbage").status_code == 400
        assert rewrap(c, "garbage", "conductor").status_code == 403
        metrics = c.get("/metrics").text
    for code in ("ok", "invalid_ciphertext"):
        assert (
            f'citadel_requests_total{{caller="migrator",code="{code}",operation="rewrap"}} 1.0'
            in metrics
        )
    assert (
        'citadel_requests_total{caller="conductor",code="forbidden",operation="rewrap"} 1.0'
        in metrics
    )
