"""The clients' batches and contexts on the wire (respx answers; the live tests are in
tests/test_client_batches.py): the contract's bodies, chunking, typed per-item results."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import respx
from support import CLIENT_BASE as BASE
from support import FakeTime

from citadel_client import (
    AsyncCitadelClient,
    CitadelClient,
    CitadelError,
    InvalidCiphertext,
    InvalidKey,
    InvalidRequest,
    ItemResult,
    KeyRetired,
    Plaintext,
    RateLimited,
)

KEY = "CANARY-BATCH-API-KEY-91a2"
SECRET = "CANARY-BATCH-PLAINTEXT-3c7e"
CONTEXT_VALUE = "CANARY-CONTEXT-VALUE-8413"


def client(fake: FakeTime, **kw: Any) -> CitadelClient:
    return CitadelClient(BASE, KEY, sleep=fake.sleep, clock=fake.clock, random=lambda: 0.5, **kw)


def sent(route: respx.Route, n: int = -1) -> Any:
    return json.loads(route.calls[n].request.content)


def echo(field: str, prefix: str = "ct:") -> Any:
    """An answer with one result per item, in order, each naming its item."""

    def answer(request: httpx.Request) -> httpx.Response:
        items = json.loads(request.content)["batch"]
        first = next(iter(items[0].values())) if items else ""
        results = [{field: f"{prefix}{next(iter(item.values()))}"} for item in items]
        return httpx.Response(
            200, json={"batch": results}, headers={"X-Request-ID": f"rid-{first}"}
        )

    return answer


# -- single calls with a context ------------------------------------------------------------


def test_single_calls_send_the_context(mocked: respx.MockRouter, fake: FakeTime) -> None:
    ctx = {"user_id": "8413", "exchange": "binance"}
    enc = mocked.post("/encrypt").respond(200, json={"encrypted_data": "ct"})
    dec = mocked.post("/decrypt").respond(200, json={"plaintext": SECRET})
    sig = mocked.post("/sign").respond(200, json={"signature": "ab"})
    with client(fake) as c:
        c.encrypt(SECRET, context=ctx)
        c.decrypt("ct", context=ctx).clear()
        c.sign("ct", "m", algorithm="hmac-sha256", context=ctx)
    assert sent(enc) == {"plaintext": SECRET, "context": ctx}
    assert sent(dec) == {"encrypted_data": "ct", "context": ctx}
    assert sent(sig)["context"] == ctx


def test_single_calls_without_a_context_send_none(mocked: respx.MockRouter, fake: FakeTime) -> None:
    enc = mocked.post("/encrypt").respond(200, json={"encrypted_data": "ct"})
    with client(fake) as c:
        c.encrypt(SECRET)
    assert sent(enc) == {"plaintext": SECRET}


def test_rewrap_keeps_or_replaces_the_context(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/rewrap").respond(200, json={"encrypted_data": "ct2"})
    with client(fake) as c:
        c.rewrap("ct", context={"user_id": "1"})
        c.rewrap("ct", new_context={"user_id": "2"})
    assert sent(route, 0) == {"encrypted_data": "ct", "context": {"user_id": "1"}}
    assert sent(route, 1) == {"encrypted_data": "ct", "new_context": {"user_id": "2"}}


def test_a_context_that_is_not_a_mapping_is_refused_before_sending(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/encrypt").respond(200, json={"encrypted_data": "ct"})
    with client(fake) as c, pytest.raises(TypeError, match="context must be a mapping"):
        c.encrypt("x", context=[("user_id", "1")])  # type: ignore[arg-type]
    assert not route.called


# -- the batch body and its results ---------------------------------------------------------


def test_encrypt_many_sends_one_batch_and_returns_results_in_order(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/encrypt").mock(side_effect=echo("encrypted_data"))
    with client(fake) as c:
        results = c.encrypt_many(["a", {"plaintext": "b", "context": {"user_id": "7"}}, "c"])
    assert route.call_count == 1
    assert route.calls.last.request.headers["X-Internal-API-Key"] == KEY
    assert sent(route) == {
        "batch": [
            {"plaintext": "a"},
            {"plaintext": "b", "context": {"user_id": "7"}},
            {"plaintext": "c"},
        ]
    }
    assert [r.value for r in results] == ["ct:a", "ct:b", "ct:c"]
    assert [r.batch_index for r in results] == [0, 1, 2]
    assert {r.request_id for r in results} == {"rid-a"}
    assert all(r.ok and r.error is None for r in results)


def test_a_shared_context_fills_only_the_items_that_name_none(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/decrypt").mock(side_effect=echo("plaintext"))
    own = {"user_id": "9"}
    with client(fake) as c:
        c.decrypt_many(["x", {"encrypted_data": "y", "context": own}], context={"user_id": "1"})
    assert sent(route)["batch"] == [
        {"encrypted_data": "x", "context": {"user_id": "1"}},
        {"encrypted_data": "y", "context": own},
    ]


def test_lists_longer_than_the_limit_go_in_several_requests_in_order(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/rewrap").mock(side_effect=echo("encrypted_data", "new:"))
    items = [f"c{i}" for i in range(250)]
    with client(fake) as c:
        results = c.rewrap_many(items, request_id="job-7")
    assert [len(sent(route, n)["batch"]) for n in range(route.call_count)] == [100, 100, 50]
    assert [r.value for r in results] == [f"new:c{i}" for i in range(250)]
    assert [call.request.headers["X-Request-ID"] for call in route.calls] == [
        "job-7.0",
        "job-7.1",
        "job-7.2",
    ]
    assert results[150].batch_index == 50 and results[150].request_id == "rid-c100"


def test_the_caller_gives_the_batch_limit(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/encrypt").mock(side_effect=echo("encrypted_data"))
    with client(fake) as c:
        c.encrypt_many([str(i) for i in range(7)], max_batch_items=3, request_id="one")
    assert [len(sent(route, n)["batch"]) for n in range(3)] == [3, 3, 1]


def test_one_request_within_the_limit_keeps_the_request_id(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/encrypt").mock(side_effect=echo("encrypted_data"))
    with client(fake) as c:
        c.encrypt_many(["a", "b"], request_id="job-1")
    assert route.calls.last.request.headers["X-Request-ID"] == "job-1"


def test_bodies_stay_under_the_byte_limit_and_a_large_item_goes_alone(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/encrypt").mock(side_effect=echo("encrypted_data"))
    items = ["a" * 40, "b" * 40, "c" * 300, "d" * 40]
    with client(fake) as c:
        results = c.encrypt_many(items, max_batch_bytes=140)
    bodies = [route.calls[n].request.content for n in range(route.call_count)]
    assert [len(json.loads(b)["batch"]) for b in bodies] == [2, 1, 1]
    assert all(len(b) <= 140 for i, b in enumerate(bodies) if i != 1)
    assert [r.value for r in results] == [f"ct:{i}" for i in items]


def test_an_empty_list_sends_nothing(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/encrypt").respond(200, json={"batch": []})
    with client(fake) as c:
        assert c.encrypt_many([]) == []
    assert not route.called


def test_per_item_errors_are_typed_and_hold_nothing_the_item_sent(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    def err(code: str) -> dict[str, Any]:
        return {"error": {"code": code, "detail": "fixed text"}}

    mocked.post("/sign").respond(
        200,
        json={
            "batch": [
                {"signature": "ab"},
                err("invalid_ciphertext"),
                err("key_retired"),
                err("invalid_key"),
                err("some_future_code"),
            ]
        },
        headers={"X-Request-ID": "rid-sign"},
    )
    items = [
        {"encrypted_data": SECRET, "message": SECRET, "context": {"u": CONTEXT_VALUE}}
        for _ in range(5)
    ]
    with client(fake) as c:
        results = c.sign_many(items, algorithm="hmac-sha256")  # type: ignore[arg-type]
    assert results[0].value == "ab"
    errors = [r.error for r in results[1:]]
    assert [type(e) for e in errors] == [InvalidCiphertext, KeyRetired, InvalidKey, CitadelError]
    assert all(e is not None and e.request_id == "rid-sign" for e in errors)
    for result in results[1:]:
        assert not result.ok and result.value is None
        text = str(result) + repr(result) + str(result.error) + repr(result.error)
        assert SECRET not in text and CONTEXT_VALUE not in text and KEY not in text
    with pytest.raises(KeyRetired):
        results[2].unwrap()
    assert results[0].unwrap() == "ab"


def test_sign_many_keywords_fill_what_an_item_leaves_out(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/sign").respond(
        200, json={"batch": [{"signature": "1"}, {"signature": "2"}]}
    )
    items: list[Any] = [
        {"encrypted_data": "a", "message": "m1"},
        {"encrypted_data": "b", "message": "m2", "algorithm": "ed25519", "key_encoding": "pem"},
    ]
    with client(fake) as c:
        c.sign_many(items, algorithm="hmac-sha512", signature_encoding="base64")
    assert sent(route)["batch"] == [
        {
            "encrypted_data": "a",
            "message": "m1",
            "algorithm": "hmac-sha512",
            "signature_encoding": "base64",
        },
        {
            "encrypted_data": "b",
            "message": "m2",
            "algorithm": "ed25519",
            "key_encoding": "pem",
            "signature_encoding": "base64",
        },
    ]


def test_decrypt_many_values_are_plaintexts(mocked: respx.MockRouter, fake: FakeTime) -> None:
    mocked.post("/decrypt").respond(200, json={"batch": [{"plaintext": SECRET}]})
    with client(fake) as c:
        (result,) = c.decrypt_many(["ct"])
    assert isinstance(result.value, Plaintext)
    assert SECRET not in repr(result) + str(result)
    with result.unwrap() as plain:
        assert plain.reveal() == SECRET


def test_rewrap_many_sends_each_items_new_context(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/rewrap").respond(
        200, json={"batch": [{"encrypted_data": "n1"}, {"encrypted_data": "n2"}]}
    )
    with client(fake) as c:
        c.rewrap_many(
            [{"encrypted_data": "o1", "new_context": {"user_id": "1"}}, "o2"],
            new_context={"user_id": "2"},
        )
    assert sent(route)["batch"] == [
        {"encrypted_data": "o1", "new_context": {"user_id": "1"}},
        {"encrypted_data": "o2", "new_context": {"user_id": "2"}},
    ]


# -- whole-request answers ------------------------------------------------------------------


def test_a_refused_batch_is_raised_like_a_single_call(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    mocked.post("/encrypt").respond(422, json={"code": "invalid_request", "detail": "x"})
    with client(fake) as c, pytest.raises(InvalidRequest):
        c.encrypt_many(["a", "b"])
    assert fake.waits == []


def test_a_rate_limited_request_is_retried_alone(mocked: respx.MockRouter, fake: FakeTime) -> None:
    """The second request waits out its Retry-After; the first is not sent again."""
    answers = iter(
        [
            httpx.Response(200, json={"batch": [{"encrypted_data": "1"}]}),
            httpx.Response(
                429, json={"code": "rate_limited", "detail": "x"}, headers={"Retry-After": "7"}
            ),
            httpx.Response(200, json={"batch": [{"encrypted_data": "2"}]}),
        ]
    )
    route = mocked.post("/encrypt").mock(side_effect=lambda _request: next(answers))
    with client(fake) as c:
        results = c.encrypt_many(["a", "b"], max_batch_items=1)
    assert [r.value for r in results] == ["1", "2"]
    assert route.call_count == 3 and fake.waits == [7.0]
    assert sent(route, 1) == sent(route, 2) == {"batch": [{"plaintext": "b"}]}


def test_rate_limited_past_the_deadline_is_raised(mocked: respx.MockRouter, fake: FakeTime) -> None:
    mocked.post("/encrypt").respond(
        429, json={"code": "rate_limited", "detail": "x"}, headers={"Retry-After": "60"}
    )
    with client(fake, deadline=30) as c, pytest.raises(RateLimited):
        c.encrypt_many(["a"])


@pytest.mark.parametrize(
    "body",
    [
        {"batch": [{"encrypted_data": "1"}]},  # one result for two items
        {"batch": [{"encrypted_data": "1"}, {"encrypted_data": 2}]},
        {"batch": [{"encrypted_data": "1"}, {"error": "invalid_ciphertext"}]},
        {"encrypted_data": "1"},
        [],
    ],
    ids=["short", "not-a-string", "error-not-an-object", "single-form", "not-an-object"],
)
def test_a_malformed_batch_answer_is_an_error_not_a_crash(
    mocked: respx.MockRouter, fake: FakeTime, body: Any
) -> None:
    mocked.post("/encrypt").respond(200, json=body)
    with client(fake) as c, pytest.raises(CitadelError) as exc:
        c.encrypt_many(["a", "b"])
    assert type(exc.value) is CitadelError and exc.value.status == 200


def test_item_result_is_a_small_frozen_value() -> None:
    result: ItemResult[str] = ItemResult("v", None, "rid", 3)
    assert result.ok and result.unwrap() == "v"
    with pytest.raises(AttributeError):
        result.value = "w"  # type: ignore[misc]


# -- the async twin -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_many_chunk_and_type_the_same(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/encrypt").mock(side_effect=echo("encrypted_data"))
    dec = mocked.post("/decrypt").respond(
        200,
        json={
            "batch": [
                {"plaintext": SECRET},
                {"error": {"code": "invalid_ciphertext", "detail": "x"}},
            ]
        },
    )
    rew = mocked.post("/rewrap").respond(200, json={"encrypted_data": "y"})
    async with AsyncCitadelClient(BASE, KEY, sleep=fake.asleep, clock=fake.clock) as c:
        enc = await c.encrypt_many([str(i) for i in range(5)], max_batch_items=2)
        plain, bad = await c.decrypt_many(["a", {"encrypted_data": "b", "context": {"u": "1"}}])
        await c.rewrap("x", context={"u": "1"}, new_context={"u": "2"})
    assert route.call_count == 3
    assert [r.value for r in enc] == [f"ct:{i}" for i in range(5)]
    assert isinstance(plain.value, Plaintext) and isinstance(bad.error, InvalidCiphertext)
    assert json.loads(dec.calls.last.request.content)["batch"][1]["context"] == {"u": "1"}
    assert json.loads(rew.calls.last.request.content) == {
        "encrypted_data": "x",
        "context": {"u": "1"},
        "new_context": {"u": "2"},
    }
