"""citadel.client: against a real Citadel on loopback, and with respx for retry timing."""

from __future__ import annotations

import pickle
import traceback
from typing import Any

import httpx
import pytest
import respx
from support import CLIENT_BASE as BASE
from support import KEYS, FakeTime, Served

from citadel import (
    AsyncCitadelClient,
    AuditUnavailable,
    CitadelClient,
    CitadelConnectionError,
    CitadelError,
    Forbidden,
    InvalidCiphertext,
    InvalidRequest,
    PayloadTooLarge,
    Plaintext,
    ProviderUnavailable,
    RateLimited,
    Unauthenticated,
)

CANARY = "CANARY-CLIENT-PLAINTEXT-77"


def client(fake: FakeTime, **kw: Any) -> CitadelClient:
    return CitadelClient(BASE, "k", sleep=fake.sleep, clock=fake.clock, random=lambda: 0.5, **kw)


def error(status: int, code: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"detail": "d", "code": code}, headers=headers)


# -- against a real Citadel ------------------------------------------------


def test_sentinel_and_conductor_round_trip(citadel: Served) -> None:
    with CitadelClient(citadel.url, KEYS["sentinel"]) as sentinel:
        ct = sentinel.encrypt(CANARY, user_id="user-1", request_id="req-42")
    with CitadelClient(citadel.url, KEYS["conductor"], user_id="user-1") as conductor:
        secret = conductor.decrypt(ct)
    assert secret.reveal() == CANARY
    events = citadel.audit.events()
    assert events[0]["request_id"] == "req-42"
    assert events[0]["user_id"] == events[1]["user_id"] is not None


@pytest.mark.parametrize(
    ("caller", "call", "expected"),
    [
        (None, "encrypt", Unauthenticated),
        ("conductor", "encrypt", Forbidden),
        ("sentinel", "encrypt-huge", PayloadTooLarge),
        ("sentinel", "encrypt-empty", InvalidRequest),
        ("conductor", "decrypt-bad", InvalidCiphertext),
    ],
)
def test_each_error_code_raises_its_class_live(
    citadel: Served, caller: str | None, call: str, expected: type[CitadelError]
) -> None:
    key = KEYS[caller] if caller else "wrong-key"
    with CitadelClient(citadel.url, key) as c, pytest.raises(expected) as exc:
        if call == "encrypt":
            c.encrypt("x")
        elif call == "encrypt-huge":
            c.encrypt("x" * 5000)
        elif call == "encrypt-empty":
            c.encrypt("")
        else:
            c.decrypt("not-a-ciphertext")
    assert exc.value.request_id
    assert exc.value.code == expected.code


def test_rate_limit_live_is_retried_until_the_deadline(tmp_path: Any, fake: FakeTime) -> None:
    from support import make_settings, serve_citadel

    settings = make_settings(tmp_path, rate_limit_per_caller="1/minute")
    with (
        serve_citadel(settings) as s,
        CitadelClient(
            s.url, KEYS["sentinel"], deadline=90, sleep=fake.sleep, clock=fake.clock
        ) as c,
    ):
        c.encrypt("first")
        with pytest.raises(RateLimited) as exc:
            c.encrypt("second")
    assert 1 <= exc.value.retry_after <= 60  # type: ignore[operator]
    assert fake.waits and all(w == fake.waits[0] for w in fake.waits)  # Retry-After, not backoff


def test_a_broken_audit_log_raises_audit_unavailable_a_provider_unavailable(
    citadel: Served, fake: FakeTime
) -> None:
    """The audit 503 keeps the contract's code; its class tells an operator which 503 it was."""
    citadel.audit.fail = True
    waits: list[tuple[str, float]] = []
    with (
        CitadelClient(
            citadel.url,
            KEYS["sentinel"],
            deadline=3,
            sleep=fake.sleep,
            clock=fake.clock,
            on_retry=lambda err, wait: waits.append((type(err).__name__, wait)),
        ) as c,
        pytest.raises(AuditUnavailable) as exc,
    ):
        c.encrypt("x")
    assert isinstance(exc.value, ProviderUnavailable)
    assert exc.value.code == "provider_unavailable" and exc.value.retry_after == 1
    assert waits and all(w == ("AuditUnavailable", 1.0) for w in waits)


