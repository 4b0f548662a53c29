"""Audit events: one JSON line per encrypt or decrypt request, fail-closed."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from support import PSEUDONYM_KEY, Served, headers

from citadel.logs import redact
from citadel.pseudonyms import Pseudonymizer, fingerprint

FIELDS = {
    "timestamp",
    "event",
    "operation",
    "requestor",
    "user_id",
    "success",
    "code",
    "duration_ms",
    "request_id",
    "ct_fp",
}


def test_successful_encrypt_writes_one_event_with_the_contract_fields(citadel: Served) -> None:
    with citadel.client() as c:
        r = c.post(
            "/encrypt",
            json={"plaintext": "x"},
            headers=headers("sentinel", X_User_ID="user-42", X_Request_ID="rid-1"),
        )
    [event] = citadel.audit.events()
    assert set(event) == FIELDS
    expected_pseudonym = (
        "u_" + hmac.new(PSEUDONYM_KEY.encode(), b"user-42", hashlib.sha256).hexdigest()[:16]
    )
    assert event["event"] == "audit"
    assert event["operation"] == "encrypt"
    assert event["requestor"] == "sentinel"
    assert event["user_id"] == expected_pseudonym
    assert event["success"] is True
    assert event["code"] == "ok"
    assert event["request_id"] == "rid-1"
    assert event["ct_fp"] == hashlib.sha256(r.json()["encrypted_data"].encode()).hexdigest()[:16]
    assert event["timestamp"].endswith("Z")
    assert isinstance(event["duration_ms"], float)


def test_denied_requests_are_audited_with_their_code(citadel: Served) -> None:
    with citadel.client() as c:
        c.post("/decrypt", json={"encrypted_data": "x"})
        c.post("/decrypt", json={"encrypted_data": "x"}, headers=headers("sentinel"))
        c.post("/decrypt", json={"encrypted_data": "x"}, headers=headers("conductor"))
        c.post("/encrypt", content=b"{", headers=headers("sentinel"))
    events = citadel.audit.events()
    assert [(e["requestor"], e["code"], e["success"]) for e in events] == [
        (None, "unauthenticated", False),
        ("sentinel", "forbidden", False),
        ("conductor", "invalid_ciphertext", False),
        ("sentinel", "invalid_request", False),
    ]
    assert events[2]["ct_fp"] == fingerprint("x")


def test_health_and_metrics_are_not_audited(citadel: Served) -> None:
    with citadel.client() as c:
        c.get("/health")
        c.get("/metrics")
    assert citadel.audit.events() == []


def test_audit_write_failure_fails_the_request_with_503(citadel: Served) -> None:
    citadel.audit.fail = True
    with citadel.client() as c:
        r = c.post("/encrypt", json={"plaintext": "never-returned"}, headers=headers("sentinel"))
    assert r.status_code == 503
    assert r.json()["code"] == "provider_unavailable"
    assert "never-returned" not in r.text
    assert "encrypted_data" not in r.text


def test_audit_failure_withholds_a_decrypted_plaintext(citadel: Served) -> None:
    with citadel.client() as c:
        ct = c.post("/encrypt", json={"plaintext": "s3cr3t"}, headers=headers("sentinel")).json()[
            "encrypted_data"
        ]
        citadel.audit.fail = True
        r = c.post("/decrypt", json={"encrypted_data": ct}, headers=headers("conductor"))
        citadel.audit.fail = False
        after = c.post("/decrypt", json={"encrypted_data": ct}, headers=headers("conductor"))
    assert r.status_code == 503
    assert "s3cr3t" not in r.text
    assert after.status_code == 200


def test_audit_failure_on_an_error_path_is_also_503(citadel: Served) -> None:
    citadel.audit.fail = True
    with citadel.client() as c:
        r = c.post("/encrypt", json={"plaintext": "x"})
    assert r.status_code == 503


def test_pseudonym_is_u_and_16_hex_digits_of_hmac_sha256() -> None:
    p = Pseudonymizer(b"k")
    assert p("alice") == "u_" + hmac.new(b"k", b"alice", hashlib.sha256).hexdigest()[:16]
    assert p("alice") != Pseudonymizer(b"other")("alice")


@pytest.mark.parametrize(
    "key",
    ["plaintext", "secret", "api_key", "X-Internal-API-Key", "password", "Authorization", "token"],
)
def test_redaction_replaces_values_of_secret_named_keys(key: str) -> None:
    event: dict[str, Any] = {key: "canary", "nested": {key: "canary"}, "keep": "visible"}
    out = redact(None, "info", event)
    assert "canary" not in repr(out)
    assert out["keep"] == "visible"


def test_wrong_method_on_an_operation_path_is_audited(citadel: Served) -> None:
    with citadel.client() as c:
        r = c.get("/encrypt", headers=headers("sentinel"))
    assert r.status_code == 405
    [event] = citadel.audit.events()
    assert (event["requestor"], event["code"]) == ("sentinel", "method_not_allowed")


def test_rate_limit_keys_hold_pseudonyms_not_user_ids(tmp_path: Any, redis_server: Any) -> None:
    import socket

    from support import make_settings, serve_citadel

    settings = make_settings(tmp_path, rate_limit_storage_uri=redis_server.url)
    with serve_citadel(settings) as s, s.client() as c:
        c.post(
            "/encrypt",
            json={"plaintext": "x"},
            headers=headers("sentinel", X_User_ID="alice-raw-id"),
        )
    with socket.create_connection(("127.0.0.1", redis_server.port)) as conn:
        conn.sendall(b"KEYS *\r\n")
        keys = conn.recv(65536).decode()
    assert "sentinel" in keys
    assert "alice-raw-id" not in keys
    assert Pseudonymizer(PSEUDONYM_KEY.encode())("alice-raw-id") in keys
