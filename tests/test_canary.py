"""No plaintext, API key or raw user id in any response, log line, audit line or metric.

Canary values are pushed through every error path of a real served Citadel,
then searched for in everything it produced.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest
from support import KEYS, make_settings, serve_citadel

from citadel.logs import configure_logging

PLAIN = "CANARYPLAIN7f3a9"
USER = "CANARYUSER5b2c"
BADKEY = "CANARYKEY8d1e0000000000"


def canaries() -> list[str]:
    variants = [PLAIN, USER, BADKEY, *KEYS.values()]
    encoded = [base64.b64encode(v.encode()).decode()[:12] for v in variants]
    return variants + encoded


def exercise(c: httpx.Client) -> list[httpx.Response]:
    s, k = KEYS["sentinel"], KEYS["conductor"]
    json_h = {"Content-Type": "application/json"}
    calls = [
        c.post("/encrypt", json={"plaintext": PLAIN}, headers={"X-User-ID": USER}),
        c.post("/encrypt", json={"plaintext": PLAIN}, headers={"X-Internal-API-Key": BADKEY}),
        c.post("/encrypt", json={"plaintext": PLAIN}, headers={"X-Internal-API-Key": k}),
        c.post(
            "/encrypt", json={"plaintext": PLAIN, "x": PLAIN}, headers={"X-Internal-API-Key": s}
        ),
        c.post("/encrypt", json={"plaintext": [PLAIN]}, headers={"X-Internal-API-Key": s}),
        c.post("/encrypt", json={"plaintxt": PLAIN}, headers={"X-Internal-API-Key": s}),
        c.post(
            "/encrypt",
            content=b'{"plaintext": "' + PLAIN.encode() + b'"',
            headers={"X-Internal-API-Key": s, **json_h},
        ),
        c.post(
            "/encrypt",
            content=b'{"plaintext": "' + PLAIN.encode() + b'\\ud800"}',
            headers={"X-Internal-API-Key": s, **json_h},
        ),
        c.post("/encrypt", json={"plaintext": PLAIN * 400}, headers={"X-Internal-API-Key": s}),
        c.post("/encrypt", json={"plaintext": PLAIN * 4000}, headers={"X-Internal-API-Key": s}),
        c.post(
            "/encrypt",
            json={"plaintext": PLAIN},
            headers={"X-Internal-API-Key": s, "X-User-ID": USER + " !"},
        ),
        c.post(
            "/encrypt",
            json={"plaintext": PLAIN},
            headers={"X-Internal-API-Key": s, "X-Request-ID": PLAIN + " x"},
        ),
        c.post("/decrypt", json={"encrypted_data": PLAIN}, headers={"X-Internal-API-Key": k}),
        c.post("/decrypt", json={"encrypted_data": PLAIN}, headers={"X-Internal-API-Key": s}),
        c.post(
            "/decrypt",
            json={"encrypted_data": "cit1:00000000:" + PLAIN},
            headers={"X-Internal-API-Key": k, "X-User-ID": USER},
        ),
        c.post(
            "/decrypt", json={"encrypted_data": {"a": PLAIN}}, headers={"X-Internal-API-Key": k}
        ),
        c.get("/health", params={"api_key": BADKEY}),
        c.get("/nope/" + PLAIN, headers={"X-Internal-API-Key": BADKEY}),
    ]
    return calls


def test_no_canary_in_responses_audit_logs_or_metrics(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, log_level="debug")
    configure_logging(settings)
    with serve_citadel(settings) as served, served.client() as c:
        responses = exercise(c)
        metrics = c.get("/metrics").text
        audit = served.audit.text()
    out, err = capfd.readouterr()
    assert all(r.status_code < 500 for r in responses), [r.status_code for r in responses]
    assert len([line for line in audit.splitlines() if line]) == 16
    haystacks = {
        "responses": "\n".join(f"{r.headers}\n{r.text}" for r in responses),
        "audit": audit,
        "metrics": metrics,
        "stdout": out,
        "stderr": err,
    }
    for name, text in haystacks.items():
        for canary in canaries():
            assert canary not in text, f"{canary!r} found in {name}"


def test_a_successful_round_trip_leaks_nothing_but_its_own_response(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, log_level="debug")
    configure_logging(settings)
    with serve_citadel(settings) as served, served.client() as c:
        ct = c.post(
            "/encrypt",
            json={"plaintext": PLAIN},
            headers={"X-Internal-API-Key": KEYS["sentinel"], "X-User-ID": USER},
        ).json()["encrypted_data"]
        r = c.post(
            "/decrypt",
            json={"encrypted_data": ct},
            headers={"X-Internal-API-Key": KEYS["conductor"], "X-User-ID": USER},
        )
        metrics = c.get("/metrics").text
        audit = served.audit.text()
    out, err = capfd.readouterr()
    assert r.json()["plaintext"] == PLAIN
    for text in (audit, metrics, out, err, ct):
        for canary in canaries():
            assert canary not in text


def test_no_canary_on_rate_limited_and_audit_failure_paths(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(
        tmp_path,
        log_level="debug",
        rate_limit_per_caller="1/minute",
        rate_limit_per_user="1/minute",
    )
    configure_logging(settings)
    s = {"X-Internal-API-Key": KEYS["sentinel"], "X-User-ID": USER}
    with serve_citadel(settings) as served, served.client() as c:
        responses = [c.post("/encrypt", json={"plaintext": PLAIN}, headers=s) for _ in range(3)]
        served.audit.fail = True
        responses.append(
            c.post(
                "/encrypt",
                json={"plaintext": PLAIN},
                headers={"X-Internal-API-Key": KEYS["alchemist"]},
            )
        )
        served.audit.fail = False
        metrics = c.get("/metrics").text
        audit = served.audit.text()
    out, err = capfd.readouterr()
    assert [r.status_code for r in responses] == [200, 429, 429, 503]
    for text in ("\n".join(r.text for r in responses[1:]), audit, metrics, out, err):
        for canary in canaries():
            assert canary not in text