@pytest.mark.anyio
async def test_async_client_round_trip(citadel: Served) -> None:
    async with AsyncCitadelClient(citadel.url, KEYS["sentinel"]) as sentinel:
        ct = await sentinel.encrypt(CANARY)
    async with AsyncCitadelClient(citadel.url, KEYS["conductor"]) as conductor:
        with await conductor.decrypt(ct) as secret:
            assert secret.reveal() == CANARY
        with pytest.raises(ValueError, match="cleared"):
            secret.reveal()


# -- retries, with respx ----------------------------------------------------


def test_headers_are_sent(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/encrypt").respond(200, json={"encrypted_data": "ct"})
    with client(fake, user_id="default-user") as c:
        assert c.encrypt("p", request_id="r1") == "ct"
        c.encrypt("p", user_id="other")
    first, second = (call.request for call in route.calls)
    assert first.headers["x-internal-api-key"] == "k"
    assert first.headers["x-user-id"] == "default-user"
    assert first.headers["x-request-id"] == "r1"
    assert second.headers["x-user-id"] == "other"
    assert "x-request-id" not in second.headers


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid_ciphertext", InvalidCiphertext),
        (401, "unauthenticated", Unauthenticated),
        (403, "forbidden", Forbidden),
        (413, "payload_too_large", PayloadTooLarge),
        (422, "invalid_request", InvalidRequest),
    ],
)
def test_client_errors_are_not_retried(
    mocked: respx.MockRouter, fake: FakeTime, status: int, code: str, cls: type[CitadelError]
) -> None:
    route = mocked.post("/decrypt").mock(return_value=error(status, code, **{"X-Request-ID": "r9"}))
    with client(fake) as c, pytest.raises(cls) as exc:
        c.decrypt("ct")
    assert route.call_count == 1
    assert fake.waits == []
    assert exc.value.request_id == "r9"


def test_503_is_retried_with_exponential_backoff(mocked: respx.MockRouter, fake: FakeTime) -> None:
    mocked.post("/encrypt").mock(
        side_effect=[error(503, "provider_unavailable")] * 4
        + [httpx.Response(200, json={"encrypted_data": "ct"})]
    )
    with client(fake) as c:
        assert c.encrypt("p") == "ct"
    assert fake.waits == [1, 2, 4, 8]  # jitter factor 1.0 with random() = 0.5


