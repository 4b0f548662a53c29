"""citadel_client without a server: respx answers, an injected clock and sleep record the waits."""

from __future__ import annotations

import copy
import gc
import json
import pickle
import re
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from support import CLIENT_BASE as BASE
from support import FakeTime

from citadel_client import (
    AsyncCitadelClient,
    CitadelClient,
    CitadelConnectionError,
    Plaintext,
)
from citadel_client.errors import (
    BadRequest,
    CitadelError,
    Forbidden,
    HeadersTooLarge,
    InternalError,
    InvalidCiphertext,
    InvalidKey,
    InvalidRequest,
    KeyRetired,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProviderUnavailable,
    RateLimited,
    RequestTimeout,
    Unauthenticated,
    error_for_code,
)

KEY = "CANARY-API-KEY-5f1e9c"
SECRET = "CANARY-PLAINTEXT-b81d07"
OK_ENCRYPT = {"encrypted_data": "ct:1"}
OK_DECRYPT = {"plaintext": SECRET}
OK_SIGN = {"signature": "c0ffee"}
OK_REWRAP = {"encrypted_data": "cit1:newkid01:AAAA"}
ROOT = Path(__file__).resolve().parent.parent

CONTRACT_ERRORS = [
    (401, "unauthenticated", Unauthenticated),
    (403, "forbidden", Forbidden),
    (413, "payload_too_large", PayloadTooLarge),
    (422, "invalid_request", InvalidRequest),
    (400, "invalid_ciphertext", InvalidCiphertext),
    (400, "key_retired", KeyRetired),
    (400, "invalid_key", InvalidKey),
    (400, "bad_request", BadRequest),
    (404, "not_found", NotFound),
    (405, "method_not_allowed", MethodNotAllowed),
    (408, "request_timeout", RequestTimeout),
    (429, "rate_limited", RateLimited),
    (431, "headers_too_large", HeadersTooLarge),
    (500, "internal_error", InternalError),
    (503, "provider_unavailable", ProviderUnavailable),
]
NOT_RETRIED = [row for row in CONTRACT_ERRORS if row[0] not in (429, 503)]


def sync_client(fake: FakeTime, **kw: Any) -> CitadelClient:
    kw.setdefault("random", lambda: 0.5)  # jitter factor exactly 1.0
    return CitadelClient(BASE, KEY, sleep=fake.sleep, clock=fake.clock, **kw)


def async_client(fake: FakeTime, **kw: Any) -> AsyncCitadelClient:
    kw.setdefault("random", lambda: 0.5)
    return AsyncCitadelClient(BASE, KEY, sleep=fake.asleep, clock=fake.clock, **kw)


def error(status: int, code: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"detail": "Fixed text.", "code": code}, headers=headers)


def ok(body: dict[str, str]) -> httpx.Response:
    return httpx.Response(200, json=body, headers={"X-Request-ID": "srv-1"})


def texts_of(err: BaseException) -> list[str]:
    """Every way an exception usually ends up as text: logs, reprs, tracebacks."""
    return [
        repr(err),
        str(err),
        repr(err.args),
        repr(vars(err)),
        "".join(traceback.format_exception(err)),
        "".join(traceback.format_exception_only(err)),
    ]


def assert_clean(err: BaseException) -> None:
    for text in texts_of(err):
        assert SECRET not in text
        assert KEY not in text
    assert err.__cause__ is None
    assert err.__context__ is None


# -- success and headers -----------------------------------------------------


