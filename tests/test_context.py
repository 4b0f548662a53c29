"""Encryption context (the contract's "Encryption context"), through real HTTP, both providers."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import Served, headers, make_settings, serve_citadel, wait_until

from evervault_emulator import EvervaultEmulator

ACL = {"sentinel": ["encrypt"], "conductor": ["decrypt", "sign", "rewrap"]}
CANARY = "CANARY-CONTEXT-VALUE-7731"
USER_A = {"user_id": "8413", "exchange": "binance"}
USER_B = {"user_id": "9999", "exchange": "binance"}


@pytest.fixture
def emu() -> Iterator[EvervaultEmulator]:
    with EvervaultEmulator() as emulator:
        yield emulator


@pytest.fixture(params=["local", "evervault"])
def served(
    request: pytest.FixtureRequest, tmp_path: Path, emu: EvervaultEmulator
) -> Iterator[Served]:
    values: dict[str, Any] = {"acl": ACL, "rate_limit_per_caller": "100000/minute"}
    if request.param == "evervault":
        values.update(
            provider="evervault",
            evervault_app_id=emu.app_id,
            evervault_api_key=emu.api_key,
            evervault_api_url=emu.url,
            evervault_timeout_s=2,
        )
    with serve_citadel(make_settings(tmp_path, **values)) as s, s.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200, timeout=15)
        yield s


def post(c: httpx.Client, operation: str, body: Any, caller: str = "conductor", **h: str) -> Any:
    return c.post(f"/{operation}", json=body, headers=headers(caller, **h))


def encrypt(c: httpx.Client, plaintext: str, context: dict[str, str] | None) -> str:
    body: dict[str, Any] = {"plaintext": plaintext}
    if context is not None:
        body["context"] = context
    r = post(c, "encrypt", body, "sentinel")
    assert r.status_code == 200, r.text
    return str(r.json()["encrypted_data"])


def decrypt(c: httpx.Client, ct: str, context: dict[str, str] | None) -> httpx.Response:
    body: dict[str, Any] = {"encrypted_data": ct}
    if context is not None:
        body["context"] = context
    return post(c, "decrypt", body)  # type: ignore[no-any-return]


def test_a_ciphertext_decrypts_with_its_context_in_any_key_order(served: Served) -> None:
    with served.client() as c:
        ct = encrypt(c, "secret-a", USER_A)
        r = decrypt(c, ct, {"exchange": "binance", "user_id": "8413"})
    assert r.json() == {"plaintext": "secret-a"}


@pytest.mark.parametrize(
    "other",
    [USER_B, None, {"user_id": "8413"}, {**USER_A, "extra": "1"}],
    ids=["other-user", "none", "fewer-pairs", "more-pairs"],
)
def test_any_other_context_is_invalid_ciphertext_with_the_usual_detail(
    served: Served, other: dict[str, str] | None
) -> None:
    with served.client() as c:
        ct = encrypt(c, "secret-a", USER_A)
        r = decrypt(c, ct, other)
        tampered = decrypt(c, ct[:-4] + ("AAAA" if not ct.endswith("AAAA") else "BBBB"), USER_A)
    assert (r.status_code, r.json()["code"]) == (400, "invalid_ciphertext")
    assert r.json()["detail"] == tampered.json()["detail"]


def test_a_ciphertext_without_a_context_decrypts_only_without_one(served: Served) -> None:
    with served.client() as c:
        ct = encrypt(c, "old-secret", None)
        plain = decrypt(c, ct, None)
        bound = decrypt(c, ct, USER_A)
    assert plain.json() == {"plaintext": "old-secret"}
    assert (bound.status_code, bound.json()["code"]) == (400, "invalid_ciphertext")


def test_swapped_ciphertexts_of_two_users_do_not_decrypt(served: Served) -> None:
    with served.client() as c:
        a, b = encrypt(c, "key-of-a", USER_A), encrypt(c, "key-of-b", USER_B)
        as_b, as_a = decrypt(c, a, USER_B), decrypt(c, b, USER_A)
    assert as_b.status_code == as_a.status_code == 400


def test_rewrap_keeps_the_context(served: Served) -> None:
    with served.client() as c:
        ct = encrypt(c, "s", USER_A)
        new = post(c, "rewrap", {"encrypted_data": ct, "context": USER_A}).json()["encrypted_data"]
        kept, none = decrypt(c, new, USER_A), decrypt(c, new, None)
    assert kept.json() == {"plaintext": "s"} and none.status_code == 400


def test_rewrap_with_new_context_binds_a_context_free_ciphertext_to_its_user(
    served: Served,
) -> None:
    with served.client() as c:
        ct = encrypt(c, "s", None)
        r = post(c, "rewrap", {"encrypted_data": ct, "new_context": USER_A}, X_Request_ID="bind")
        new = r.json()["encrypted_data"]
        bound, unbound = decrypt(c, new, USER_A), decrypt(c, new, None)
    assert bound.json() == {"plaintext": "s"} and unbound.status_code == 400
    (line,) = [e for e in served.audit.events() if e["request_id"] == "bind"]
    assert line["new_context_keys"] == ["exchange", "user_id"]
    assert "context_keys" not in line


def test_rewrap_needs_the_old_context_to_bind_a_new_one(served: Served) -> None:
    with served.client() as c:
        ct = encrypt(c, "s", USER_A)
        r = post(c, "rewrap", {"encrypted_data": ct, "new_context": USER_B})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_ciphertext")


def test_sign_takes_the_context(served: Served) -> None:
    with served.client() as c:
        ct = encrypt(c, "hmac-key", USER_A)
        body = {"encrypted_data": ct, "algorithm": "hmac-sha256", "message": "m"}
        right = post(c, "sign", {**body, "context": USER_A})
        wrong = post(c, "sign", {**body, "context": USER_B})
        none = post(c, "sign", body)
    assert "signature" in right.json()
    assert wrong.json()["code"] == none.json()["code"] == "invalid_ciphertext"


def test_batch_items_each_carry_their_own_context(served: Served) -> None:
    with served.client() as c:
        a, b = encrypt(c, "a", USER_A), encrypt(c, "b", USER_B)
        items = [
            {"encrypted_data": a, "context": USER_A},
            {"encrypted_data": b, "context": USER_A},
            {"encrypted_data": b, "context": USER_B},
        ]
        r = post(c, "decrypt", {"batch": items})
    results = r.json()["batch"]
    assert results[0] == {"plaintext": "a"} and results[2] == {"plaintext": "b"}
    assert results[1]["error"]["code"] == "invalid_ciphertext"


BAD_CONTEXTS = {
    "17-pairs": {f"k{i}": "v" for i in range(17)},
    "bad-key-characters": {"user id": "1"},
    "key-over-64": {"k" * 65: "v"},
    "257-byte-value": {"k": "é" * 128 + "x"},
    "number-value": {"k": 1},
    "null-value": {"k": None},
    "empty-value": {"k": ""},
    "empty-object": {},
    "null": None,
    "a-list": ["k", "v"],
}


@pytest.mark.parametrize("operation", ["encrypt", "decrypt", "sign", "rewrap"])
@pytest.mark.parametrize("context", list(BAD_CONTEXTS.values()), ids=list(BAD_CONTEXTS))
def test_a_bad_context_is_422_naming_only_the_field(
    served: Served, operation: str, context: Any
) -> None:
    bodies: dict[str, dict[str, Any]] = {
        "encrypt": {"plaintext": "x"},
        "decrypt": {"encrypted_data": "cit1:k:AAAA"},
        "rewrap": {"encrypted_data": "cit1:k:AAAA"},
        "sign": {"encrypted_data": "cit1:k:AAAA", "algorithm": "hmac-sha256", "message": "m"},
    }
    caller = "sentinel" if operation == "encrypt" else "conductor"
    with served.client() as c:
        r = post(c, operation, {**bodies[operation], "context": context}, caller)
    assert (r.status_code, r.json()["code"]) == (422, "invalid_request")
    assert "The field context" in r.json()["detail"]


def test_a_257_byte_value_is_refused_and_256_taken(served: Served) -> None:
    with served.client() as c:
        at_limit = post(c, "encrypt", {"plaintext": "x", "context": {"k": "é" * 128}}, "sentinel")
        over = post(c, "encrypt", {"plaintext": "x", "context": {"k": "é" * 128 + "x"}}, "sentinel")
    assert at_limit.status_code == 200 and over.status_code == 422


def test_sixteen_pairs_are_taken(served: Served) -> None:
    with served.client() as c:
        context = {f"k{i}": "v" for i in range(16)}
        ct = encrypt(c, "x", context)
        assert decrypt(c, ct, context).json() == {"plaintext": "x"}


def test_context_values_never_appear_in_audit_metrics_or_error_bodies(
    served: Served, capfd: pytest.CaptureFixture[str]
) -> None:
    context = {"user_id": CANARY, "exchange": "binance"}
    with served.client() as c:
        ct = encrypt(c, "s", context)
        answers = [
            decrypt(c, ct, {"user_id": CANARY + "x", "exchange": "binance"}).text,
            decrypt(c, ct, {"user_id": CANARY, "bad key": CANARY}).text,
            post(
                c,
                "rewrap",
                {
                    "encrypted_data": ct,
                    "context": context,
                    "new_context": {"user_id": CANARY + "2"},
                },
            ).text,
            post(
                c,
                "encrypt",
                {"plaintext": "x", "context": {"user_id": 5, "bad key": CANARY}},
                "sentinel",
            ).text,
            decrypt(c, ct, context).text,
        ]
        metrics = c.get("/metrics").text
    out, err = capfd.readouterr()
    for text in [*answers[:-1], metrics, served.audit.text(), out, err]:
        assert CANARY not in text
    lines = [e for e in served.audit.events() if e.get("context_keys")]
    assert lines and all(e["context_keys"] == ["exchange", "user_id"] for e in lines)
    assert [e["new_context_keys"] for e in served.audit.events() if "new_context_keys" in e] == [
        ["user_id"]
    ]


def test_an_evervault_ciphertext_without_context_keeps_the_sdk_format(
    tmp_path: Path, emu: EvervaultEmulator
) -> None:
    values = {
        "acl": ACL,
        "provider": "evervault",
        "evervault_app_id": emu.app_id,
        "evervault_api_key": emu.api_key,
        "evervault_api_url": emu.url,
    }
    with serve_citadel(make_settings(tmp_path, **values)) as s, s.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200, timeout=15)
        plain_ct, bound_ct = encrypt(c, "sdk-readable", None), encrypt(c, "bound", USER_A)
    auth = base64.b64encode(f"{emu.app_id}:{emu.api_key}".encode()).decode()

    def evervault_decrypt(ct: str) -> Any:
        r = httpx.post(
            emu.url + "decrypt", json={"data": ct}, headers={"Authorization": f"Basic {auth}"}
        )
        return r.json()["data"]

    assert evervault_decrypt(plain_ct) == "sdk-readable"
    inner = evervault_decrypt(bound_ct)
    assert (
        inner != "bound"
        and inner.endswith(":bound")
        and inner.startswith("\x00citadel-context-v1:")
    )


def test_a_plaintext_with_the_reserved_prefix_is_422(served: Served) -> None:
    with served.client() as c:
        r = post(c, "encrypt", {"plaintext": "\x00citadel-context-v1:x"}, "sentinel")
    assert (r.status_code, r.json()["code"]) == (422, "invalid_request")
