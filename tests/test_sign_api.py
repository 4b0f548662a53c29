"""``POST /sign`` (issue 9) over real HTTP: every algorithm and encoding, both providers.

Keys are generated here with ``cryptography``, encrypted through Citadel's own
``/encrypt``, and every signature Citadel returns is checked independently:
HMAC with :mod:`hmac`, Ed25519, RSA and ECDSA with the public key's ``verify``
(ECDSA as the 64-byte ``r || s`` of JWS ES256). The evervault provider is
exercised through the real SDK against the Evervault API emulator, so the
secret's decrypt goes through the SDK and the circuit breaker as ``/decrypt``'s does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from support import KEYS, PSEUDONYM_KEY, Served, headers, make_settings, serve_citadel, wait_until

from citadel.logs import configure_logging
from evervault_emulator import EvervaultEmulator

ACL = {
    "sentinel": ["encrypt"],
    "conductor": ["decrypt", "sign"],
    "alchemist": ["sign"],
    "api-gateway": [],
}
HMAC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ORDER = "symbol=LTCBTC&side=BUY&quantity=1&timestamp=1499827319559"  # under the 64-byte limit


# -- keys, made here ------------------------------------------------------------------------------

ED_KEY = ed25519.Ed25519PrivateKey.generate()
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(key: Any, fmt: ser.PrivateFormat = ser.PrivateFormat.PKCS8) -> str:
    text: str = key.private_bytes(ser.Encoding.PEM, fmt, ser.NoEncryption()).decode()
    return text


def ed_seed() -> bytes:
    return ED_KEY.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())


def unb64(text: str, encoding: str) -> bytes:
    if encoding == "hex":
        return bytes.fromhex(text)
    if encoding == "base64":
        return base64.b64decode(text, validate=True)
    assert "=" not in text  # base64url is unpadded
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def short_hash(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()[:16]


# -- a served Citadel -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = make_settings(
        tmp_path_factory.mktemp("sign"),
        acl=ACL,
        rate_limit_per_caller="100000/minute",
        rate_limit_per_user="100000/minute",
        max_sign_message_bytes=64,
    )
    with serve_citadel(settings) as s:
        yield s


@pytest.fixture
def c(served: Served) -> Iterator[httpx.Client]:
    with served.client() as client:
        yield client


def encrypt(c: httpx.Client, secret: str) -> str:
    r = c.post("/encrypt", json={"plaintext": secret}, headers=headers("sentinel"))
    assert r.status_code == 200, r.text
    ct: str = r.json()["encrypted_data"]
    return ct


def sign(
    c: httpx.Client,
    caller: str = "conductor",
    extra_headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    return c.post("/sign", json=body, headers={**headers(caller), **(extra_headers or {})})


def signature_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"signature"}
    sig: str = r.json()["signature"]
    return sig


def error_code(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["code"]


# -- HMAC -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algorithm,digest",
    [("hmac-sha256", "sha256"), ("hmac-sha384", "sha384"), ("hmac-sha512", "sha512")],
)
@pytest.mark.parametrize("key_encoding", ["utf-8", "base64", "hex"])
def test_hmac_signature_equals_an_independent_hmac_for_each_key_encoding(
    c: httpx.Client, algorithm: str, digest: str, key_encoding: str
) -> None:
    if key_encoding == "utf-8":
        key, stored = HMAC_SECRET.encode(), HMAC_SECRET
    else:
        key = b"\x00\xffbinary-exchange-secret\x10"
        stored = base64.b64encode(key).decode() if key_encoding == "base64" else key.hex()
    ct = encrypt(c, stored)
    r = sign(c, encrypted_data=ct, algorithm=algorithm, message=ORDER, key_encoding=key_encoding)
    assert signature_of(r) == hmac.new(key, ORDER.encode(), digest).hexdigest()


@pytest.mark.parametrize("signature_encoding", ["hex", "base64", "base64url"])
def test_each_signature_encoding_carries_the_same_hmac(
    c: httpx.Client, signature_encoding: str
) -> None:
    ct = encrypt(c, HMAC_SECRET)
    r = sign(
        c,
        encrypted_data=ct,
        algorithm="hmac-sha512",
        message=ORDER,
        signature_encoding=signature_encoding,
    )
    expected = hmac.digest(HMAC_SECRET.encode(), ORDER.encode(), "sha512")
    assert unb64(signature_of(r), signature_encoding) == expected


def test_base64_message_is_signed_as_its_decoded_bytes(c: httpx.Client) -> None:
    # Kraken's shape: path + SHA-256(nonce + postdata), binary, sent as base64.
    raw = b"/0/private/AddOrder" + hashlib.sha256(b"1616492376594nonce=1616492376594").digest()
    ct = encrypt(c, base64.b64encode(b"\x01\x02kraken-secret").decode())
    r = sign(
        c,
        encrypted_data=ct,
        algorithm="hmac-sha512",
        message=base64.b64encode(raw).decode(),
        message_encoding="base64",
        key_encoding="base64",
        signature_encoding="base64",
    )
    expected = base64.b64encode(hmac.digest(b"\x01\x02kraken-secret", raw, "sha512")).decode()
    assert signature_of(r) == expected


def test_defaults_are_utf8_message_first_key_encoding_and_hex_signature(c: httpx.Client) -> None:
    ct = encrypt(c, HMAC_SECRET)
    explicit = sign(
        c,
        encrypted_data=ct,
        algorithm="hmac-sha256",
        message=ORDER,
        message_encoding="utf-8",
        key_encoding="utf-8",
        signature_encoding="hex",
    )
    implicit = sign(c, encrypted_data=ct, algorithm="hmac-sha256", message=ORDER)
    assert signature_of(implicit) == signature_of(explicit)


def test_non_ascii_utf8_message_is_signed_as_its_utf8_bytes(c: httpx.Client) -> None:
    message = "note=ordre d'achat €"
    r = sign(c, encrypted_data=encrypt(c, HMAC_SECRET), algorithm="hmac-sha256", message=message)
    assert signature_of(r) == hmac.new(HMAC_SECRET.encode(), message.encode(), "sha256").hexdigest()


# -- Ed25519, RSA, ECDSA --------------------------------------------------------------------------


@pytest.mark.parametrize("key_encoding", ["pem", "base64", "hex"])
def test_ed25519_signature_verifies_with_the_public_key(c: httpx.Client, key_encoding: str) -> None:
    stored = {
        "pem": pem(ED_KEY),
        "base64": base64.b64encode(ed_seed()).decode(),
        "hex": ed_seed().hex(),
    }[key_encoding]
    r = sign(
        c,
        encrypted_data=encrypt(c, stored),
        algorithm="ed25519",
        message=ORDER,
        key_encoding=key_encoding,
        signature_encoding="base64",
    )
    ED_KEY.public_key().verify(base64.b64decode(signature_of(r)), ORDER.encode())


def test_ed25519_default_key_encoding_is_pem(c: httpx.Client) -> None:
    r = sign(c, encrypted_data=encrypt(c, pem(ED_KEY)), algorithm="ed25519", message=ORDER)
    ED_KEY.public_key().verify(bytes.fromhex(signature_of(r)), ORDER.encode())


@pytest.mark.parametrize(
    "fmt", [ser.PrivateFormat.PKCS8, ser.PrivateFormat.TraditionalOpenSSL], ids=["pkcs8", "pkcs1"]
)
def test_rsa_pkcs1v15_sha256_signature_verifies_with_the_public_key(
    c: httpx.Client, fmt: ser.PrivateFormat
) -> None:
    r = sign(
        c,
        encrypted_data=encrypt(c, pem(RSA_KEY, fmt)),
        algorithm="rsa-pkcs1v15-sha256",
        message=ORDER,
        signature_encoding="base64",
    )
    signature = base64.b64decode(signature_of(r))
    assert len(signature) == 256
    RSA_KEY.public_key().verify(signature, ORDER.encode(), padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize(
    "fmt", [ser.PrivateFormat.PKCS8, ser.PrivateFormat.TraditionalOpenSSL], ids=["pkcs8", "sec1"]
)
def test_ecdsa_p256_signature_is_64_byte_r_s_that_verifies(
    c: httpx.Client, fmt: ser.PrivateFormat
) -> None:
    r = sign(
        c,
        encrypted_data=encrypt(c, pem(EC_KEY, fmt)),
        algorithm="ecdsa-p256-sha256",
        message=ORDER,
        signature_encoding="base64url",
    )
    raw = unb64(signature_of(r), "base64url")
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    EC_KEY.public_key().verify(der, ORDER.encode(), ec.ECDSA(hashes.SHA256()))


def test_ecdsa_p256_signature_is_the_same_for_the_same_key_and_message(c: httpx.Client) -> None:
    """RFC 6979: one key and one message give one signature (ES256 JWTs are byte-comparable)."""
    ct = encrypt(c, pem(EC_KEY))
    body = {"encrypted_data": ct, "algorithm": "ecdsa-p256-sha256", "message": ORDER}
    first, second = (signature_of(sign(c, **body)) for _ in range(2))
    assert first == second
    s_value = int.from_bytes(bytes.fromhex(first)[32:], "big")
    assert s_value <= P256_ORDER // 2


@pytest.mark.parametrize("key_encoding", ["base64", "hex"])
def test_ed25519_64_byte_key_as_coinbase_issues_it_signs(
    c: httpx.Client, key_encoding: str
) -> None:
    public = ED_KEY.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    raw = ed_seed() + public
    stored = base64.b64encode(raw).decode() if key_encoding == "base64" else raw.hex()
    r = sign(
        c,
        encrypted_data=encrypt(c, stored),
        algorithm="ed25519",
        message=ORDER,
        key_encoding=key_encoding,
    )
    ED_KEY.public_key().verify(bytes.fromhex(signature_of(r)), ORDER.encode())


def test_ed25519_64_byte_key_whose_public_half_is_another_keys_is_400_invalid_key(
    c: httpx.Client,
) -> None:
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    stored = base64.b64encode(
        ed_seed() + other.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    ).decode()
    r = sign(
        c,
        encrypted_data=encrypt(c, stored),
        algorithm="ed25519",
        message=ORDER,
        key_encoding="base64",
    )
    assert error_code(r) == (400, "invalid_key")
    assert stored not in r.text


# -- ACL ------------------------------------------------------------------------------------------


def test_sign_is_granted_to_no_one_by_default(tmp_path: Path) -> None:
    with serve_citadel(make_settings(tmp_path)) as s, s.client() as c:
        ct = encrypt(c, HMAC_SECRET)
        answers = {
            caller: sign(c, caller, encrypted_data=ct, algorithm="hmac-sha256", message=ORDER)
            for caller in KEYS
        }
        events = [e for e in s.audit.events() if e["operation"] == "sign"]
    assert {caller: error_code(r) for caller, r in answers.items()} == dict.fromkeys(
        KEYS, (403, "forbidden")
    )
    assert [e["code"] for e in events] == ["forbidden"] * len(KEYS)


def test_sign_answers_200_once_the_acl_grants_it(c: httpx.Client) -> None:
    ct = encrypt(c, HMAC_SECRET)
    r = sign(c, "alchemist", encrypted_data=ct, algorithm="hmac-sha256", message=ORDER)
    assert signature_of(r) == hmac.new(HMAC_SECRET.encode(), ORDER.encode(), "sha256").hexdigest()


def test_sign_is_refused_to_a_caller_granted_only_encrypt(c: httpx.Client) -> None:
    # The grant is per operation, never implied by another one.
    r = sign(
        c,
        "sentinel",
        encrypted_data=encrypt(c, HMAC_SECRET),
        algorithm="hmac-sha256",
        message=ORDER,
    )
    assert error_code(r) == (403, "forbidden")


def test_sign_without_an_api_key_is_401_whatever_the_body(c: httpx.Client) -> None:
    r = c.post("/sign", content=b"not json")
    assert error_code(r) == (401, "unauthenticated")


# -- 422 invalid_request --------------------------------------------------------------------------


def _invalid_bodies(ct: str) -> dict[str, Any]:
    good = {"encrypted_data": ct, "algorithm": "hmac-sha256", "message": ORDER}
    return {
        "unknown algorithm": {**good, "algorithm": "hmac-md5"},
        "algorithm in another case": {**good, "algorithm": "HMAC-SHA256"},
        "pem key encoding for hmac": {**good, "key_encoding": "pem"},
        "utf-8 key encoding for ed25519": {**good, "algorithm": "ed25519", "key_encoding": "utf-8"},
        "hex key encoding for rsa": {
            **good,
            "algorithm": "rsa-pkcs1v15-sha256",
            "key_encoding": "hex",
        },
        "base64 key encoding for ecdsa": {
            **good,
            "algorithm": "ecdsa-p256-sha256",
            "key_encoding": "base64",
        },
        "unknown key encoding": {**good, "key_encoding": "base32"},
        "unknown message encoding": {**good, "message_encoding": "hex"},
        "unknown signature encoding": {**good, "signature_encoding": "base58"},
        "message not base64": {**good, "message": "not base64!", "message_encoding": "base64"},
        "message base64 without padding": {
            **good,
            "message": "YWJjZA",
            "message_encoding": "base64",
        },
        "message base64 with whitespace": {
            **good,
            "message": "YWJj ZA==",
            "message_encoding": "base64",
        },
        "message base64 with stray bits": {
            **good,
            "message": "YWJjZB==",
            "message_encoding": "base64",
        },
        "empty message": {**good, "message": ""},
        "empty base64 message decodes to nothing": {
            **good,
            "message": "",
            "message_encoding": "base64",
        },
        "padding only decodes to nothing": {
            **good,
            "message": "====",
            "message_encoding": "base64",
        },
        "unknown field": {**good, "nonce": "1"},
        "missing encrypted_data": {k: v for k, v in good.items() if k != "encrypted_data"},
        "missing algorithm": {k: v for k, v in good.items() if k != "algorithm"},
        "missing message": {k: v for k, v in good.items() if k != "message"},
        "algorithm not a string": {**good, "algorithm": 256},
        "message not a string": {**good, "message": ["a"]},
        "message a number": {**good, "message": 12345},
        "encrypted_data not a string": {**good, "encrypted_data": {"ct": ct}},
        "key encoding null": {**good, "key_encoding": None},
        "signature encoding a list": {**good, "signature_encoding": ["hex"]},
        "body an array": [good],
    }


INVALID_CASES = list(_invalid_bodies("x"))


@pytest.mark.parametrize("case", INVALID_CASES)
def test_schema_and_encoding_problems_are_422_invalid_request(
    served: Served, c: httpx.Client, case: str
) -> None:
    body = _invalid_bodies(encrypt(c, HMAC_SECRET))[case]
    r = c.post("/sign", json=body, headers=headers("conductor"))
    assert error_code(r) == (422, "invalid_request")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"encrypted_data": "x", "algorithm": "hmac-sha256", "message": "a", "message": "b"}',
        b'{"encrypted_data": "x", "algorithm": "hmac-sha256", "message": "a"',
        '{"encrypted_data": "x", "algorithm": "hmac-sha256", "message": "a"}'.encode("utf-16"),
        b'{"encrypted_data": "x", "algorithm": "hmac-sha256", "message": "\\ud800"}',
    ],
    ids=["duplicated key", "truncated json", "utf-16 body", "lone surrogate message"],
)
def test_malformed_sign_bodies_are_422_invalid_request(c: httpx.Client, raw: bytes) -> None:
    r = c.post(
        "/sign", content=raw, headers={**headers("conductor"), "Content-Type": "application/json"}
    )
    assert error_code(r) == (422, "invalid_request")


# -- 413 payload_too_large (CITADEL_MAX_SIGN_MESSAGE_BYTES = 64 here) ----------------------------


def test_message_of_exactly_the_limit_is_signed(c: httpx.Client) -> None:
    message = "m" * 64
    r = sign(c, encrypted_data=encrypt(c, HMAC_SECRET), algorithm="hmac-sha256", message=message)
    assert signature_of(r) == hmac.new(HMAC_SECRET.encode(), message.encode(), "sha256").hexdigest()


def test_utf8_message_one_byte_over_the_limit_is_413(c: httpx.Client) -> None:
    r = sign(c, encrypted_data=encrypt(c, HMAC_SECRET), algorithm="hmac-sha256", message="m" * 65)
    assert error_code(r) == (413, "payload_too_large")


def test_limit_counts_utf8_bytes_not_characters(c: httpx.Client) -> None:
    message = "€" * 22  # 22 characters, 66 bytes
    r = sign(c, encrypted_data=encrypt(c, HMAC_SECRET), algorithm="hmac-sha256", message=message)
    assert error_code(r) == (413, "payload_too_large")


def test_base64_message_over_the_limit_after_decoding_is_413(c: httpx.Client) -> None:
    r = sign(
        c,
        encrypted_data=encrypt(c, HMAC_SECRET),
        algorithm="hmac-sha256",
        message=base64.b64encode(bytes(65)).decode(),
        message_encoding="base64",
    )
    assert error_code(r) == (413, "payload_too_large")


def test_base64_message_longer_than_the_limit_but_within_it_decoded_is_signed(
    c: httpx.Client,
) -> None:
    raw = bytes(range(64))
    text = base64.b64encode(raw).decode()
    assert len(text) > 64
    r = sign(
        c,
        encrypted_data=encrypt(c, HMAC_SECRET),
        algorithm="hmac-sha256",
        message=text,
        message_encoding="base64",
    )
    assert signature_of(r) == hmac.new(HMAC_SECRET.encode(), raw, "sha256").hexdigest()


# -- 400 invalid_key ------------------------------------------------------------------------------


def _passphrase_pem() -> str:
    text: str = EC_KEY.private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.BestAvailableEncryption(b"hunter2")
    ).decode()
    return text


def _public_pem() -> str:
    text: str = (
        EC_KEY.public_key()
        .public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return text


INVALID_KEYS: dict[str, tuple[str, str, str]] = {
    # case: (secret, algorithm, key_encoding)
    "hmac hex secret with non-hex characters": ("zz11", "hmac-sha256", "hex"),
    "hmac hex secret of odd length": ("abc", "hmac-sha256", "hex"),
    "hmac base64 secret not base64": ("not*base64", "hmac-sha512", "base64"),
    "ed25519 seed of 31 bytes": (bytes(31).hex(), "ed25519", "hex"),
    "ed25519 base64 seed of 33 bytes": (base64.b64encode(bytes(33)).decode(), "ed25519", "base64"),
    "ed25519 pem that is no pem": ("just a string", "ed25519", "pem"),
    "rsa pem holding an ed25519 key": (pem(ED_KEY), "rsa-pkcs1v15-sha256", "pem"),
    "ecdsa pem holding an rsa key": (pem(RSA_KEY), "ecdsa-p256-sha256", "pem"),
    "ecdsa pem holding a p-384 key": (
        pem(ec.generate_private_key(ec.SECP384R1())),
        "ecdsa-p256-sha256",
        "pem",
    ),
    "ed25519 pem holding an ecdsa key": (pem(EC_KEY), "ed25519", "pem"),
    "passphrase-protected pem": (_passphrase_pem(), "ecdsa-p256-sha256", "pem"),
    "public key pem": (_public_pem(), "ecdsa-p256-sha256", "pem"),
    "hmac secret as a plain api key for rsa": (HMAC_SECRET, "rsa-pkcs1v15-sha256", "pem"),
}


@pytest.mark.parametrize("case", list(INVALID_KEYS))
def test_secret_that_is_not_a_key_for_the_algorithm_is_400_invalid_key(
    c: httpx.Client, case: str
) -> None:
    secret, algorithm, key_encoding = INVALID_KEYS[case]
    r = sign(
        c,
        encrypted_data=encrypt(c, secret),
        algorithm=algorithm,
        message=ORDER,
        key_encoding=key_encoding,
    )
    assert error_code(r) == (400, "invalid_key")


def test_passphrase_protected_pem_detail_says_so(c: httpx.Client) -> None:
    r = sign(
        c,
        encrypted_data=encrypt(c, _passphrase_pem()),
        algorithm="ecdsa-p256-sha256",
        message=ORDER,
    )
    assert error_code(r) == (400, "invalid_key")
    assert "passphrase" in r.json()["detail"]


# -- 400 invalid_ciphertext -----------------------------------------------------------------------


def _tampered(ct: str) -> str:
    head, body = ct.rsplit(":", 1)
    flip = "A" if body[10] != "A" else "B"
    return f"{head}:{body[:10]}{flip}{body[11:]}"


@pytest.mark.parametrize(
    "make",
    [
        lambda ct: "not a ciphertext",
        lambda ct: "cit1:00000000:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        _tampered,
        lambda ct: (
            "ev:RFVC:AAAAAAAAAAAAAAAAAAAAAA:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA:AAAAAAAAAAAAAAAAAAAAAAAA:$"
        ),
    ],
    ids=["garbage", "unknown key id", "tampered", "ev: without evervault decrypting"],
)
def test_undecryptable_ciphertext_is_400_invalid_ciphertext(c: httpx.Client, make: Any) -> None:
    ct = make(encrypt(c, HMAC_SECRET))
    r = sign(c, encrypted_data=ct, algorithm="hmac-sha256", message=ORDER)
    assert error_code(r) == (400, "invalid_ciphertext")


# -- audit ----------------------------------------------------------------------------------------


def _sign_events(served: Served, request_id: str) -> list[dict[str, Any]]:
    return [e for e in served.audit.events() if e["request_id"] == request_id]


def test_sign_audit_line_has_algorithm_ct_fp_and_msg_fp_only(
    served: Served, c: httpx.Client
) -> None:
    ct = encrypt(c, HMAC_SECRET)
    r = sign(
        c,
        extra_headers={"X-Request-ID": "sign-audit-1", "X-User-ID": "user-42"},
        encrypted_data=ct,
        algorithm="hmac-sha256",
        message=ORDER,
    )
    signature = signature_of(r)
    (event,) = _sign_events(served, "sign-audit-1")
    pseudonym = "u_" + hmac.new(PSEUDONYM_KEY.encode(), b"user-42", "sha256").hexdigest()[:16]
    assert {k: v for k, v in event.items() if k not in ("timestamp", "duration_ms")} == {
        "event": "audit",
        "operation": "sign",
        "requestor": "conductor",
        "user_id": pseudonym,
        "success": True,
        "code": "ok",
        "request_id": "sign-audit-1",
        "ct_fp": hashlib.sha256(ct.encode()).hexdigest()[:16],
        "algorithm": "hmac-sha256",
        "msg_fp": short_hash(ORDER),
    }
    line = json.dumps(event)
    for value in (signature, ORDER, HMAC_SECRET, "user-42"):
        assert value not in line


def test_msg_fp_is_of_the_decoded_message_bytes(served: Served, c: httpx.Client) -> None:
    raw = b"\x00\x01binary prehash\xff"
    r = sign(
        c,
        extra_headers={"X-Request-ID": "sign-audit-2"},
        encrypted_data=encrypt(c, HMAC_SECRET),
        algorithm="hmac-sha512",
        message=base64.b64encode(raw).decode(),
        message_encoding="base64",
    )
    assert r.status_code == 200
    (event,) = _sign_events(served, "sign-audit-2")
    assert event["msg_fp"] == short_hash(raw)
    assert event["algorithm"] == "hmac-sha512"


def test_failed_sign_is_audited_with_its_code_and_fingerprints(
    served: Served, c: httpx.Client
) -> None:
    ct = encrypt(c, "zz-not-hex")
    r = sign(
        c,
        extra_headers={"X-Request-ID": "sign-audit-3"},
        encrypted_data=ct,
        algorithm="hmac-sha256",
        message=ORDER,
        key_encoding="hex",
    )
    assert error_code(r) == (400, "invalid_key")
    (event,) = _sign_events(served, "sign-audit-3")
    assert (event["operation"], event["success"], event["code"]) == ("sign", False, "invalid_key")
    assert event["ct_fp"] == short_hash(ct)
    assert event["msg_fp"] == short_hash(ORDER)


# -- metrics --------------------------------------------------------------------------------------


def _counter(metrics: str, **labels: str) -> float:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(r"^citadel_requests_total\{" + re.escape(inner) + r"\} (\S+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_sign_requests_are_counted_by_operation_caller_and_code(
    served: Served, c: httpx.Client
) -> None:
    before = c.get("/metrics").text
    ct = encrypt(c, HMAC_SECRET)
    assert sign(c, encrypted_data=ct, algorithm="hmac-sha256", message=ORDER).status_code == 200
    assert sign(c, encrypted_data=ct, algorithm="hmac-sha256", message=ORDER).status_code == 200
    assert sign(c, encrypted_data=ct, algorithm="ed25519", message=ORDER).status_code == 400
    after = c.get("/metrics").text
    ok = {"operation": "sign", "caller": "conductor", "code": "ok"}
    bad = {"operation": "sign", "caller": "conductor", "code": "invalid_key"}
    assert _counter(after, **ok) - _counter(before, **ok) == 2
    assert _counter(after, **bad) - _counter(before, **bad) == 1
    assert 'citadel_request_duration_seconds_count{operation="sign"}' in after


# -- rate limits ----------------------------------------------------------------------------------


def test_sign_spends_the_callers_budget_shared_with_decrypt(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, acl=ACL, rate_limit_per_caller="3/minute")
    with serve_citadel(settings) as s, s.client() as c:
        ct = encrypt(c, HMAC_SECRET)
        body = {"encrypted_data": ct, "algorithm": "hmac-sha256", "message": ORDER}
        statuses = [
            c.post("/sign", json=body, headers=headers("conductor")).status_code,
            c.post(
                "/decrypt", json={"encrypted_data": ct}, headers=headers("conductor")
            ).status_code,
            c.post("/sign", json=body, headers=headers("conductor")).status_code,
            c.post("/sign", json=body, headers=headers("conductor")).status_code,
        ]
        metrics = c.get("/metrics").text
    assert statuses == [200, 200, 200, 429]
    assert 'citadel_rate_limited_total{scope="caller"} 1.0' in metrics


def test_sign_spends_the_users_budget_across_callers(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, acl=ACL, rate_limit_per_user="2/minute", rate_limit_per_caller="1000/minute"
    )
    with serve_citadel(settings) as s, s.client() as c:
        ct = encrypt(c, HMAC_SECRET)
        body = {"encrypted_data": ct, "algorithm": "hmac-sha256", "message": ORDER}
        alice = {"X-User-ID": "alice"}
        answers = [
            c.post("/sign", json=body, headers={**headers("conductor"), **alice}),
            c.post("/sign", json=body, headers={**headers("alchemist"), **alice}),
            c.post("/sign", json=body, headers={**headers("conductor"), **alice}),
            c.post("/sign", json=body, headers={**headers("conductor"), "X-User-ID": "bob"}),
        ]
        metrics = c.get("/metrics").text
    assert [r.status_code for r in answers] == [200, 200, 429, 200]
    assert answers[2].json()["code"] == "rate_limited"
    assert int(answers[2].headers["retry-after"]) >= 1
    assert 'citadel_rate_limited_total{scope="user"} 1.0' in metrics


# -- canaries: nothing of the secret, the message or the signature leaks -----------------------

CANARY_SECRET = "CANARYSIGNSECRET9d4e1f"
CANARY_MESSAGE = "CANARYSIGNMESSAGE7a2b"


def _forms(value: bytes | str) -> list[str]:
    raw = value.encode() if isinstance(value, str) else value
    forms = [
        raw.hex(),
        base64.b64encode(raw).decode()[:16],
        base64.urlsafe_b64encode(raw).decode()[:16],
    ]
    if isinstance(value, str):
        forms.append(value)
    return forms


def test_no_canary_of_secret_message_or_signature_on_any_sign_path(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(
        tmp_path,
        acl=ACL,
        log_level="debug",
        max_sign_message_bytes=64,
        rate_limits={"alchemist": "1/minute"},
        rate_limit_per_caller="100000/minute",
    )
    configure_logging(settings)
    signature = hmac.digest(CANARY_SECRET.encode(), CANARY_MESSAGE.encode(), "sha256")
    ed_secret = pem(ED_KEY)
    ed_marker = ed_secret.splitlines()[1][-24:]  # a piece of the seed in the PEM
    with serve_citadel(settings) as s, s.client() as c:
        ct = encrypt(c, CANARY_SECRET)
        ed_ct = encrypt(c, ed_secret)
        pass_ct = encrypt(c, _passphrase_pem())
        good = {"encrypted_data": ct, "algorithm": "hmac-sha256", "message": CANARY_MESSAGE}
        h = headers("conductor")
        errors = [
            c.post("/sign", json=good, headers={"X-Internal-API-Key": CANARY_SECRET}),  # 401
            c.post("/sign", json=good, headers=headers("sentinel")),  # 403
            c.post("/sign", json={**good, "algorithm": CANARY_MESSAGE}, headers=h),  # 422
            c.post("/sign", json={**good, "key_encoding": CANARY_MESSAGE}, headers=h),
            c.post("/sign", json={**good, CANARY_MESSAGE: CANARY_SECRET}, headers=h),
            c.post("/sign", json={**good, "message_encoding": "base64"}, headers=h),
            c.post("/sign", json={**good, "message": [CANARY_MESSAGE]}, headers=h),
            c.post("/sign", json={**good, "message": CANARY_MESSAGE * 4}, headers=h),  # 413
            c.post("/sign", json={**good, "key_encoding": "hex"}, headers=h),  # 400 invalid_key
            c.post("/sign", json={**good, "key_encoding": "base64"}, headers=h),
            c.post("/sign", json={**good, "algorithm": "ed25519"}, headers=h),
            c.post("/sign", json={**good, "algorithm": "rsa-pkcs1v15-sha256"}, headers=h),
            c.post(
                "/sign",
                json={**good, "encrypted_data": ed_ct, "algorithm": "ecdsa-p256-sha256"},
                headers=h,
            ),
            c.post(
                "/sign",
                json={**good, "encrypted_data": pass_ct, "algorithm": "ecdsa-p256-sha256"},
                headers=h,
            ),
            c.post("/sign", json={**good, "encrypted_data": _tampered(ct)}, headers=h),  # 400
            c.post("/sign", json={**good, "encrypted_data": CANARY_SECRET}, headers=h),
            c.post("/sign", json=good, headers={**h, "X-User-ID": CANARY_MESSAGE + "!"}),
            c.post("/sign", json=good, headers=headers("alchemist")),
            c.post("/sign", json=good, headers=headers("alchemist")),  # 429
        ]
        ok = c.post("/sign", json=good, headers=h)
        s.audit.fail = True
        errors.append(c.post("/sign", json=good, headers=h))  # 503: audit not writable
        s.audit.fail = False
        metrics = c.get("/metrics").text
        audit = s.audit.text()
    out, err = capfd.readouterr()
    assert [r.status_code for r in errors] == [
        401, 403, 422, 422, 422, 422, 422, 413, 400, 400, 400, 400, 400, 400, 400, 400, 422, 200, 429, 503,
    ]  # fmt: skip
    assert {r.json()["code"] for r in errors[8:14]} == {"invalid_key"}
    assert unb64(ok.json()["signature"], "hex") == signature
    assert CANARY_SECRET not in ok.text and CANARY_MESSAGE not in ok.text
    haystacks = {
        "error responses": "\n".join(
            f"{r.headers}\n{r.text}" for r in errors if r.status_code != 200
        ),
        "audit": audit,
        "metrics": metrics,
        "stdout": out,
        "stderr": err,
    }
    canaries = [*_forms(CANARY_SECRET), *_forms(CANARY_MESSAGE), *_forms(signature), ed_marker]
    for name, text in haystacks.items():
        for canary in canaries:
            assert canary not in text, f"{canary!r} found in {name}"


# -- the evervault provider: the secret's decrypt through the SDK and the breaker --------------


def ev_settings(tmp_path: Path, emu: EvervaultEmulator, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "provider": "evervault",
        "evervault_app_id": emu.app_id,
        "evervault_api_key": emu.api_key,
        "evervault_api_url": emu.url,
        "evervault_timeout_s": 2,
        "breaker_fail_max": 2,
        "breaker_reset_s": 30,
        "rate_limit_per_caller": "100000/minute",
        "acl": ACL,
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


@pytest.fixture
def ev_served(tmp_path: Path, emulator: EvervaultEmulator) -> Iterator[Served]:
    with serve_citadel(ev_settings(tmp_path, emulator)) as s, s.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200)
        yield s


def test_evervault_hmac_sign_decrypts_through_the_sdk(
    ev_served: Served, emulator: EvervaultEmulator
) -> None:
    with ev_served.client() as c:
        ct = encrypt(c, HMAC_SECRET)
        assert ct.startswith("ev:")
        before = emulator.calls("decrypt")
        r = sign(c, encrypted_data=ct, algorithm="hmac-sha256", message=ORDER)
        after = emulator.calls("decrypt")
    assert signature_of(r) == hmac.new(HMAC_SECRET.encode(), ORDER.encode(), "sha256").hexdigest()
    assert after - before == 1


def test_evervault_hmac_sha384_and_64_byte_ed25519_sign(ev_served: Served) -> None:
    public = ED_KEY.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    with ev_served.client() as c:
        r384 = sign(
            c, encrypted_data=encrypt(c, HMAC_SECRET), algorithm="hmac-sha384", message=ORDER
        )
        red = sign(
            c,
            encrypted_data=encrypt(c, base64.b64encode(ed_seed() + public).decode()),
            algorithm="ed25519",
            message=ORDER,
            key_encoding="base64",
        )
    assert (
        signature_of(r384) == hmac.new(HMAC_SECRET.encode(), ORDER.encode(), "sha384").hexdigest()
    )
    ED_KEY.public_key().verify(bytes.fromhex(signature_of(red)), ORDER.encode())


@pytest.mark.parametrize("algorithm", ["ed25519", "rsa-pkcs1v15-sha256", "ecdsa-p256-sha256"])
def test_evervault_asymmetric_signatures_verify(ev_served: Served, algorithm: str) -> None:
    key = {"ed25519": ED_KEY, "rsa-pkcs1v15-sha256": RSA_KEY, "ecdsa-p256-sha256": EC_KEY}[
        algorithm
    ]
    with ev_served.client() as c:
        r = sign(c, encrypted_data=encrypt(c, pem(key)), algorithm=algorithm, message=ORDER)
    sig = bytes.fromhex(signature_of(r))
    if algorithm == "ed25519":
        ED_KEY.public_key().verify(sig, ORDER.encode())
    elif algorithm == "rsa-pkcs1v15-sha256":
        RSA_KEY.public_key().verify(sig, ORDER.encode(), padding.PKCS1v15(), hashes.SHA256())
    else:
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        EC_KEY.public_key().verify(der, ORDER.encode(), ec.ECDSA(hashes.SHA256()))


def test_evervault_undecryptable_secret_is_400_and_leaves_the_breaker_closed(
    ev_served: Served, emulator: EvervaultEmulator
) -> None:
    with ev_served.client() as c:
        ct = encrypt(c, HMAC_SECRET)
        emulator.set_fault("decrypt", status=422)
        answers = [
            sign(c, encrypted_data=ct, algorithm="hmac-sha256", message=ORDER) for _ in range(3)
        ]
        health = c.get("/health").json()
    assert [error_code(r) for r in answers] == [(400, "invalid_ciphertext")] * 3
    assert health["breaker"] == "closed"


def test_evervault_upstream_failures_open_the_breaker_for_sign(
    ev_served: Served, emulator: EvervaultEmulator
) -> None:
    with ev_served.client() as c:
        ct = encrypt(c, HMAC_SECRET)
        emulator.set_fault("decrypt", status=500)
        before = emulator.calls("decrypt")
        answers = [
            sign(c, encrypted_data=ct, algorithm="hmac-sha256", message=ORDER) for _ in range(3)
        ]
        reached = emulator.calls("decrypt") - before
        health = c.get("/health").json()
        metrics = c.get("/metrics").text
    assert [error_code(r) for r in answers] == [(503, "provider_unavailable")] * 3
    assert all(int(r.headers["retry-after"]) >= 1 for r in answers)
    assert reached == 2  # breaker_fail_max=2: the third failed fast, without reaching Evervault
    assert health["breaker"] == "open"
    assert 'citadel_breaker_state{provider="evervault"} 2.0' in metrics


def test_evervault_sign_invalid_key_is_400_after_one_decrypt(
    ev_served: Served, emulator: EvervaultEmulator
) -> None:
    with ev_served.client() as c:
        ct = encrypt(c, "not a pem")
        before = emulator.calls("decrypt")
        r = sign(c, encrypted_data=ct, algorithm="ed25519", message=ORDER)
        reached = emulator.calls("decrypt") - before
    assert error_code(r) == (400, "invalid_key")
    assert reached == 1


def test_sign_with_a_secret_under_a_retired_key_is_400_key_retired(tmp_path: Path) -> None:
    from citadel.keyring import change_keyring, rotate_keyring

    settings = make_settings(tmp_path, acl=ACL)
    with serve_citadel(settings) as s, s.client() as c:
        ct = encrypt(c, HMAC_SECRET)
        old = ct.split(":")[1]
        rotate_keyring(settings.local_keyring)
        change_keyring(settings.local_keyring, lambda ring: ring.retire(old))
        body = {"encrypted_data": ct, "algorithm": "hmac-sha256", "message": ORDER}
        wait_until(
            lambda: c.post("/sign", json=body, headers=headers("conductor")).status_code == 400,
            timeout=10,
            interval=0.1,
        )
        r = c.post("/sign", json=body, headers=headers("conductor"))
    assert error_code(r) == (400, "key_retired")


@pytest.mark.parametrize("field", ["algorithm", "message_encoding", "signature_encoding"])
def test_a_choice_outside_the_list_is_refused_naming_the_list_never_the_value(
    c: httpx.Client, field: str
) -> None:
    canary = "canary-choice-7f3a"
    body = {"encrypted_data": "x", "algorithm": "hmac-sha256", "message": "m", field: canary}
    r = c.post("/sign", json=body, headers=headers("conductor"))
    assert error_code(r) == (422, "invalid_request") and canary not in r.text
    assert r.json()["detail"].startswith(f"The field {field} must be one of: ")


def test_a_batch_items_wrong_choice_names_the_item(c: httpx.Client) -> None:
    good = {"encrypted_data": "x", "algorithm": "hmac-sha256", "message": "m"}
    body = {"batch": [good, {**good, "algorithm": "hmac-md5"}]}
    r = c.post("/sign", json=body, headers=headers("conductor"))
    assert error_code(r) == (422, "invalid_request")
    assert r.json()["detail"].startswith("The field batch[1].algorithm must be one of: ")
