"""Property tests against a live Citadel: whatever a client sends, the answer keeps the contract.

For every operation (/encrypt, /decrypt, /sign, /rewrap), bodies are arbitrary
JSON values or near-valid objects with random extra fields (canary-like names
included), sent with random X-User-ID and X-Request-ID values and any of the
callers. Every answer must be:

- never a 5xx;
- an error only in the contract's shape ``{"detail", "code"}``, with a code of
  the contract's table and the status that goes with it;
- free of the request's content: no field name or string value of 6 or more
  characters from the body or the headers appears in an error body (words of
  the contract itself, such as a field name, are not the client's content);
- free of the stored secrets, except a /decrypt answer to a caller allowed it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import KEYS, Served, make_settings, serve_citadel

from citadel import errors
from citadel.signing import ALGORITHMS, MESSAGE_ENCODINGS, SIGNATURE_ENCODINGS

OPERATIONS = ("encrypt", "decrypt", "sign", "rewrap")
FIELDS = {
    "encrypt": ("plaintext",),
    "decrypt": ("encrypted_data",),
    "rewrap": ("encrypted_data",),
    "sign": (
        "encrypted_data",
        "algorithm",
        "message",
        "message_encoding",
        "key_encoding",
        "signature_encoding",
    ),
}
STATUS_OF_CODE = {
    "unauthenticated": 401,
    "forbidden": 403,
    "payload_too_large": 413,
    "invalid_request": 422,
    "invalid_ciphertext": 400,
    "key_retired": 400,
    "invalid_key": 400,
    "request_timeout": 408,
    "rate_limited": 429,
    "provider_unavailable": 503,
    "not_found": 404,
    "method_not_allowed": 405,
}
HMAC_SECRET = "CANARYSECRETHMAC-0123456789abcdef"
ED25519_PEM = (
    ed25519.Ed25519PrivateKey.generate()
    .private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    .decode()
)
# Placeholders that the test swaps for real ciphertexts, so that bodies also reach
# the provider and the signer instead of stopping at the schema.
CT_HMAC, CT_PEM = "@@CT_HMAC@@", "@@CT_PEM@@"

# The contract's own words: a generated string that is part of these is not "the
# client's content" when it shows up in a detail.
VOCABULARY = " ".join(
    [
        *(f for fields in FIELDS.values() for f in fields),
        *OPERATIONS,
        *ALGORITHMS,
        *(e for encodings in ALGORITHMS.values() for e in encodings),
        *MESSAGE_ENCODINGS,
        *SIGNATURE_ENCODINGS,
        *STATUS_OF_CODE,
        *(cls.default_detail for cls in vars(errors).values() if isinstance(cls, type)),
        "The request does not fit the schema",
    ]
)

canary = st.from_regex(r"CANARY[A-Za-z0-9]{2,12}", fullmatch=True)
field_name = st.one_of(
    st.sampled_from([f for fields in FIELDS.values() for f in fields]),
    canary,
    st.text(max_size=16),
)
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    canary,
    st.sampled_from([CT_HMAC, CT_PEM, "cit1:00000000:AAAA", "ev:abc", ""]),
)
json_value = st.recursive(
    scalar,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(field_name, children, max_size=4)
    ),
    max_leaves=12,
)


def field_value(name: str) -> st.SearchStrategy[Any]:
    """Plausible values for a contract field, mixed with anything at all."""
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "plaintext": st.one_of(st.text(max_size=60), canary),
        "encrypted_data": st.sampled_from([CT_HMAC, CT_PEM, "cit1:deadbeef:AAAA", "ev:xyz"]),
        "algorithm": st.sampled_from([*ALGORITHMS, "hmac-sha1", "HMAC-SHA256"]),
        "message": st.one_of(
            st.text(min_size=1, max_size=60),
            st.binary(min_size=1, max_size=40).map(lambda b: base64.b64encode(b).decode()),
        ),
        "message_encoding": st.sampled_from([*MESSAGE_ENCODINGS, "hex"]),
        "key_encoding": st.sampled_from(
            sorted({e for es in ALGORITHMS.values() for e in es} | {"raw"})
        ),
        "signature_encoding": st.sampled_from([*SIGNATURE_ENCODINGS, "base32"]),
    }
    return st.one_of(plausible[name], plausible[name], json_value)


def body_for(operation: str) -> st.SearchStrategy[Any]:
    """An arbitrary JSON value, or the operation's object with some fields and random extras."""
    fields = FIELDS[operation]
    near_valid = st.fixed_dictionaries(
        {}, optional={name: field_value(name) for name in fields}
    ).flatmap(
        lambda base: st.dictionaries(field_name, json_value, max_size=2).map(
            lambda extra: {**extra, **base}
        )
    )
    return st.one_of(near_valid, near_valid, json_value)