def test_encrypt_sends_key_user_and_request_id(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/encrypt").mock(return_value=ok(OK_ENCRYPT))
    with sync_client(fake) as c:
        assert c.encrypt(SECRET, user_id="user-1", request_id="req-1") == "ct:1"
    (call,) = route.calls
    assert call.request.headers["X-Internal-API-Key"] == KEY
    assert call.request.headers["X-User-ID"] == "user-1"
    assert call.request.headers["X-Request-ID"] == "req-1"
    assert call.request.headers["Content-Type"] == "application/json"
    assert json.loads(call.request.content) == {"plaintext": SECRET}
    assert fake.waits == []


def test_decrypt_returns_a_plaintext(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/decrypt").mock(return_value=ok(OK_DECRYPT))
    with sync_client(fake) as c:
        secret = c.decrypt("ct:1", request_id="req-2")
    assert isinstance(secret, Plaintext)
    assert secret.reveal() == SECRET
    (call,) = route.calls
    assert json.loads(call.request.content) == {"encrypted_data": "ct:1"}
    assert call.request.headers["X-Internal-API-Key"] == KEY
    assert call.request.headers["X-Request-ID"] == "req-2"
    assert "X-User-ID" not in call.request.headers


def test_default_user_id_and_per_call_override(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/encrypt").mock(return_value=ok(OK_ENCRYPT))
    with sync_client(fake, user_id="default-user") as c:
        c.encrypt("a")
        c.encrypt("b", user_id="other@example.com")
    first, second = (call.request for call in route.calls)
    assert first.headers["X-User-ID"] == "default-user"
    assert second.headers["X-User-ID"] == "other@example.com"
    assert "X-Request-ID" not in first.headers


def test_non_ascii_plaintext_is_sent_as_utf8(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/encrypt").mock(return_value=ok(OK_ENCRYPT))
    with sync_client(fake) as c:
        c.encrypt("clé-密钥")
    assert route.calls[0].request.content == '{"plaintext":"clé-密钥"}'.encode()


@pytest.mark.parametrize("bad", ["", "has space", "new\nline", "x" * 129, "é"])
def test_invalid_ids_are_refused_before_sending(
    mocked: respx.MockRouter, fake: FakeTime, bad: str
) -> None:
    route = mocked.post("/encrypt").mock(return_value=ok(OK_ENCRYPT))
    with sync_client(fake) as c:
        with pytest.raises(InvalidRequest) as by_user:
            c.encrypt(SECRET, user_id=bad)
        with pytest.raises(InvalidRequest):
            c.encrypt(SECRET, request_id=bad)
    assert route.call_count == 0
    if bad:
        assert bad not in str(by_user.value)
    with pytest.raises(InvalidRequest):
        sync_client(fake, user_id=bad)


def test_bad_api_key_and_deadline_are_refused_without_echo() -> None:
    with pytest.raises(ValueError) as exc:
        CitadelClient(BASE, KEY + "\n")
    assert KEY not in str(exc.value)
    with pytest.raises(ValueError):
        CitadelClient(BASE, "")
    with pytest.raises(ValueError):
        CitadelClient(BASE, KEY, deadline=0)


# -- errors ------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code", "cls"), CONTRACT_ERRORS)
def test_each_contract_code_raises_its_class(
    mocked: respx.MockRouter, fake: FakeTime, status: int, code: str, cls: type[CitadelError]
) -> None:
    # Retry-After past the deadline: even 429 and 503 are raised after one call.
    mocked.post("/decrypt").mock(
        return_value=error(status, code, **{"X-Request-ID": "rid-7", "Retry-After": "60"})
    )
    with sync_client(fake, deadline=30) as c, pytest.raises(cls) as exc:
        c.decrypt("ct:1")
    assert type(exc.value) is cls
    assert exc.value.code == code
    assert exc.value.status == status
    assert exc.value.request_id == "rid-7"
    assert exc.value.retry_after == 60
    assert exc.value.detail == "Fixed text."
    assert fake.waits == []


def test_every_code_of_the_readme_error_table_has_its_class() -> None:
    # The README's table is the contract; a code it lists must never reach a caller
    # as "unexpected answer".
    table = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([0-9, ]+) \| (`[a-z_]+`(?:, `[a-z_]+`)*) \|", table, re.M)
    listed = {
        (int(status), code.strip("` "))
        for statuses, codes in rows
        for status, code in zip(statuses.split(","), codes.split(","), strict=True)
    }
    assert len(listed) >= 14  # the regex still reads the table (14 rows in 2.1.0)
    assert {(status, code) for status, code, _ in CONTRACT_ERRORS} >= listed
    for status, code in listed:
        cls = error_for_code(code)
        assert cls is not CitadelError, code
        assert (cls.status, cls.code) == (status, code)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(500, text="<html>oops</html>"),
        httpx.Response(502, json={"detail": "x", "code": "no_such_code"}),
        httpx.Response(500, json=["not", "an", "object"]),
        httpx.Response(418, json={"detail": "no code"}),
    ],
)
def test_unknown_answers_raise_the_base_error_with_the_status(
    mocked: respx.MockRouter, fake: FakeTime, response: httpx.Response
) -> None:
    route = mocked.post("/encrypt").mock(return_value=response)
    with sync_client(fake) as c, pytest.raises(CitadelError) as exc:
        c.encrypt(SECRET)
    assert type(exc.value) is CitadelError
    assert exc.value.status == response.status_code
    assert route.call_count == 1


@pytest.mark.parametrize("body", [{}, {"encrypted_data": 5}, {"other": "x"}])
def test_a_malformed_success_is_an_error_not_a_key_error(
    mocked: respx.MockRouter, fake: FakeTime, body: dict[str, Any]
) -> None:
    route = mocked.post("/encrypt").mock(return_value=httpx.Response(200, json=body))
    with sync_client(fake) as c, pytest.raises(CitadelError) as exc:
        c.encrypt(SECRET)
    assert type(exc.value) is CitadelError and exc.value.status == 200
    assert route.call_count == 1


@pytest.mark.parametrize(("status", "code", "cls"), NOT_RETRIED)
def test_client_errors_are_never_retried(
    mocked: respx.MockRouter, fake: FakeTime, status: int, code: str, cls: type[CitadelError]
) -> None:
    route = mocked.post("/encrypt").mock(return_value=error(status, code))
    with sync_client(fake) as c, pytest.raises(cls):
        c.encrypt(SECRET)
    assert route.call_count == 1
    assert fake.waits == []


# -- retries -------------------------------------------------------------------


def test_503_is_retried_with_exponential_backoff(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/encrypt").mock(
        side_effect=[error(503, "provider_unavailable")] * 3 + [ok(OK_ENCRYPT)]
    )
    with sync_client(fake) as c:
        assert c.encrypt(SECRET) == "ct:1"
    assert fake.waits == [1, 2, 4]
    assert route.call_count == 4


def test_backoff_caps_at_16_seconds(mocked: respx.MockRouter, fake: FakeTime) -> None:
    mocked.post("/encrypt").mock(
        side_effect=[error(503, "provider_unavailable")] * 7 + [ok(OK_ENCRYPT)]
    )
    with sync_client(fake, deadline=1000) as c:
        c.encrypt(SECRET)
    assert fake.waits == [1, 2, 4, 8, 16, 16, 16]


@pytest.mark.parametrize(("roll", "factor"), [(0.0, 0.75), (0.5, 1.0), (0.999, 1.2495)])
def test_jitter_is_plus_or_minus_25_percent(
    mocked: respx.MockRouter, fake: FakeTime, roll: float, factor: float
) -> None:
    mocked.post("/encrypt").mock(
        side_effect=[error(503, "provider_unavailable")] * 3 + [ok(OK_ENCRYPT)]
    )
    with sync_client(fake, random=lambda: roll) as c:
        c.encrypt(SECRET)
    assert fake.waits == pytest.approx([1 * factor, 2 * factor, 4 * factor])


def test_429_is_retried(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/encrypt").mock(side_effect=[error(429, "rate_limited"), ok(OK_ENCRYPT)])
    with sync_client(fake) as c:
        assert c.encrypt(SECRET) == "ct:1"
    assert route.call_count == 2
    assert fake.waits == [1]


def test_retry_after_replaces_the_backoff(mocked: respx.MockRouter, fake: FakeTime) -> None:
    mocked.post("/decrypt").mock(
        side_effect=[
            error(429, "rate_limited", **{"Retry-After": "7"}),
            error(503, "provider_unavailable", **{"Retry-After": "0"}),
            error(503, "provider_unavailable", **{"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
            ok(OK_DECRYPT),
        ]
    )
    with sync_client(fake) as c:
        assert c.decrypt("ct:1").reveal() == SECRET
    # 7 and 0 as told; an HTTP-date is ignored, so the third wait is the backoff of attempt 2.
    assert fake.waits == [7, 0, 4]


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow connect"),
        httpx.ReadTimeout("slow read"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("server hung up"),
    ],
)
def test_connection_errors_are_retried_then_succeed(
    mocked: respx.MockRouter, fake: FakeTime, failure: httpx.TransportError
) -> None:
    route = mocked.post("/decrypt").mock(side_effect=[failure, failure, ok(OK_DECRYPT)])
    with sync_client(fake) as c:
        assert c.decrypt("ct:1").reveal() == SECRET
    assert route.call_count == 3
    assert fake.waits == [1, 2]


@pytest.mark.parametrize(
    "failure", [httpx.LocalProtocolError("bad header"), httpx.UnsupportedProtocol("ftp")]
)
def test_failures_a_retry_cannot_fix_are_raised_at_once(
    mocked: respx.MockRouter, fake: FakeTime, failure: httpx.TransportError
) -> None:
    route = mocked.post("/encrypt").mock(side_effect=failure)
    with sync_client(fake) as c, pytest.raises(CitadelError) as exc:
        c.encrypt(SECRET)
    assert not isinstance(exc.value, CitadelConnectionError)
    assert route.call_count == 1 and fake.waits == []


def test_deadline_stops_retries_and_raises_the_last_error(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/encrypt").mock(
        side_effect=[
            error(503, "provider_unavailable", **{"X-Request-ID": f"r{i}"}) for i in range(9)
        ]
    )
    with sync_client(fake, deadline=10) as c, pytest.raises(ProviderUnavailable) as exc:
        c.encrypt(SECRET)
    assert fake.waits == [1, 2, 4]  # after 7 s, a wait of 8 would end past 10 s
    assert route.call_count == 4
    assert exc.value.request_id == "r3"  # the last answer's


def test_retry_after_past_the_deadline_is_not_waited(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/encrypt").mock(
        return_value=error(429, "rate_limited", **{"Retry-After": "31"})
    )
    with sync_client(fake, deadline=30) as c, pytest.raises(RateLimited) as exc:
        c.encrypt(SECRET)
    assert route.call_count == 1 and fake.waits == []
    assert exc.value.retry_after == 31


def test_connection_errors_past_the_deadline_raise_connection_error(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    mocked.post("/decrypt").mock(side_effect=httpx.ConnectError(f"refused {SECRET} {KEY}"))
    with sync_client(fake, deadline=5) as c, pytest.raises(CitadelConnectionError) as exc:
        c.decrypt(SECRET)
    assert fake.waits == [1, 2]
    assert exc.value.code == "connection_error" and exc.value.status == 0
    assert "ConnectError" in str(exc.value)
    assert_clean(exc.value)


def test_each_attempt_timeout_is_cut_to_the_deadline(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/encrypt").mock(
        side_effect=[error(503, "provider_unavailable")] * 3 + [ok(OK_ENCRYPT)]
    )
    with sync_client(fake, deadline=10, timeout=5.0) as c:
        c.encrypt(SECRET)
    reads = [call.request.extensions["timeout"]["read"] for call in route.calls]
    assert reads == [5.0, 5.0, 5.0, 3.0]  # 10 - (1 + 2 + 4) left for the last attempt


# -- sign and rewrap -----------------------------------------------------------


def test_sign_sends_the_contract_body_and_returns_the_signature(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/sign").mock(return_value=ok(OK_SIGN))
    with sync_client(fake) as c:
        signature = c.sign("ct:1", "symbol=LTCBTC&side=BUY", algorithm="hmac-sha256", user_id="u-1")
    assert signature == "c0ffee"
    (call,) = route.calls
    # key_encoding left out: the server takes the algorithm's default.
    assert json.loads(call.request.content) == {
        "encrypted_data": "ct:1",
        "algorithm": "hmac-sha256",
        "message": "symbol=LTCBTC&side=BUY",
        "message_encoding": "utf-8",
        "signature_encoding": "hex",
    }
    assert call.request.headers["X-Internal-API-Key"] == KEY
    assert call.request.headers["X-User-ID"] == "u-1"


def test_sign_sends_every_encoding_it_is_given(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/sign").mock(return_value=ok(OK_SIGN))
    with sync_client(fake) as c:
        c.sign(
            "ct:1",
            "L3ByaXZhdGU=",
            algorithm="hmac-sha512",
            message_encoding="base64",
            key_encoding="base64",
            signature_encoding="base64",
            request_id="req-9",
        )
    (call,) = route.calls
    assert json.loads(call.request.content) == {
        "encrypted_data": "ct:1",
        "algorithm": "hmac-sha512",
        "message": "L3ByaXZhdGU=",
        "message_encoding": "base64",
        "key_encoding": "base64",
        "signature_encoding": "base64",
    }
    assert call.request.headers["X-Request-ID"] == "req-9"


def test_sign_is_retried_on_503_429_and_connection_errors(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/sign").mock(
        side_effect=[
            error(503, "provider_unavailable"),
            error(429, "rate_limited", **{"Retry-After": "3"}),
            httpx.ConnectError("refused"),
            ok(OK_SIGN),
        ]
    )
    with sync_client(fake) as c:
        assert c.sign("ct:1", "m", algorithm="ed25519") == "c0ffee"
    assert route.call_count == 4
    assert fake.waits == [1, 3, 4]
    bodies = {call.request.content for call in route.calls}
    assert len(bodies) == 1  # every attempt sends the same request


def test_sign_invalid_key_is_raised_at_once(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/sign").mock(return_value=error(400, "invalid_key"))
    with sync_client(fake) as c, pytest.raises(InvalidKey) as exc:
        c.sign("ct:1", "m", algorithm="rsa-pkcs1v15-sha256", key_encoding="pem")
    assert route.call_count == 1 and fake.waits == []
    assert exc.value.status == 400


def test_sign_answer_without_a_signature_is_an_error(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    mocked.post("/sign").mock(return_value=ok(OK_ENCRYPT))
    with sync_client(fake) as c, pytest.raises(CitadelError) as exc:
        c.sign("ct:1", "m", algorithm="hmac-sha256")
    assert type(exc.value) is CitadelError and exc.value.status == 200


def test_rewrap_sends_the_ciphertext_and_returns_the_new_one(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/rewrap").mock(return_value=ok(OK_REWRAP))
    with sync_client(fake, user_id="migration") as c:
        assert c.rewrap("cit1:oldkid01:BBBB", request_id="row-17") == "cit1:newkid01:AAAA"
    (call,) = route.calls
    assert json.loads(call.request.content) == {"encrypted_data": "cit1:oldkid01:BBBB"}
    assert call.request.headers["X-User-ID"] == "migration"
    assert call.request.headers["X-Request-ID"] == "row-17"
    assert call.request.headers["X-Internal-API-Key"] == KEY


def test_rewrap_is_retried_on_503_429_and_connection_errors(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/rewrap").mock(
        side_effect=[
            httpx.ReadTimeout("slow"),
            error(429, "rate_limited"),
            error(503, "provider_unavailable", **{"Retry-After": "2"}),
            ok(OK_REWRAP),
        ]
    )
    with sync_client(fake) as c:
        assert c.rewrap("ct:1") == "cit1:newkid01:AAAA"
    assert route.call_count == 4
    assert fake.waits == [1, 2, 2]


@pytest.mark.parametrize(
    ("code", "cls"), [("key_retired", KeyRetired), ("invalid_ciphertext", InvalidCiphertext)]
)
def test_rewrap_of_an_unusable_ciphertext_is_raised_at_once(
    mocked: respx.MockRouter, fake: FakeTime, code: str, cls: type[CitadelError]
) -> None:
    route = mocked.post("/rewrap").mock(return_value=error(400, code))
    with sync_client(fake) as c, pytest.raises(cls):
        c.rewrap("ct:1")
    assert route.call_count == 1 and fake.waits == []


def test_rewrap_deadline_raises_connection_error(mocked: respx.MockRouter, fake: FakeTime) -> None:
    mocked.post("/rewrap").mock(side_effect=httpx.ConnectError("refused"))
    with sync_client(fake, deadline=5) as c, pytest.raises(CitadelConnectionError):
        c.rewrap("ct:1")
    assert fake.waits == [1, 2]


# -- nothing leaks -------------------------------------------------------------


def test_plaintext_never_shows_its_value() -> None:
    secret = Plaintext(SECRET)
    shown = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        f"{secret!s}",
        f"{secret:>40}",
        "%s %r" % (secret, secret),  # noqa: UP031 - the old formatting path too
        "{}".format(secret),  # noqa: UP032
        format(secret, ""),
        repr([secret]),
        repr({"k": secret}),
    ]
    assert all(SECRET not in s for s in shown)
    assert repr(secret) == str(secret) == "Plaintext('**********')"
    assert not hasattr(secret, "__dict__")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plaintext_cannot_be_pickled(protocol: int) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Plaintext(SECRET), protocol=protocol)


def test_plaintext_cannot_be_copied_or_hashed() -> None:
    for dup in (copy.copy, copy.deepcopy):
        with pytest.raises(TypeError):
            dup(Plaintext(SECRET))
    with pytest.raises(TypeError):
        hash(Plaintext(SECRET))


def test_plaintext_equality() -> None:
    assert Plaintext(SECRET) == Plaintext(SECRET)
    assert Plaintext(SECRET) != Plaintext(SECRET + "x")
    assert Plaintext("clé") == Plaintext("clé")  # not ASCII: compared as UTF-8 bytes
    assert Plaintext(SECRET) != SECRET  # only another Plaintext compares


def test_with_block_clears_the_plaintext() -> None:
    with Plaintext(SECRET) as secret:
        assert secret.reveal() == SECRET
        assert secret.get_secret_value() == SECRET
    with pytest.raises(ValueError, match="plaintext was cleared"):
        secret.reveal()
    with pytest.raises(ValueError, match="plaintext was cleared"):
        secret.get_secret_value()
    assert secret != Plaintext(SECRET)


def test_with_block_clears_even_on_error() -> None:
    with pytest.raises(RuntimeError), Plaintext(SECRET) as secret:
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="cleared"):
        secret.reveal()


def test_decrypt_with_block(mocked: respx.MockRouter, fake: FakeTime) -> None:
    mocked.post("/decrypt").mock(return_value=ok(OK_DECRYPT))
    with sync_client(fake) as c:
        with c.decrypt("ct:1") as secret:
            assert secret.reveal() == SECRET
        with pytest.raises(ValueError, match="cleared"):
            secret.reveal()


def test_client_repr_hides_the_key(fake: FakeTime) -> None:
    with sync_client(fake) as c:
        assert KEY not in repr(c) and KEY not in str(c)
    assert KEY not in repr(async_client(fake))


@pytest.mark.parametrize(
    "answer",
    [
        error(422, "invalid_request"),
        error(400, "invalid_ciphertext"),
        httpx.Response(500, text=f"echo {SECRET} {KEY}"),
        httpx.Response(200, text=f"not json {SECRET}"),
        httpx.Response(200, json={"encrypted_data": None, "plaintext_echo": SECRET}),
        httpx.ReadTimeout(f"timed out sending {SECRET} with {KEY}"),
        httpx.LocalProtocolError(f"bad {KEY}"),
        httpx.DecodingError(f"cannot decode {SECRET}"),
    ],
)
def test_no_error_text_holds_the_plaintext_or_the_key(
    mocked: respx.MockRouter, fake: FakeTime, answer: httpx.Response | Exception
) -> None:
    if isinstance(answer, Exception):
        mocked.post("/encrypt").mock(side_effect=answer)
        mocked.post("/decrypt").mock(side_effect=answer)
    else:
        mocked.post("/encrypt").mock(return_value=answer)
        mocked.post("/decrypt").mock(return_value=answer)
    for path in ("/sign", "/rewrap"):
        if isinstance(answer, Exception):
            mocked.post(path).mock(side_effect=answer)
        else:
            mocked.post(path).mock(return_value=answer)
    with sync_client(fake, deadline=2) as c:
        for call in (
            lambda: c.encrypt(SECRET),
            lambda: c.decrypt(SECRET),
            lambda: c.sign(SECRET, SECRET, algorithm="hmac-sha256"),
            lambda: c.rewrap(SECRET),
        ):
            with pytest.raises(CitadelError) as exc:
                call()
            assert_clean(exc.value)


def test_responses_are_closed_and_not_kept(fake: FakeTime) -> None:
    seen: list[weakref.ref[httpx.Response]] = []
    closed: list[Callable[[], bool]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        status = 503 if not seen else 200
        body = {"detail": "d", "code": "provider_unavailable"} if status == 503 else OK_DECRYPT
        response = httpx.Response(status, json=body)
        seen.append(weakref.ref(response))
        closed.append(lambda: response.is_closed)
        return response

    with sync_client(fake, transport=httpx.MockTransport(handler)) as c:
        secret = c.decrypt("ct:1")
        assert all(is_closed() for is_closed in closed)
        closed.clear()  # the lambdas hold the responses
        gc.collect()
        assert [ref() for ref in seen] == [None, None]
    assert secret.reveal() == SECRET


def test_context_manager_and_close_close_the_pool(fake: FakeTime) -> None:
    with sync_client(fake) as c:
        pass
    assert c._http.is_closed
    other = sync_client(fake)
    other.close()
    assert other._http.is_closed


# -- async ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_encrypt_and_decrypt(mocked: respx.MockRouter, fake: FakeTime) -> None:
    enc = mocked.post("/encrypt").mock(return_value=ok(OK_ENCRYPT))
    mocked.post("/decrypt").mock(return_value=ok(OK_DECRYPT))
    async with async_client(fake, user_id="default-user") as c:
        assert await c.encrypt(SECRET, user_id="u-2", request_id="req-3") == "ct:1"
        with await c.decrypt("ct:1") as secret:
            assert secret.reveal() == SECRET
        with pytest.raises(ValueError, match="cleared"):
            secret.reveal()
    headers = enc.calls[0].request.headers
    assert headers["X-Internal-API-Key"] == KEY
    assert headers["X-User-ID"] == "u-2"
    assert headers["X-Request-ID"] == "req-3"
    assert c._http.is_closed


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "code", "cls"), CONTRACT_ERRORS)
async def test_async_contract_codes(
    mocked: respx.MockRouter, fake: FakeTime, status: int, code: str, cls: type[CitadelError]
) -> None:
    route = mocked.post("/decrypt").mock(
        return_value=error(status, code, **{"X-Request-ID": "rid-9", "Retry-After": "99"})
    )
    async with async_client(fake) as c:
        with pytest.raises(cls) as exc:
            await c.decrypt(SECRET)
    assert type(exc.value) is cls and exc.value.request_id == "rid-9"
    assert route.call_count == 1 and fake.waits == []
    assert_clean(exc.value)


@pytest.mark.anyio
async def test_async_retries_503_429_and_connection_errors(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/encrypt").mock(
        side_effect=[
            error(503, "provider_unavailable"),
            httpx.ConnectError("refused"),
            error(429, "rate_limited", **{"Retry-After": "5"}),
            ok(OK_ENCRYPT),
        ]
    )
    async with async_client(fake) as c:
        assert await c.encrypt(SECRET) == "ct:1"
    assert route.call_count == 4
    assert fake.waits == [1, 2, 5]


@pytest.mark.anyio
async def test_async_deadline_raises_the_last_error(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    mocked.post("/decrypt").mock(side_effect=httpx.ReadTimeout(f"slow {SECRET}"))
    async with async_client(fake, deadline=10) as c:
        with pytest.raises(CitadelConnectionError) as exc:
            await c.decrypt(SECRET)
    assert fake.waits == [1, 2, 4]
    assert_clean(exc.value)


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "code", "cls"), NOT_RETRIED)
async def test_async_client_errors_are_not_retried(
    mocked: respx.MockRouter, fake: FakeTime, status: int, code: str, cls: type[CitadelError]
) -> None:
    route = mocked.post("/encrypt").mock(return_value=error(status, code))
    async with async_client(fake) as c:
        with pytest.raises(cls):
            await c.encrypt(SECRET)
    assert route.call_count == 1 and fake.waits == []


@pytest.mark.anyio
async def test_async_aclose(fake: FakeTime) -> None:
    c = async_client(fake)
    await c.aclose()
    assert c._http.is_closed


@pytest.mark.anyio
async def test_async_sign_and_rewrap(mocked: respx.MockRouter, fake: FakeTime) -> None:
    sign = mocked.post("/sign").mock(return_value=ok(OK_SIGN))
    mocked.post("/rewrap").mock(return_value=ok(OK_REWRAP))
    async with async_client(fake) as c:
        signature = await c.sign(
            "ct:1", "m", algorithm="ecdsa-p256-sha256", signature_encoding="base64url"
        )
        assert signature == "c0ffee"
        assert await c.rewrap("ct:1", user_id="u-3") == "cit1:newkid01:AAAA"
    assert json.loads(sign.calls[0].request.content) == {
        "encrypted_data": "ct:1",
        "algorithm": "ecdsa-p256-sha256",
        "message": "m",
        "message_encoding": "utf-8",
        "signature_encoding": "base64url",
    }


@pytest.mark.anyio
async def test_async_sign_and_rewrap_are_retried(mocked: respx.MockRouter, fake: FakeTime) -> None:
    mocked.post("/sign").mock(side_effect=[error(503, "provider_unavailable"), ok(OK_SIGN)])
    rewrap = mocked.post("/rewrap").mock(
        side_effect=[httpx.ConnectError("refused"), error(429, "rate_limited"), ok(OK_REWRAP)]
    )
    async with async_client(fake) as c:
        assert await c.sign("ct:1", "m", algorithm="hmac-sha256") == "c0ffee"
        assert await c.rewrap("ct:1") == "cit1:newkid01:AAAA"
    assert rewrap.call_count == 3
    assert fake.waits == [1, 1, 2]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("code", "cls"), [("key_retired", KeyRetired), ("invalid_key", InvalidKey)]
)
async def test_async_sign_and_rewrap_errors_are_not_retried(
    mocked: respx.MockRouter, fake: FakeTime, code: str, cls: type[CitadelError]
) -> None:
    sign = mocked.post("/sign").mock(return_value=error(400, code))
    rewrap = mocked.post("/rewrap").mock(return_value=error(400, code))
    async with async_client(fake) as c:
        with pytest.raises(cls):
            await c.sign(SECRET, "m", algorithm="hmac-sha256")
        with pytest.raises(cls) as exc:
            await c.rewrap(SECRET)
    assert sign.call_count == rewrap.call_count == 1 and fake.waits == []
    assert_clean(exc.value)


def test_on_retry_is_told_each_wait_before_it_starts(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    """What a progress display shows: the error and the wait, once per wait, none at the end."""
    seen: list[tuple[str, float]] = []
    mocked.post("/encrypt").mock(
        side_effect=[
            error(429, "rate_limited", **{"Retry-After": "3"}),
            error(503, "provider_unavailable"),
            ok(OK_ENCRYPT),
        ]
    )
    with sync_client(fake, on_retry=lambda err, wait: seen.append((err.code, wait))) as c:
        assert c.encrypt(SECRET) == "ct:1"
    assert seen == [("rate_limited", 3.0), ("provider_unavailable", 2.0)]
    assert fake.waits == [3.0, 2.0]


@pytest.mark.anyio
async def test_async_on_retry_is_told_each_wait(mocked: respx.MockRouter, fake: FakeTime) -> None:
    seen: list[float] = []
    mocked.post("/rewrap").mock(
        side_effect=[error(503, "provider_unavailable", **{"Retry-After": "1"}), ok(OK_REWRAP)]
    )
    async with async_client(fake, on_retry=lambda _err, wait: seen.append(wait)) as c:
        assert await c.rewrap("ct") == OK_REWRAP["encrypted_data"]
    assert seen == [1.0]
