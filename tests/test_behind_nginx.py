"""Issue 15, finding 3: behind a real nginx, an early answer reaches the client as sent.

Citadel answers 401, 403 and 413 from the headers, before it reads the body.
If it then closes the connection while nginx is still writing that body, the
kernel resets the connection (unread data on close), nginx loses the answer
and its client gets a 502 (or a response cut short) while the audit says 401.
The fix is a bounded lingering close: drain the rest of the body before closing.

Each test runs Debian's nginx (:mod:`nginx_support`) in front of a Citadel
served in a thread (the audit sink is in memory), with the proxy
configuration an operator writes, in both request-body modes:

* ``buffered``: ``proxy_request_buffering on`` (the default); nginx reads the
  whole body from the client, then writes it to Citadel.
* ``streamed``: ``proxy_request_buffering off``; nginx writes the body as it
  arrives, so Citadel's answer races the rest of it.

The race is one of timing, so each test sends enough requests (200, two at a
time, each on a new client connection) that the fault cannot hide: against the
code that closed at once, three runs lost to 502 2 to 18 of 200 answers with the
issue's 120 KB body, 31 to 62 with a body near the /sign limit and 24 to 60 of
the 413s; every one of these tests failed in every run. Every wait is bounded by
client timeouts; nothing sleeps.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from nginx_support import Nginx, nginx_proxy, upstream_errors
from support import Served, headers, make_settings, serve_citadel

from citadel.app import body_limits

pytestmark = pytest.mark.nginx

REQUESTS = 200  # per test: about half a second through nginx
CONCURRENCY = 2  # clients at once (2 shared cores)
WRONG_KEY = "wrong-key-" + "z" * 40


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    # Budgets out of the way: hundreds of wrong keys from one address are the point.
    # conductor may sign (the 413 needs a caller allowed to send the body); sentinel may not.
    return make_settings(
        tmp_path,
        acl={"sentinel": ["encrypt"], "conductor": ["decrypt", "sign"]},
        rate_limit_per_caller="1000000/minute",
        rate_limit_auth_failures="1000000/minute",
    )


@pytest.fixture
def citadel(settings: Any) -> Iterator[Served]:
    with serve_citadel(settings) as served:
        yield served


@pytest.fixture(params=["buffered", "streamed"])
def nginx(request: pytest.FixtureRequest, citadel: Served, tmp_path: Path) -> Iterator[Nginx]:
    with nginx_proxy(
        citadel.url, tmp_path / "nginx", request_buffering=request.param == "buffered"
    ) as proxy:
        yield proxy


def sign_body(size: int) -> bytes:
    """A /sign request of ``size`` bytes, well formed, the message making up the size."""
    shell = {"encrypted_data": "cit1:" + "A" * 60, "algorithm": "hmac-sha256", "message": ""}
    overhead = len(json.dumps(shell))
    body = json.dumps({**shell, "message": "x" * (size - overhead)}).encode()
    assert len(body) == size
    return body


def sign_limit(settings: Any) -> int:
    return body_limits(settings)["sign"]


def send_many(
    nginx: Nginx, body: bytes, request_headers: dict[str, str], n: int = REQUESTS
) -> Counter[Any]:
    """POST ``body`` to /sign through nginx ``n`` times; what the client saw, counted.

    A status with the ``code`` of a JSON body, or the transport error's name
    (a response nginx cut short after Citadel's connection was reset).
    """
    # Each request on a new client connection: nginx itself (1.22, streamed) closes
    # about 2% of client keep-alive connections after an upstream answered before the
    # client's body was all read, whatever that upstream does next; not the point here.
    request_headers = {**request_headers, "content-type": "application/json", "connection": "close"}

    def one(client: httpx.Client) -> Any:
        try:
            r = client.post("/sign", content=body, headers=request_headers)
        except httpx.TransportError as exc:
            return type(exc).__name__
        try:
            return r.status_code, r.json().get("code")
        except ValueError:
            return r.status_code, "not json"  # nginx's own HTML 502 page

    clients = [httpx.Client(base_url=nginx.url, timeout=10) for _ in range(CONCURRENCY)]
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            return Counter(pool.map(one, [clients[i % CONCURRENCY] for i in range(n)]))
    finally:
        for c in clients:
            c.close()


def audit_codes(citadel: Served) -> Counter[str]:
    return Counter(e["code"] for e in citadel.audit.events() if e.get("event") == "audit")


def explain(nginx: Nginx) -> str:
    errors = upstream_errors(nginx)
    return f"{len(errors)} upstream errors in nginx's log, first: {errors[:3]}"


# -- early answers: what the client sees is what Citadel sent -----------------------


@pytest.mark.parametrize("size", [120_000, "near-limit"], ids=["120KB", "near-limit"])
def test_a_wrong_key_with_a_large_body_is_401_through_nginx_never_502(
    nginx: Nginx, citadel: Served, settings: Any, size: int | str
) -> None:
    body = sign_body(sign_limit(settings) - 4096 if size == "near-limit" else int(size))
    seen = send_many(nginx, body, {"X-Internal-API-Key": WRONG_KEY})
    assert seen == Counter({(401, "unauthenticated"): REQUESTS}), f"{seen}; {explain(nginx)}"
    assert audit_codes(citadel) == Counter({"unauthenticated": REQUESTS})


@pytest.mark.parametrize("size", [120_000, "near-limit"], ids=["120KB", "near-limit"])
def test_a_caller_without_the_sign_grant_is_403_through_nginx_never_502(
    nginx: Nginx, citadel: Served, settings: Any, size: int | str
) -> None:
    assert "sign" not in settings.acl["sentinel"]
    body = sign_body(sign_limit(settings) - 4096 if size == "near-limit" else int(size))
    seen = send_many(nginx, body, headers("sentinel"))
    assert seen == Counter({(403, "forbidden"): REQUESTS}), f"{seen}; {explain(nginx)}"
    assert audit_codes(citadel) == Counter({"forbidden": REQUESTS})


def test_a_body_over_the_sign_limit_is_413_through_nginx_never_502(
    nginx: Nginx, citadel: Served, settings: Any
) -> None:
    body = sign_body(sign_limit(settings) + 10 * 1024)  # Content-Length says so up front
    assert len(body) < 1024 * 1024  # under nginx's client_max_body_size: Citadel answers
    seen = send_many(nginx, body, headers("conductor"))
    assert seen == Counter({(413, "payload_too_large"): REQUESTS}), f"{seen}; {explain(nginx)}"
    assert audit_codes(citadel) == Counter({"payload_too_large": REQUESTS})


def test_an_early_answer_leaves_nginx_serving_the_next_requests(
    nginx: Nginx, citadel: Served, settings: Any
) -> None:
    """After refused large bodies, ordinary requests on the same nginx still succeed."""
    send_many(nginx, sign_body(sign_limit(settings) - 4096), {"X-Internal-API-Key": WRONG_KEY}, 20)
    with httpx.Client(base_url=nginx.url, timeout=10) as c:
        for _ in range(20):
            r = c.post("/encrypt", json={"plaintext": "after"}, headers=headers("sentinel"))
            assert r.status_code == 200, r.text


# -- the ordinary path through the proxy -------------------------------------------


def test_encrypt_then_decrypt_round_trips_through_nginx(nginx: Nginx) -> None:
    with httpx.Client(base_url=nginx.url, timeout=10) as c:
        r = c.post("/encrypt", json={"plaintext": "behind a proxy"}, headers=headers("sentinel"))
        assert r.status_code == 200, r.text
        token = r.json()["encrypted_data"]
        r = c.post("/decrypt", json={"encrypted_data": token}, headers=headers("conductor"))
        assert r.status_code == 200, r.text
        assert r.json()["plaintext"] == "behind a proxy"


def test_nginx_reuses_its_upstream_connections_to_citadel(nginx: Nginx) -> None:
    """``keepalive`` with HTTP/1.1 and an empty Connection header: one connection, many requests."""
    with httpx.Client(base_url=nginx.url, timeout=10) as c:
        for _ in range(30):
            r = c.post("/encrypt", json={"plaintext": "x"}, headers=headers("sentinel"))
            assert r.status_code == 200, r.text
            assert "close" not in r.headers.get("connection", "")
    # One client, one request at a time, one nginx worker: the /health probe's
    # connection carried all 30 (a closed one would linger here in TIME_WAIT).
    assert len(nginx.upstream_connections()) == 1, nginx.upstream_connections()


def test_citadel_answers_the_same_early_401_directly_without_nginx(
    citadel: Served, settings: Any
) -> None:
    """The control: sent straight to Citadel, the client already sees every 401."""
    body = sign_body(sign_limit(settings) - 4096)
    bad = {"X-Internal-API-Key": WRONG_KEY, "content-type": "application/json"}
    seen: Counter[Any] = Counter()
    for _ in range(40):
        with httpx.Client(base_url=citadel.url, timeout=10) as c:
            try:
                r = c.post("/sign", content=body, headers=bad)
                seen[r.status_code, r.json()["code"]] += 1
            except httpx.TransportError as exc:
                seen[type(exc).__name__] += 1
    assert seen == Counter({(401, "unauthenticated"): 40}), seen