# Printable ASCII; h11 (httpx's HTTP/1.1) refuses to send surrounding whitespace itself.
header_value = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.:@-]{1,40}", fullmatch=True),
    canary,
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=160).map(str.strip),
)
callers = st.sampled_from(["conductor", "sentinel", "api-gateway", None, "bad"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings_ = make_settings(
        tmp_path_factory.mktemp("properties"),
        acl={"sentinel": ["encrypt"], "conductor": ["decrypt", "sign", "rewrap"]},
        rate_limit_per_caller="10000000/minute",
        rate_limit_per_user="10000000/minute",
        rate_limit_auth_failures="10000000/minute",
    )
    with serve_citadel(settings_) as s:
        yield s


@pytest.fixture(scope="module")
def ciphertexts(served: Served) -> dict[str, str]:
    out = {}
    with served.client() as c:
        for placeholder, secret in ((CT_HMAC, HMAC_SECRET), (CT_PEM, ED25519_PEM)):
            r = c.post(
                "/encrypt",
                json={"plaintext": secret},
                headers={"X-Internal-API-Key": KEYS["sentinel"]},
            )
            assert r.status_code == 200, r.text
            out[placeholder] = r.json()["encrypted_data"]
    return out


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with served.client() as c:
        yield c


def substitute(value: Any, ciphertexts: dict[str, str]) -> Any:
    if isinstance(value, str):
        return ciphertexts.get(value, value)
    if isinstance(value, list):
        return [substitute(v, ciphertexts) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, ciphertexts) for k, v in value.items()}
    return value


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from strings_in(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings_in(v)


def send(
    http: httpx.Client,
    operation: str,
    body: Any,
    caller: str | None,
    user_id: str | None,
    request_id: str | None,
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if caller == "bad":
        headers["X-Internal-API-Key"] = "CANARYBADKEY-" + "z" * 30
    elif caller is not None:
        headers["X-Internal-API-Key"] = KEYS[caller]
    if user_id is not None:
        headers["X-User-ID"] = user_id
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    return http.post("/" + operation, content=json.dumps(body).encode(), headers=headers)


def check(
    r: httpx.Response,
    operation: str,
    body: Any,
    caller: str | None,
    sent_headers: list[str],
) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    if caller in (None, "bad"):
        # Without a valid key the answer is 401 whatever the body (or 429 past the limit).
        assert r.status_code == 401, (r.status_code, r.text)
    if r.status_code >= 400:
        error = r.json()
        assert isinstance(error, dict) and set(error) == {"detail", "code"}, r.text
        assert isinstance(error["detail"], str) and error["detail"]
        assert STATUS_OF_CODE.get(error["code"]) == r.status_code, r.text
        for text in [*strings_in(body), *sent_headers]:
            if len(text) >= 6 and text not in VOCABULARY:
                assert text not in r.text, "request content echoed in the error body"
                assert text not in error["detail"], "request content echoed in the detail"
    elif operation != "decrypt":
        assert HMAC_SECRET not in r.text
        assert "PRIVATE KEY" not in r.text
    if r.status_code == 200:
        assert caller is not None and caller != "bad"


def run_case(
    http: httpx.Client,
    ciphertexts: dict[str, str],
    operation: str,
    body: Any,
    caller: str | None,
    user_id: str | None,
    request_id: str | None,
) -> None:
    body = substitute(body, ciphertexts)
    r = send(http, operation, body, caller, user_id, request_id)
    sent = [h for h in (user_id, request_id) if h is not None]
    check(r, operation, body, caller, sent)


SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MAYBE_HEADER = st.none() | header_value


@pytest.mark.parametrize("operation", OPERATIONS)
@SETTINGS
@given(data=st.data())
def test_any_body_and_headers_get_a_contract_answer(
    http: httpx.Client, ciphertexts: dict[str, str], operation: str, data: st.DataObject
) -> None:
    run_case(
        http,
        ciphertexts,
        operation,
        data.draw(body_for(operation), label="body"),
        data.draw(callers, label="caller"),
        data.draw(MAYBE_HEADER, label="X-User-ID"),
        data.draw(MAYBE_HEADER, label="X-Request-ID"),
    )


@SETTINGS
@given(body=body_for("sign"), user_id=MAYBE_HEADER, request_id=MAYBE_HEADER)
@example(
    body={
        "encrypted_data": CT_HMAC,
        "algorithm": "hmac-sha256",
        "message": "symbol=LTCBTC",
        "CANARYFIELDNAME": 1,
    },
    user_id=None,
    request_id=None,
)
@example(
    body={
        "encrypted_data": CT_HMAC,
        "algorithm": "ed25519",
        "message": "m",
        "key_encoding": "hex",
    },
    user_id="CANARYUSER",
    request_id="CANARYREQUEST",
)
def test_sign_as_conductor_never_echoes_or_leaks(
    http: httpx.Client,
    ciphertexts: dict[str, str],
    body: Any,
    user_id: str | None,
    request_id: str | None,
) -> None:
    """The caller allowed to sign, so bodies get past the ACL to the schema, provider and signer."""
    run_case(http, ciphertexts, "sign", body, "conductor", user_id, request_id)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_an_unknown_field_name_is_not_named_in_the_detail(
    http: httpx.Client, ciphertexts: dict[str, str], operation: str
) -> None:
    caller = "sentinel" if operation == "encrypt" else "conductor"
    body = {"CANARYUNKNOWNFIELD": "x"}
    r = send(http, operation, body, caller, None, None)
    assert (r.status_code, r.json()["code"]) == (422, "invalid_request")
    assert "CANARYUNKNOWNFIELD" not in r.text
