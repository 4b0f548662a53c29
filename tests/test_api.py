"""The HTTP API of the contract, over real HTTP on loopback."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from support import KEYS, Served, headers

ACL = {
    ("sentinel", "encrypt"): 200,
    ("sentinel", "decrypt"): 403,
    ("conductor", "encrypt"): 403,
    ("conductor", "decrypt"): 200,
    ("api-gateway", "encrypt"): 403,
    ("api-gateway", "decrypt"): 403,
    ("alchemist", "encrypt"): 403,
    ("alchemist", "decrypt"): 403,
}


def encrypt(citadel: Served, plaintext: str = "binance-secret") -> str:
    with citadel.client() as c:
        r = c.post("/encrypt", json={"plaintext": plaintext}, headers=headers("sentinel"))
    assert r.status_code == 200, r.text
    ct: str = r.json()["encrypted_data"]
    return ct


def test_round_trip_through_sentinel_and_conductor(citadel: Served) -> None:
    ct = encrypt(citadel, "my_binance_api_key")
    with citadel.client() as c:
        r = c.post("/decrypt", json={"encrypted_data": ct}, headers=headers("conductor"))
    assert r.status_code == 200
    assert r.json() == {"plaintext": "my_binance_api_key"}


@pytest.mark.parametrize(("caller", "operation"), sorted(ACL))
def test_acl_matrix(citadel: Served, caller: str, operation: str) -> None:
    ct = encrypt(citadel)
    body = {"plaintext": "x"} if operation == "encrypt" else {"encrypted_data": ct}
    with citadel.client() as c:
        r = c.post(f"/{operation}", json=body, headers=headers(caller))
    assert r.status_code == ACL[(caller, operation)]
    if r.status_code == 403:
        assert r.json()["code"] == "forbidden"


@pytest.mark.parametrize("operation", ["encrypt", "decrypt"])
@pytest.mark.parametrize(
    "body",
    [b'{"plaintext": "x"}', b"not json", b"", b'{"encrypted_data": 5}', b"\xff" * 10_000_000],
    ids=["valid", "malformed", "empty", "wrong-type", "huge"],
)
@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["missing", "unknown"])
def test_missing_or_unknown_key_is_401_whatever_the_body(
    citadel: Served, operation: str, body: bytes, key: str | None
) -> None:
    hdrs = {"Content-Type": "application/json"}
    if key:
        hdrs["X-Internal-API-Key"] = key
    with citadel.client() as c:
        r = c.post(f"/{operation}", content=body, headers=hdrs)
    assert r.status_code == 401
    assert r.json() == {
        "detail": "Missing or unknown X-Internal-API-Key.",
        "code": "unauthenticated",
    }


def test_key_in_query_string_is_not_accepted(citadel: Served) -> None:
    with citadel.client() as c:
        r = c.post(
            "/encrypt",
            params={"X-Internal-API-Key": KEYS["sentinel"], "api_key": KEYS["sentinel"]},
            json={"plaintext": "x"},
        )
    assert r.status_code == 401


def test_sha256_keys_and_several_keys_per_caller(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from support import make_settings, serve_citadel, sha256_form

    old, new = "old-sentinel-key-" + "1" * 30, "new-sentinel-key-" + "2" * 30
    settings = make_settings(tmp_path, api_keys={"sentinel": [old, sha256_form(new)]})
    with serve_citadel(settings) as served, served.client() as c:
        for key in (old, new):
            r = c.post("/encrypt", json={"plaintext": "x"}, headers={"X-Internal-API-Key": key})
            assert r.status_code == 200
        r = c.post(
            "/encrypt", json={"plaintext": "x"}, headers={"X-Internal-API-Key": sha256_form(new)}
        )
        assert r.status_code == 401  # the digest itself is not a key


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        b'{"plaintext": ""}',
        b'{"plaintext": 42}',
        b'{"plaintext": null}',
        b'{"plaintext": ["a"]}',
        b'{"plaintext": "x", "extra": 1}',
        b"[1, 2]",
        b'{"plaintext": "\\ud800"}',
    ],
)
def test_bad_encrypt_body_is_422_invalid_request(citadel: Served, body: bytes) -> None:
    with citadel.client() as c:
        r = c.post(
            "/encrypt",
            content=body,
            headers={**headers("sentinel"), "Content-Type": "application/json"},
        )
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_request"
    assert set(r.json()) == {"detail", "code"}


def test_plaintext_at_the_limit_is_accepted_and_one_byte_over_is_413(citadel: Served) -> None:
    limit = 4096
    with citadel.client() as c:
        ok = c.post("/encrypt", json={"plaintext": "é" * (limit // 2)}, headers=headers("sentinel"))
        over = c.post(
            "/encrypt", json={"plaintext": "é" * (limit // 2) + "x"}, headers=headers("sentinel")
        )
    assert ok.status_code == 200
    assert over.status_code == 413
    assert over.json()["code"] == "payload_too_large"


def test_oversized_body_is_413_before_parsing(citadel: Served) -> None:
    body = b'{"plaintext": "' + b"a" * 100_000 + b'"'  # not even valid JSON
    with citadel.client() as c:
        r = c.post("/encrypt", content=body, headers=headers("sentinel"))
    assert r.status_code == 413
    assert r.json()["code"] == "payload_too_large"


def test_oversized_chunked_body_is_413(citadel: Served) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(100):
            yield b"a" * 1000

    with citadel.client() as c:
        r = c.post("/encrypt", content=chunks(), headers=headers("sentinel"))
    assert r.status_code == 413


def test_small_chunked_body_is_served(citadel: Served) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"plaintext": '
        yield b'"chunked"}'

    with citadel.client() as c:
        r = c.post(
            "/encrypt",
            content=chunks(),
            headers={**headers("sentinel"), "Content-Type": "application/json"},
        )
    assert r.status_code == 200


@pytest.mark.parametrize(
    "ciphertext",
    ["", "garbage", "ev:RFVC:abc:def:ghi:$", "cit1:", "cit1:00000000:AAAA", "cit1:zz:QUFB", "é"],
)
def test_undecryptable_input_is_400_or_422_never_500(citadel: Served, ciphertext: str) -> None:
    with citadel.client() as c:
        r = c.post("/decrypt", json={"encrypted_data": ciphertext}, headers=headers("conductor"))
    expected = (422, "invalid_request") if ciphertext == "" else (400, "invalid_ciphertext")
    assert (r.status_code, r.json()["code"]) == expected


def test_tampered_ciphertext_is_400(citadel: Served) -> None:
    ct = encrypt(citadel)
    body = ct.rsplit(":", 1)[1]
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with citadel.client() as c:
        r = c.post(
            "/decrypt",
            json={"encrypted_data": ct.rsplit(":", 1)[0] + ":" + flipped},
            headers=headers("conductor"),
        )
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_ciphertext"


def test_ciphertext_from_another_keyring_is_400(citadel: Served, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from support import make_settings, serve_citadel

    other = make_settings(tmp_path / "other")
    with serve_citadel(other) as foreign:
        ct = encrypt(foreign)
    with citadel.client() as c:
        r = c.post("/decrypt", json={"encrypted_data": ct}, headers=headers("conductor"))
    assert r.status_code == 400


def test_decrypt_response_is_not_cacheable(citadel: Served) -> None:
    ct = encrypt(citadel)
    with citadel.client() as c:
        r = c.post("/decrypt", json={"encrypted_data": ct}, headers=headers("conductor"))
    assert r.headers["cache-control"] == "no-store"


def test_request_id_is_echoed(citadel: Served) -> None:
    with citadel.client() as c:
        r = c.post(
            "/encrypt",
            json={"plaintext": "x"},
            headers=headers("sentinel", X_Request_ID="req-123.abc"),
        )
    assert r.headers["x-request-id"] == "req-123.abc"
    assert citadel.audit.events()[-1]["request_id"] == "req-123.abc"


def test_request_id_is_generated_when_absent_or_unsafe(citadel: Served) -> None:
    with citadel.client() as c:
        a = c.post("/encrypt", json={"plaintext": "x"}, headers=headers("sentinel"))
        b = c.post(
            "/encrypt",
            json={"plaintext": "x"},
            headers=headers("sentinel", X_Request_ID="has space\tand tab"),
        )
        h = c.get("/health")
    ids = [a.headers["x-request-id"], b.headers["x-request-id"], h.headers["x-request-id"]]
    assert all(len(i) == 32 for i in ids)
    assert len(set(ids)) == 3


@pytest.mark.parametrize("user", ["x" * 129, "has space", "semi;colon", "ünï"])
def test_bad_user_id_is_422(citadel: Served, user: str) -> None:
    with citadel.client() as c:
        r = c.post(
            "/encrypt",
            json={"plaintext": "x"},
            headers={**headers("sentinel"), "X-User-ID": user.encode()},  # type: ignore[dict-item]
        )
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_request"


def test_health_body(citadel: Served) -> None:
    with citadel.client() as c:
        r = c.get("/health")
    assert r.status_code == 200
    assert r.json() == {
        "status": "healthy",
        "service": "citadel",
        "version": version("citadel"),
        "provider": "local",
        "breaker": "closed",
        "decrypt_providers": ["local"],
    }


def test_ready_is_200_on_the_local_provider(citadel: Served) -> None:
    with citadel.client() as c:
        r = c.get("/ready")
    assert r.status_code == 200
    assert r.json()["status"] == "healthy"


def test_metrics_count_requests_by_operation_caller_and_code(citadel: Served) -> None:
    encrypt(citadel)
    with citadel.client() as c:
        c.post("/decrypt", json={"encrypted_data": "bad"}, headers=headers("conductor"))
        c.post("/encrypt", json={"plaintext": "x"})
        text = c.get("/metrics").text
    assert 'citadel_requests_total{caller="sentinel",code="ok",operation="encrypt"} 1.0' in text
    assert (
        'citadel_requests_total{caller="conductor",code="invalid_ciphertext",operation="decrypt"} 1.0'
        in text
    )
    assert (
        'citadel_requests_total{caller="unknown",code="unauthenticated",operation="encrypt"} 1.0'
        in text
    )
    assert 'citadel_breaker_state{provider="local"}' not in text  # it has no breaker
    assert "citadel_request_duration_seconds_bucket" in text


def test_unknown_path_is_json_404(citadel: Served) -> None:
    with citadel.client() as c:
        r = c.get("/nope")
    assert r.status_code == 404
    assert r.json() == {"detail": "Not Found.", "code": "not_found"}


def test_docs_are_served_in_development(citadel: Served) -> None:
    with citadel.client() as c:
        assert c.get("/docs").status_code == 200
        assert "/encrypt" in c.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("path", ["/decrypt", "/sign", "/rewrap"])
@pytest.mark.parametrize(
    "body", [b"{", b'{"unknown": 1}', b'{"encrypted_data": "x", "encrypted_data": "y"}']
)
def test_a_caller_without_the_operation_gets_403_before_its_body_is_judged(
    citadel: Served, path: str, body: bytes
) -> None:
    """The ACL comes before the body: no probing of validation without the grant."""
    with citadel.client() as c:
        r = c.post(path, content=body, headers=headers("sentinel"))
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")


def test_a_caller_without_the_operation_gets_403_even_for_an_oversized_body(
    citadel: Served,
) -> None:
    with citadel.client() as c:
        r = c.post("/decrypt", content=b"x" * 1_000_000, headers=headers("sentinel"))
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")
