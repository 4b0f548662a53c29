"""Batches and encryption contexts through the real clients and the bulk tool, against a live
Citadel on loopback (the contract's "Batches" and "Encryption context"; the wire format alone is
tests/test_client_batch_wire.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import KEYS, FakeTime, Served, make_settings, serve_citadel

from citadel.cli import build_parser
from citadel_client import (
    AsyncCitadelClient,
    CitadelClient,
    InvalidCiphertext,
    InvalidKey,
    InvalidRequest,
    Plaintext,
    RateLimited,
    bulk,
)

ACL = {"sentinel": ["encrypt"], "conductor": ["decrypt", "sign"], "alchemist": ["rewrap"]}
CANARY_SECRET = "CANARY-BATCH-LIVE-SECRET-6d1f"
CANARY_USER = "CANARY-CONTEXT-USER-2b9e"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Served]:
    settings = make_settings(
        tmp_path,
        acl=ACL,
        rate_limit_per_caller="100000/minute",
        rate_limit_per_user="100000/minute",
    )
    with serve_citadel(settings) as served:
        yield served


def sentinel(served: Served) -> CitadelClient:
    return CitadelClient(served.url, KEYS["sentinel"])


def conductor(served: Served) -> CitadelClient:
    return CitadelClient(served.url, KEYS["conductor"])


def events(served: Served, operation: str) -> list[dict[str, Any]]:
    return [e for e in served.audit.events() if e.get("operation") == operation]


def test_encrypt_many_and_decrypt_many_round_trip_in_several_batches(live: Served) -> None:
    secrets = [f"secret-{i}" for i in range(250)]
    with sentinel(live) as s:
        encrypted = s.encrypt_many(secrets, request_id="onboard-1")
    assert all(r.ok for r in encrypted)
    with conductor(live) as c:
        decrypted = c.decrypt_many([r.unwrap() for r in encrypted])
    assert [r.unwrap().reveal() for r in decrypted] == secrets
    lines = events(live, "encrypt")
    assert len(lines) == 250  # one audit line per item
    assert {e["request_id"] for e in lines} == {"onboard-1.0", "onboard-1.1", "onboard-1.2"}
    assert sorted((e["request_id"], e["batch_index"]) for e in lines)[100] == ("onboard-1.1", 0)
    assert {e["batch_size"] for e in lines} == {100, 50}
    for result in encrypted:
        (line,) = [
            e
            for e in lines
            if e["request_id"] == result.request_id and e["batch_index"] == result.batch_index
        ]
        assert line["ct_fp"] == hashlib.sha256(result.unwrap().encode()).hexdigest()[:16]


def test_one_bad_ciphertext_fails_alone(live: Served) -> None:
    with sentinel(live) as s:
        good = [r.unwrap() for r in s.encrypt_many(["a", "b"])]
    with conductor(live) as c:
        results = c.decrypt_many([good[0], "cit1:00000000:AAAA", good[1]])
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, InvalidCiphertext)
    assert results[1].batch_index == 1 and results[1].error.request_id == results[1].request_id
    assert [r.unwrap().reveal() for r in (results[0], results[2])] == ["a", "b"]


def test_a_batch_with_an_item_that_does_not_fit_the_schema_is_refused_whole(live: Served) -> None:
    with sentinel(live) as s, pytest.raises(InvalidRequest):
        s.encrypt_many(["a", "", "c"])  # an empty plaintext
    assert events(live, "encrypt") == [] or all(not e["success"] for e in events(live, "encrypt"))


def test_a_context_binds_the_ciphertext(live: Served) -> None:
    context = {"user_id": CANARY_USER, "exchange": "binance"}
    with sentinel(live) as s:
        ct = s.encrypt(CANARY_SECRET, context=context)
    with conductor(live) as c:
        reordered = {"exchange": "binance", "user_id": CANARY_USER}
        with c.decrypt(ct, context=reordered) as plain:  # key order does not matter
            assert plain.reveal() == CANARY_SECRET
        for other in (
            {"user_id": "someone-else", "exchange": "binance"},
            None,
            {"user_id": CANARY_USER},
        ):
            with pytest.raises(InvalidCiphertext) as exc:
                c.decrypt(ct, context=other)
            assert CANARY_USER not in str(exc.value) + repr(exc.value)
    text = live.audit.text()
    assert CANARY_USER not in text and CANARY_SECRET not in text
    assert {tuple(e.get("context_keys", ())) for e in events(live, "encrypt")} == {
        ("exchange", "user_id")
    }


def test_a_ciphertext_made_without_a_context_decrypts_only_without_one(live: Served) -> None:
    with sentinel(live) as s:
        ct = s.encrypt("plain")
    with conductor(live) as c:
        assert c.decrypt(ct).reveal() == "plain"
        with pytest.raises(InvalidCiphertext):
            c.decrypt(ct, context={"user_id": "1"})


def test_rewrap_keeps_the_context_or_binds_the_new_one(live: Served) -> None:
    with sentinel(live) as s:
        unbound = s.encrypt("k1")
        bound = s.encrypt("k2", context={"user_id": "7"})
    with CitadelClient(live.url, KEYS["alchemist"]) as a:
        kept = a.rewrap(bound, context={"user_id": "7"})
        newly = a.rewrap(unbound, new_context={"user_id": "8"})
        batch = a.rewrap_many(
            [
                {"encrypted_data": unbound, "new_context": {"user_id": "9"}},
                {"encrypted_data": bound, "context": {"user_id": "7"}},
                {"encrypted_data": bound},  # the wrong context (none): this item alone fails
            ]
        )
    with conductor(live) as c:
        assert c.decrypt(kept, context={"user_id": "7"}).reveal() == "k2"
        assert c.decrypt(newly, context={"user_id": "8"}).reveal() == "k1"
        with pytest.raises(InvalidCiphertext):
            c.decrypt(newly)
        assert c.decrypt(batch[0].unwrap(), context={"user_id": "9"}).reveal() == "k1"
        assert c.decrypt(batch[1].unwrap(), context={"user_id": "7"}).reveal() == "k2"
    assert isinstance(batch[2].error, InvalidCiphertext)


def test_decrypt_many_takes_each_items_context(live: Served) -> None:
    with sentinel(live) as s:
        results = s.encrypt_many(
            [{"plaintext": f"s{i}", "context": {"user_id": str(i)}} for i in range(3)]
        )
    cts = [r.unwrap() for r in results]
    with conductor(live) as c:
        out = c.decrypt_many(
            [{"encrypted_data": ct, "context": {"user_id": str(i)}} for i, ct in enumerate(cts)]
            + [{"encrypted_data": cts[0], "context": {"user_id": "2"}}]
        )
    assert [r.ok for r in out] == [True, True, True, False]
    assert [r.unwrap().reveal() for r in out[:3]] == ["s0", "s1", "s2"]


def test_sign_many_signs_each_item_and_types_a_bad_key(live: Served) -> None:
    secret = "hmac-secret-" + "z" * 20
    with sentinel(live) as s:
        good, not_base64 = [r.unwrap() for r in s.encrypt_many([secret, "not base64!"])]
    with conductor(live) as c:
        results = c.sign_many(
            [
                {"encrypted_data": good, "message": "m1"},
                {"encrypted_data": not_base64, "message": "m2", "key_encoding": "base64"},
                {
                    "encrypted_data": good,
                    "message": "m3",
                    "algorithm": "hmac-sha512",
                    "signature_encoding": "base64",
                },
            ],
            algorithm="hmac-sha256",
        )
    assert results[0].unwrap() == hmac.new(secret.encode(), b"m1", hashlib.sha256).hexdigest()
    assert isinstance(results[1].error, InvalidKey)
    assert (
        results[2].unwrap()
        == base64.b64encode(hmac.digest(secret.encode(), b"m3", "sha512")).decode()
    )
    assert [e["batch_index"] for e in events(live, "sign")] == [0, 1, 2]


def test_a_batch_that_does_not_fit_the_rate_limit_is_refused_whole_and_charged_nothing(
    tmp_path: Path, fake: FakeTime
) -> None:
    settings = make_settings(tmp_path, acl=ACL, rate_limit_per_caller="50/minute")
    with serve_citadel(settings) as served:
        with (
            CitadelClient(
                served.url, KEYS["sentinel"], deadline=5, sleep=fake.sleep, clock=fake.clock
            ) as s,
            pytest.raises(RateLimited),
        ):
            s.encrypt_many([str(i) for i in range(60)])
        with CitadelClient(served.url, KEYS["sentinel"]) as s:
            assert all(r.ok for r in s.encrypt_many([str(i) for i in range(50)]))
        with (
            CitadelClient(served.url, KEYS["sentinel"], deadline=0.5) as s,
            pytest.raises(RateLimited),
        ):
            s.encrypt("one more")  # the 50 were charged; the refused 60 were not


@pytest.mark.anyio
async def test_the_async_client_does_the_same(live: Served) -> None:
    async with AsyncCitadelClient(live.url, KEYS["sentinel"]) as s:
        results = await s.encrypt_many(["x", "y"], context={"user_id": "1"})
    async with AsyncCitadelClient(live.url, KEYS["conductor"]) as c:
        out = await c.decrypt_many([r.unwrap() for r in results], context={"user_id": "1"})
        assert all(isinstance(r.value, Plaintext) for r in out)
        assert [r.unwrap().reveal() for r in out] == ["x", "y"]
        assert (await c.decrypt(results[0].unwrap(), context={"user_id": "1"})).reveal() == "x"


# -- the bulk tool against Citadel ----------------------------------------------------------


def run_tool(served: Served, tmp_path: Path, lines: list[str], *argv: str) -> tuple[int, str, Path]:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    key = tmp_path / "key"
    key.write_text(KEYS["alchemist"])
    out = tmp_path / "out.jsonl"
    args = build_parser().parse_args(
        ["rewrap", str(src), "-o", str(out), "--url", served.url, "--api-key-file", str(key), *argv]
    )
    err = io.StringIO()
    code = bulk.execute(args, stderr=err, handle_signals=False)
    return code, err.getvalue(), out


def test_the_bulk_tool_binds_each_line_to_its_user_in_batches(live: Served, tmp_path: Path) -> None:
    with sentinel(live) as s:
        cts = [r.unwrap() for r in s.encrypt_many([f"key-{i}" for i in range(120)])]
    lines = [
        json.dumps({"id": 1000 + i, "user": f"CANARY-OWNER-{i}", "encrypted_data": ct})
        for i, ct in enumerate(cts)
    ]
    lines.append(json.dumps({"id": 5000, "encrypted_data": cts[0]}))  # no "user": rejected
    code, err, out = run_tool(live, tmp_path, lines, "--new-context-from", "user_id=id,owner=user")
    assert code == 1, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    with conductor(live) as c:
        for i, row in enumerate(rows[:120]):
            context = {"user_id": str(1000 + i), "owner": f"CANARY-OWNER-{i}"}
            assert c.decrypt(row["encrypted_data"], context=context).reveal() == f"key-{i}"
        with pytest.raises(InvalidCiphertext):
            c.decrypt(rows[0]["encrypted_data"])  # now bound: no context, no secret
    assert rows[120]["encrypted_data"] == cts[0]
    rejects = [
        json.loads(line) for line in (tmp_path / "out.jsonl.rejects").read_text().splitlines()
    ]
    assert [(r["line"], r["code"]) for r in rejects] == [(121, "invalid_context")]
    rewraps = events(live, "rewrap")
    assert len(rewraps) == 120
    assert {e["batch_size"] for e in rewraps} == {100, 20}
    assert {tuple(e["context_keys"]) for e in rewraps if "context_keys" in e} <= {
        ("owner", "user_id")
    }
    assert "CANARY-OWNER" not in live.audit.text() + err  # no context value in a log line


def test_the_bulk_tool_rotates_bound_ciphertexts_keeping_their_context(
    live: Served, tmp_path: Path
) -> None:
    with sentinel(live) as s:
        cts = [s.encrypt(f"k{i}", context={"user_id": str(i)}) for i in range(5)]
    lines = [json.dumps({"user_id": i, "encrypted_data": ct}) for i, ct in enumerate(cts)]
    code, err, out = run_tool(
        live, tmp_path, lines, "--context-from", "user_id", "--batch-size", "2"
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    with conductor(live) as c:
        for i, row in enumerate(rows):
            assert c.decrypt(row["encrypted_data"], context={"user_id": str(i)}).reveal() == f"k{i}"
