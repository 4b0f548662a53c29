"""Batches (the contract's "Batches"), through real HTTP, on both providers."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import Served, headers, make_settings, serve_citadel, wait_until

from citadel.app import body_limits
from evervault_emulator import EvervaultEmulator

ACL = {"sentinel": ["encrypt"], "conductor": ["decrypt", "sign", "rewrap"]}
SECRETS = [f"exchange-secret-{i}" for i in range(5)]


def ev_values(emu: EvervaultEmulator) -> dict[str, Any]:
    return {
        "provider": "evervault",
        "evervault_app_id": emu.app_id,
        "evervault_api_key": emu.api_key,
        "evervault_api_url": emu.url,
        "evervault_timeout_s": 2,
    }


@pytest.fixture(params=["local", "evervault"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def emu() -> Iterator[EvervaultEmulator]:
    with EvervaultEmulator() as emulator:
        yield emulator


def start(tmp_path: Path, provider: str, emu: EvervaultEmulator, **overrides: Any) -> Any:
    values: dict[str, Any] = {"acl": ACL, "rate_limit_per_caller": "100000/minute"}
    if provider == "evervault":
        values.update(ev_values(emu))
    values.update(overrides)
    return serve_citadel(make_settings(tmp_path, **values))


@pytest.fixture
def served(tmp_path: Path, provider: str, emu: EvervaultEmulator) -> Iterator[Served]:
    with start(tmp_path, provider, emu) as s, s.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200, timeout=15)
        yield s


def post(c: httpx.Client, operation: str, body: Any, caller: str = "conductor", **h: str) -> Any:
    return c.post(f"/{operation}", json=body, headers=headers(caller, **h))


def encrypt_all(c: httpx.Client, plaintexts: list[str]) -> list[str]:
    r = post(c, "encrypt", {"batch": [{"plaintext": p} for p in plaintexts]}, "sentinel")
    assert r.status_code == 200, r.text
    return [item["encrypted_data"] for item in r.json()["batch"]]


def test_a_batch_encrypt_answers_in_order_and_every_ciphertext_decrypts(served: Served) -> None:
    with served.client() as c:
        cts = encrypt_all(c, SECRETS)
        r = post(c, "decrypt", {"batch": [{"encrypted_data": ct} for ct in cts]})
    assert r.status_code == 200
    assert r.json() == {"batch": [{"plaintext": p} for p in SECRETS]}
    assert r.headers["cache-control"] == "no-store"


def test_a_bad_item_fails_alone_and_the_others_decrypt(served: Served) -> None:
    with served.client() as c:
        cts = encrypt_all(c, SECRETS)
        items = [{"encrypted_data": ct} for ct in cts]
        items.insert(2, {"encrypted_data": cts[0][:-6] + "AAAAAA"})  # tampered
        items.insert(4, {"encrypted_data": "not-a-ciphertext"})
        r = post(c, "decrypt", {"batch": items})
    assert r.status_code == 200
    results = r.json()["batch"]
    assert [x.get("plaintext") for x in results] == [
        SECRETS[0],
        SECRETS[1],
        None,
        SECRETS[2],
        None,
        SECRETS[3],
        SECRETS[4],
    ]
    for bad in (results[2], results[4]):
        assert bad["error"]["code"] == "invalid_ciphertext"
        assert set(bad) == {"error"} and set(bad["error"]) == {"code", "detail"}


def test_a_batch_rewrap_returns_new_ciphertexts_of_the_same_plaintexts(served: Served) -> None:
    with served.client() as c:
        cts = encrypt_all(c, SECRETS[:3])
        r = post(c, "rewrap", {"batch": [{"encrypted_data": ct} for ct in cts]})
        new = [x["encrypted_data"] for x in r.json()["batch"]]
        back = post(c, "decrypt", {"batch": [{"encrypted_data": ct} for ct in new]})
    assert r.status_code == 200 and set(new).isdisjoint(cts)
    assert [x["plaintext"] for x in back.json()["batch"]] == SECRETS[:3]


def test_a_batch_sign_gives_each_items_own_signature(served: Served) -> None:
    with served.client() as c:
        (ct,) = encrypt_all(c, ["hmac-key"])
        items = [
            {"encrypted_data": ct, "algorithm": "hmac-sha256", "message": "a=1"},
            {
                "encrypted_data": ct,
                "algorithm": "hmac-sha512",
                "message": "b=2",
                "signature_encoding": "base64",
            },
            {"encrypted_data": ct, "algorithm": "ed25519", "message": "c", "key_encoding": "hex"},
        ]
        r = post(c, "sign", {"batch": items})
    assert r.status_code == 200
    first, second, third = r.json()["batch"]
    assert first == {"signature": hmac.new(b"hmac-key", b"a=1", hashlib.sha256).hexdigest()}
    assert "signature" in second
    assert third["error"]["code"] == "invalid_key"  # not a hex Ed25519 seed: that item alone


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"batch": []}, 422),
        ({"batch": [{"plaintext": "a"}] * 101}, 422),
        ({"batch": [{"plaintext": "a"}, {"plaintext": "b", "extra": 1}]}, 422),
        ({"batch": [{"plaintext": "a"}], "plaintext": "b"}, 422),
        ({"batch": [{"plaintext": "a"}, {"plaintext": ""}]}, 422),
        ({"batch": {"plaintext": "a"}}, 422),
        ({"batch": [{"plaintext": "a"}, {"plaintext": "x" * 4097}]}, 413),
    ],
    ids=[
        "empty",
        "over-limit",
        "unknown-field",
        "mixed-forms",
        "empty-item",
        "not-a-list",
        "item-too-large",
    ],
)
def test_a_batch_that_does_not_fit_the_schema_is_refused_whole_and_nothing_is_done(
    served: Served, body: dict[str, Any], status: int
) -> None:
    with served.client() as c:
        r = post(c, "encrypt", body, "sentinel", X_Request_ID="refused-batch")
    assert r.status_code == status
    assert "batch" not in r.json()
    events = [e for e in served.audit.events() if e["request_id"] == "refused-batch"]
    assert len(events) == 1 and events[0]["ct_fp"] is None and "batch_index" not in events[0]


def test_a_sign_batch_with_one_message_over_the_limit_is_413_and_signs_nothing(
    served: Served,
) -> None:
    with served.client() as c:
        (ct,) = encrypt_all(c, ["hmac-key"])
        ok = {"encrypted_data": ct, "algorithm": "hmac-sha256", "message": "m"}
        big = {**ok, "message": "x" * 65537}
        r = post(c, "sign", {"batch": [ok, big]}, X_Request_ID="big-sign")
    assert r.status_code == 413
    assert [e["code"] for e in served.audit.events() if e["request_id"] == "big-sign"] == [
        "payload_too_large"
    ]


def test_each_item_has_its_own_audit_line_with_index_size_and_the_request_id(
    served: Served,
) -> None:
    with served.client() as c:
        cts = encrypt_all(c, SECRETS[:2])
        items = [
            {"encrypted_data": cts[0]},
            {"encrypted_data": "cit1:nope:AAAA"},
            {"encrypted_data": cts[1]},
        ]
        post(c, "decrypt", {"batch": items}, X_Request_ID="batch-audit")
    lines = [e for e in served.audit.events() if e["request_id"] == "batch-audit"]
    assert [(e["batch_index"], e["batch_size"], e["code"], e["success"]) for e in lines] == [
        (0, 3, "ok", True),
        (1, 3, "invalid_ciphertext", False),
        (2, 3, "ok", True),
    ]
    assert [e["ct_fp"] for e in lines] == [
        hashlib.sha256(i["encrypted_data"].encode()).hexdigest()[:16] for i in items
    ]
    assert {e["operation"] for e in lines} == {"decrypt"}


def test_a_batch_counts_once_in_requests_and_per_item_in_batch_items(served: Served) -> None:
    with served.client() as c:
        cts = encrypt_all(c, SECRETS[:2])
        post(c, "decrypt", {"batch": [{"encrypted_data": cts[0]}, {"encrypted_data": "x"}]})
        text = c.get("/metrics").text
    assert 'citadel_requests_total{caller="conductor",code="ok",operation="decrypt"} 1.0' in text
    assert 'citadel_batch_items_total{code="ok",operation="decrypt"} 1.0' in text
    assert 'citadel_batch_items_total{code="invalid_ciphertext",operation="decrypt"} 1.0' in text
    assert 'citadel_batch_items_total{code="ok",operation="encrypt"} 2.0' in text


def test_a_batch_body_over_the_single_limit_is_served_and_a_single_one_is_413(
    tmp_path: Path, emu: EvervaultEmulator
) -> None:
    with start(tmp_path, "local", emu) as s, s.client() as c:
        single = body_limits(make_settings(tmp_path))["encrypt"]
        items = [{"plaintext": "p" * 4000}] * 10
        assert len(json.dumps({"batch": items})) > single
        r = post(c, "encrypt", {"batch": items}, "sentinel")
        padded = c.post(
            "/encrypt",
            content=b'{"plaintext": "x"' + b" " * single + b"}",
            headers={**headers("sentinel"), "Content-Type": "application/json"},
        )
    assert r.status_code == 200 and len(r.json()["batch"]) == 10
    assert (padded.status_code, padded.json()["code"]) == (413, "payload_too_large")


def test_a_batch_over_max_batch_bytes_is_413_before_its_body_is_read(
    tmp_path: Path, emu: EvervaultEmulator
) -> None:
    with start(tmp_path, "local", emu, max_batch_bytes=50_000) as s, s.client() as c:
        items = [{"plaintext": "p" * 4000}] * 20
        r = post(c, "encrypt", {"batch": items}, "sentinel")
    assert (r.status_code, r.json()["code"]) == (413, "payload_too_large")
    assert r.headers["connection"] == "close"  # answered before the body was read


def test_max_batch_items_is_the_setting(tmp_path: Path, emu: EvervaultEmulator) -> None:
    with start(tmp_path, "local", emu, max_batch_items=3) as s, s.client() as c:
        three = post(c, "encrypt", {"batch": [{"plaintext": "a"}] * 3}, "sentinel")
        four = post(c, "encrypt", {"batch": [{"plaintext": "a"}] * 4}, "sentinel")
    assert three.status_code == 200
    assert (four.status_code, four.json()["code"]) == (422, "invalid_request")


# -- rate limits count items ----------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["caller", "user"])
def test_rate_limits_count_items_and_a_batch_that_does_not_fit_is_charged_nothing(
    tmp_path: Path, emu: EvervaultEmulator, scope: str
) -> None:
    limits = (
        {"rate_limit_per_caller": "10/minute"}
        if scope == "caller"
        else {"rate_limit_per_user": "10/minute"}
    )
    with start(tmp_path, "local", emu, **limits) as s, s.client() as c:
        user = {"X_User_ID": "user-1"}

        def batch(n: int) -> httpx.Response:
            body = {"batch": [{"plaintext": "a"}] * n}
            return post(c, "encrypt", body, "sentinel", **user)  # type: ignore[no-any-return]

        assert batch(6).status_code == 200  # 6 of 10
        refused = batch(5)  # does not fit in the 4 left
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert batch(4).status_code == 200  # the refused batch took nothing: 10 of 10
        assert batch(1).status_code == 429
        text = c.get("/metrics").text
    assert f'citadel_rate_limited_total{{scope="{scope}"}} 2.0' in text


# -- Evervault: one call per batch ----------------------------------------------------------------


def test_an_evervault_batch_decrypt_is_one_call(tmp_path: Path, emu: EvervaultEmulator) -> None:
    with start(tmp_path, "evervault", emu) as s, s.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200, timeout=15)
        cts = encrypt_all(c, [f"s{i}" for i in range(50)])
        before = emu.calls("decrypt")
        r = post(c, "decrypt", {"batch": [{"encrypted_data": ct} for ct in cts]})
        sign = post(
            c,
            "sign",
            {
                "batch": [
                    {"encrypted_data": ct, "algorithm": "hmac-sha256", "message": "m"} for ct in cts
                ]
            },
        )
        rewrap = post(c, "rewrap", {"batch": [{"encrypted_data": ct} for ct in cts]})
    assert [x["plaintext"] for x in r.json()["batch"]] == [f"s{i}" for i in range(50)]
    assert all("signature" in x for x in sign.json()["batch"])
    assert all("encrypted_data" in x for x in rewrap.json()["batch"])
    assert emu.calls("decrypt") - before == 3


def test_an_evervault_batch_with_bad_items_finds_them_and_decrypts_the_rest(
    tmp_path: Path, emu: EvervaultEmulator
) -> None:
    with start(tmp_path, "evervault", emu) as s, s.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200, timeout=15)
        cts = encrypt_all(c, [f"s{i}" for i in range(32)])
        # Well formed, but of another app: only Evervault can tell.
        with (
            EvervaultEmulator() as other,
            start(tmp_path / "o", "evervault", other) as o,
            o.client() as oc,
        ):
            wait_until(lambda: oc.get("/ready").status_code == 200, timeout=15)
            (foreign,) = encrypt_all(oc, ["elsewhere"])
        cts[5] = cts[20] = foreign
        before = emu.calls("decrypt")
        r = post(c, "decrypt", {"batch": [{"encrypted_data": ct} for ct in cts]})
    results = r.json()["batch"]
    assert [i for i, x in enumerate(results) if "error" in x] == [5, 20]
    assert [x["plaintext"] for i, x in enumerate(results) if i not in (5, 20)] == [
        f"s{i}" for i in range(32) if i not in (5, 20)
    ]
    # Halving: at most 1 + 2 * 2 * log2(32) calls for 2 bad items of 32.
    assert emu.calls("decrypt") - before <= 21


def test_an_evervault_failure_fails_the_whole_batch_with_503(
    tmp_path: Path, emu: EvervaultEmulator
) -> None:
    with start(tmp_path, "evervault", emu) as s, s.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200, timeout=15)
        cts = encrypt_all(c, ["a", "b"])
        emu.set_fault("decrypt", status=500, count=1)
        r = post(c, "decrypt", {"batch": [{"encrypted_data": ct} for ct in cts]})
    assert (r.status_code, r.json()["code"]) == (503, "provider_unavailable")
    assert r.headers["retry-after"]
