"""What a hostile batch must not be able to do (found by attacking the batch path)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import RedisServer, Served, headers, make_settings, serve_citadel

from citadel.context import canonical
from citadel.http.bodies import _plausible
from citadel.keyring import create_keyring, load_keyring
from citadel.providers.local import LocalProvider
from citadel.service import KeyVerdicts, SignJob, Vault

ACL = {"sentinel": ["encrypt"], "conductor": ["decrypt", "sign", "rewrap"]}
RSA_4096 = (Path(__file__).parent / "data" / "rsa" / "rsa4096_valid.pkcs8.pem").read_text()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    settings = make_settings(tmp_path, acl=ACL, rate_limit_per_caller="100000/minute")
    with serve_citadel(settings) as s:
        yield s


def post_raw(c: httpx.Client, path: str, body: bytes, caller: str) -> httpx.Response:
    hdrs = {**headers(caller), "Content-Type": "application/json"}
    return c.post(path, content=body, headers=hdrs)


@pytest.mark.parametrize(
    "body",
    [
        b'{"batch":[' + b"0," * 500_000 + b"0]}",
        b'{"batch":[' + b"{}," * 300_000 + b"{}]}",
        b'{"batch":[{"plaintext":"x","context":[' + b"[]," * 300_000 + b"[]]}]}",
        b'{"batch":[' + b'"a",' * 300_000 + b'"a"]}',
    ],
    ids=["numbers", "objects", "nested-arrays", "strings"],
)
def test_a_batch_of_countless_tiny_items_is_refused_before_it_is_parsed(
    served: Served, body: bytes
) -> None:
    assert not _plausible(body, 100)
    with served.client() as c:
        r = post_raw(c, "/encrypt", body, "sentinel")
    assert (r.status_code, r.json()["code"]) == (422, "invalid_request")


def test_the_largest_valid_batches_pass_the_structure_count() -> None:
    context = {f"key{i}": "v" * 256 for i in range(16)}
    item = {
        "encrypted_data": "cit1:00000000:" + "A" * 100,
        "algorithm": "hmac-sha256",
        "message": '{"escaped \\" quotes": [1, {"a": 2}], "b": "\\\\"}' * 50,
        "message_encoding": "utf-8",
        "key_encoding": "utf-8",
        "signature_encoding": "hex",
        "context": context,
    }
    body = json.dumps({"batch": [item] * 100}, indent=2).encode()
    assert len(body) > 64 * 1024
    assert _plausible(body, 100)


def test_a_batch_over_max_batch_items_is_refused_before_its_items_are_validated(
    served: Served,
) -> None:
    body = b'{"batch":[' + b"{}," * 100 + b"{}]}"  # 101 invalid items: counted, not validated
    with served.client() as c:
        r = post_raw(c, "/encrypt", body, "sentinel")
    assert r.status_code == 422
    assert r.json()["detail"] == "The batch has more than 100 items."


def test_a_batch_item_over_the_single_forms_limit_is_413(served: Served) -> None:
    big = {"encrypted_data": "cit1:00000000:" + "A" * 30_000}
    with served.client() as c:
        alone = c.post("/decrypt", json=big, headers=headers("conductor"))
        batched = c.post("/decrypt", json={"batch": [big]}, headers=headers("conductor"))
    assert alone.status_code == batched.status_code == 413


def test_a_lone_surrogate_in_a_batch_item_is_422_for_the_whole_batch(served: Served) -> None:
    body = b'{"batch":[{"encrypted_data":"cit1:x:AAAA"},{"encrypted_data":"\\ud800"}]}'
    with served.client() as c:
        r = post_raw(c, "/decrypt", body, "conductor")
        keyed = post_raw(
            c, "/encrypt", b'{"plaintext":"x","context":{"encrypted_data":"\\ud800"}}', "sentinel"
        )
    assert (r.status_code, r.json()["code"]) == (422, "invalid_request")
    assert (keyed.status_code, keyed.json()["code"]) == (422, "invalid_request")


@pytest.mark.redis
def test_on_redis_a_refused_batch_leaves_the_budget_to_the_requests_after_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = make_settings(
        tmp_path,
        acl=ACL,
        rate_limit_per_caller="10/minute",
        rate_limit_storage_uri=redis_server.url,
    )
    with serve_citadel(settings) as s, s.client() as c:

        def batch(n: int) -> int:
            body = {"batch": [{"plaintext": "a"}] * n}
            return c.post("/encrypt", json=body, headers=headers("sentinel")).status_code

        assert batch(6) == 200
        assert [batch(5), batch(5)] == [429, 429]
        assert [batch(1) for _ in range(4)] == [200] * 4  # the refused batches took nothing
        assert batch(1) == 429


def test_a_batch_that_can_never_fit_says_so(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, acl=ACL, rate_limit_per_caller="5/minute")
    with serve_citadel(settings) as s, s.client() as c:
        r = c.post(
            "/encrypt", json={"batch": [{"plaintext": "a"}] * 6}, headers=headers("sentinel")
        )
    assert r.status_code == 429
    assert "smaller batches" in r.json()["detail"]


class CountingChecker:
    """An RSA key checker that passes every key and counts the checks."""

    def __init__(self) -> None:
        self.checks = 0

    async def passes(self, pem: bytes) -> bool:
        self.checks += 1
        return True

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
async def test_copies_of_one_rsa_key_in_a_sign_batch_are_checked_once(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    create_keyring(path, origin="operator")
    provider = LocalProvider(load_keyring(path))
    checker = CountingChecker()
    vault = Vault(provider, [provider], 65536, key_checker=checker)  # type: ignore[arg-type]
    ct = await provider.encrypt(RSA_4096)
    job = SignJob(ct, "rsa-pkcs1v15-sha256", b"order", "pem", "hex")
    results = await vault.sign_many([job] * 10)
    assert all(isinstance(r, str) for r in results)
    assert checker.checks == 1


@pytest.mark.anyio
async def test_unknown_key_ids_in_a_batch_read_the_keyring_once(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    create_keyring(path, origin="operator")
    provider = LocalProvider(load_keyring(path), path=path)
    reads = 0
    original = provider._reread_for_unknown_key

    async def counted() -> None:
        nonlocal reads
        reads += 1
        await original()

    provider._reread_for_unknown_key = counted  # type: ignore[method-assign]
    items: list[tuple[str, Any]] = [(f"cit1:0badc0{i:02x}:AAAA", None) for i in range(20)]
    results = await provider.decrypt_many(items)
    assert reads == 1
    assert all(r.code == "invalid_ciphertext" for r in results if not isinstance(r, str))


def test_no_ciphertext_and_context_share_a_verdict_with_another_pair() -> None:
    verdicts = KeyVerdicts()
    context = {"user_id": "8413"}
    forged = "cit1:00000000:AAAA" + "\0" + canonical(context).decode()
    a = verdicts.fingerprint(SignJob("cit1:00000000:AAAA", "ed25519", b"m", "pem", "hex", context))
    b = verdicts.fingerprint(SignJob(forged, "ed25519", b"m", "pem", "hex", None))
    assert a != b