def test_backoff_is_capped_at_16_seconds_and_jittered(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    mocked.post("/encrypt").mock(return_value=error(503, "provider_unavailable"))
    rolls = iter([0.0, 1.0] * 10)
    with (
        CitadelClient(
            BASE, "k", sleep=fake.sleep, clock=fake.clock, random=lambda: next(rolls), deadline=200
        ) as c,
        pytest.raises(ProviderUnavailable),
    ):
        c.encrypt("p")
    assert fake.waits[:7] == [0.75, 2.5, 3.0, 10.0, 12.0, 20.0, 12.0]


def test_retry_after_is_honoured(mocked: respx.MockRouter, fake: FakeTime) -> None:
    mocked.post("/encrypt").mock(
        side_effect=[
            error(429, "rate_limited", **{"Retry-After": "7"}),
            error(503, "provider_unavailable", **{"Retry-After": "3"}),
            httpx.Response(200, json={"encrypted_data": "ct"}),
        ]
    )
    with client(fake) as c:
        assert c.encrypt("p") == "ct"
    assert fake.waits == [7, 3]


def test_deadline_stops_retrying_and_raises_the_last_error(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/encrypt").mock(return_value=error(503, "provider_unavailable"))
    with client(fake, deadline=10) as c, pytest.raises(ProviderUnavailable):
        c.encrypt("p")
    assert fake.waits == [1, 2, 4]  # a wait of 8 more would end at 15 > 10
    assert route.call_count == 4


def test_connection_errors_are_retried_then_succeed(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    mocked.post("/decrypt").mock(
        side_effect=[
            httpx.ConnectError("refused"),
            httpx.ReadTimeout("slow"),
            httpx.Response(200, json={"plaintext": "s"}),
        ]
    )
    with client(fake) as c:
        assert c.decrypt("ct").reveal() == "s"
    assert fake.waits == [1, 2]


def test_connection_errors_past_the_deadline_raise_connection_error(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    mocked.post("/decrypt").mock(side_effect=httpx.ConnectError("refused " + CANARY))
    with client(fake, deadline=5) as c, pytest.raises(CitadelConnectionError) as exc:
        c.decrypt(CANARY)
    assert exc.value.__cause__ is None and exc.value.__context__ is None
    assert CANARY not in "".join(traceback.format_exception(exc.value))


def test_non_json_503_is_retried(mocked: respx.MockRouter, fake: FakeTime) -> None:
    mocked.post("/encrypt").mock(
        side_effect=[
            httpx.Response(503, text="<html>bad gateway</html>"),
            httpx.Response(200, json={"encrypted_data": "ct"}),
        ]
    )
    with client(fake) as c:
        assert c.encrypt("p") == "ct"
    assert fake.waits == [1]


@pytest.mark.anyio
async def test_async_retries_use_the_injected_sleep(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    mocked.post("/decrypt").mock(
        side_effect=[
            error(503, "provider_unavailable"),
            httpx.Response(200, json={"plaintext": "s"}),
        ]
    )
    async with AsyncCitadelClient(
        BASE, "k", sleep=fake.asleep, clock=fake.clock, random=lambda: 0.5
    ) as c:
        assert (await c.decrypt("ct")).reveal() == "s"
    assert fake.waits == [1]


@pytest.mark.anyio
async def test_async_client_errors_are_typed(mocked: respx.MockRouter, fake: FakeTime) -> None:
    mocked.post("/encrypt").mock(return_value=error(403, "forbidden"))
    async with AsyncCitadelClient(BASE, "k", sleep=fake.asleep, clock=fake.clock) as c:
        with pytest.raises(Forbidden):
            await c.encrypt("p")


# -- nothing shows a plaintext ----------------------------------------------


def test_plaintext_never_shows_its_value() -> None:
    secret = Plaintext(CANARY)
    shown = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        "%s" % secret,  # noqa: UP031 - the old formatting path too
        format(secret, ""),
    ]
    assert all(CANARY not in s for s in shown)
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    assert secret == Plaintext(CANARY)
    assert secret != Plaintext("other")


def test_with_block_clears_the_plaintext() -> None:
    with Plaintext(CANARY) as secret:
        assert secret.reveal() == CANARY
    with pytest.raises(ValueError, match="cleared"):
        secret.reveal()
    assert CANARY not in repr(vars(secret) if hasattr(secret, "__dict__") else secret.__slots__)


def test_no_plaintext_or_key_in_errors_or_client_reprs(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    mocked.post("/encrypt").mock(return_value=error(422, "invalid_request"))
    mocked.post("/decrypt").mock(return_value=httpx.Response(500, text=CANARY))
    with CitadelClient(BASE, "KEY-" + CANARY, sleep=fake.sleep, clock=fake.clock) as c:
        texts = [repr(c), str(c)]
        for call in (lambda: c.encrypt(CANARY), lambda: c.decrypt(CANARY)):
            with pytest.raises(CitadelError) as exc:
                call()
            texts += [repr(exc.value), str(exc.value), repr(exc.value.args)]
            texts.append("".join(traceback.format_exception(exc.value)))
    assert all(CANARY not in t for t in texts)
