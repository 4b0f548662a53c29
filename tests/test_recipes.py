"""The README's signing recipes ("Signing orders without seeing the secret"), run against Citadel.

Every ```python block of the recipes page is executed as written, with the real
``citadel_client.AsyncCitadelClient`` (tests/test_readme_blocks.py runs the same
blocks in a client-only virtual environment); each recipe then runs over real HTTP
against a Citadel served on loopback, through the contract's ``POST /sign``. A
recording transport under the client keeps each request body and checks each
answer. Each result is checked against the exchange's published example where
there is one (Binance, Kraken), otherwise against an independent computation
(hmac, hashlib, cryptography's verify).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from support import KEYS, Served, make_settings, serve_citadel

from citadel_client import AsyncCitadelClient

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Signing orders without seeing the secret"


def recipes_text() -> str:
    """The README's signing section, from its heading to the next section."""
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end != -1 else len(text)]


ACL = {"conductor": ["decrypt", "sign"], "sentinel": ["encrypt"]}

# Binance's documentation example (SIGNED endpoint examples for POST /api/v3/order).
BINANCE_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
BINANCE_PARAMS = {
    "symbol": "LTCBTC",
    "side": "BUY",
    "type": "LIMIT",
    "timeInForce": "GTC",
    "quantity": "1",
    "price": "0.1",
    "recvWindow": "5000",
    "timestamp": "1499827319559",
}
BINANCE_SIGNATURE = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
# Kraken's documentation example (Spot REST authentication, AddOrder).
KRAKEN_SECRET = (
    "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg=="
)
KRAKEN_NONCE = 1616492376594
KRAKEN_PARAMS = {
    "ordertype": "limit",
    "pair": "XBTUSD",
    "price": "37500",
    "type": "buy",
    "volume": "1.25",
}
KRAKEN_POSTDATA = "nonce=1616492376594&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25"
KRAKEN_API_SIGN = (
    "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ=="
)


class Recording(httpx.AsyncBaseTransport):
    """Real HTTP (httpx's own transport) that keeps each request body the client sent.

    Every answer must be 200 with the signature and nothing else: what the page
    promises a caller gets back from ``/sign``.
    """

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.bodies: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        response = await self._inner.handle_async_request(request)
        content = await response.aread()
        assert response.status_code == 200, (response.status_code, content)
        assert set(json.loads(content)) == {"signature"}
        return httpx.Response(response.status_code, headers=response.headers, content=content)

    async def aclose(self) -> None:
        await self._inner.aclose()


class Conductor:
    """Conductor's real client (granted ``sign``) and the bodies it sent."""

    def __init__(self, url: str) -> None:
        self.transport = Recording()
        self.client = AsyncCitadelClient(url, KEYS["conductor"], transport=self.transport)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return self.transport.bodies


def recipe_namespace() -> dict[str, Any]:
    """The page's Python blocks, executed in order into one namespace."""
    blocks = re.findall(r"```python\n(.*?)```", recipes_text(), flags=re.S)
    namespace: dict[str, Any] = {"__name__": "signing_recipes"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = make_settings(
        tmp_path_factory.mktemp("recipes"), acl=ACL, rate_limit_per_caller="100000/minute"
    )
    with serve_citadel(settings) as s:
        yield s


@pytest.fixture(scope="module")
def recipes() -> dict[str, Any]:
    return recipe_namespace()


@pytest.fixture(scope="module", autouse=True)
def loop() -> Iterator[asyncio.Runner]:
    """One event loop for the module's recipe calls (a client is bound to its loop)."""
    global _RUNNER
    with asyncio.Runner() as runner:
        _RUNNER = runner
        yield runner
        _RUNNER = None


_RUNNER: asyncio.Runner | None = None


@pytest.fixture
def conductor(served: Served, loop: asyncio.Runner) -> Iterator[Conductor]:
    conductor = Conductor(served.url)
    yield conductor
    loop.run(conductor.client.aclose())


def encrypt(served: Served, secret: str) -> str:
    with served.client() as c:
        r = c.post(
            "/encrypt", json={"plaintext": secret}, headers={"X-Internal-API-Key": KEYS["sentinel"]}
        )
    assert r.status_code == 200, r.text
    ciphertext: str = r.json()["encrypted_data"]
    return ciphertext


def run(coro: Any) -> Any:
    assert _RUNNER is not None
    return _RUNNER.run(coro)


def pem(key: Any, fmt: ser.PrivateFormat = ser.PrivateFormat.PKCS8) -> str:
    text: str = key.private_bytes(ser.Encoding.PEM, fmt, ser.NoEncryption()).decode()
    return text


def hmac_b64(key: bytes, message: str, digest: str = "sha256") -> str:
    return base64.b64encode(hmac.digest(key, message.encode(), digest)).decode()


# -- the page itself --------------------------------------------------------------------------------


def test_every_recipe_block_runs_and_defines_its_function(recipes: dict[str, Any]) -> None:
    for name in (
        "binance_signed_query",
        "binance_signed_query_asymmetric",
        "bybit_headers",
        "okx_headers",
        "kucoin_signed_passphrase",
        "kucoin_headers",
        "kraken_request",
        "gate_headers",
        "coinbase_jwt",
        "coinbase_exchange_headers",
    ):
        assert asyncio.iscoroutinefunction(recipes[name]), name


def test_every_json_body_on_the_page_uses_only_contract_values() -> None:
    text = recipes_text()
    bodies = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, flags=re.S)]
    assert len(bodies) >= 9
    for body in bodies:
        assert set(body) == {
            "encrypted_data",
            "algorithm",
            "message",
            "message_encoding",
            "key_encoding",
            "signature_encoding",
        }
        assert body["message_encoding"] in ("utf-8", "base64")
        assert body["signature_encoding"] in ("hex", "base64", "base64url")


# -- Binance ----------------------------------------------------------------------------------------


def test_binance_hmac_recipe_gives_the_documented_signature(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    ct = encrypt(served, BINANCE_SECRET)
    query = run(recipes["binance_signed_query"](conductor.client, ct, BINANCE_PARAMS))
    assert query == (
        "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1"
        f"&recvWindow=5000&timestamp=1499827319559&signature={BINANCE_SIGNATURE}"
    )


def test_binance_json_body_on_the_page_gives_the_documented_signature(served: Served) -> None:
    text = recipes_text()
    body = json.loads(re.findall(r"```json\n(.*?)```", text, flags=re.S)[0])
    body["encrypted_data"] = encrypt(served, BINANCE_SECRET)
    with served.client() as c:
        r = c.post("/sign", json=body, headers={"X-Internal-API-Key": KEYS["conductor"]})
    assert r.json() == {"signature": BINANCE_SIGNATURE}


def test_binance_ed25519_recipe_signature_verifies_with_the_public_key(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    ct = encrypt(served, pem(key))
    params = {"symbol": "BTCUSDT", "side": "SELL", "type": "LIMIT", "timestamp": "1668481559918"}
    signed = run(recipes["binance_signed_query_asymmetric"](conductor.client, ct, params))
    query, _, encoded = signed.rpartition("&signature=")
    assert query == "symbol=BTCUSDT&side=SELL&type=LIMIT&timestamp=1668481559918"
    assert "+" not in encoded and "/" not in encoded and "=" not in encoded  # percent-encoded
    key.public_key().verify(base64.b64decode(unquote(encoded)), query.encode())


def test_binance_rsa_recipe_signature_verifies_with_the_public_key(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ct = encrypt(served, pem(key, ser.PrivateFormat.TraditionalOpenSSL))
    params = {"symbol": "BTCUSDT", "side": "BUY", "timestamp": "1700000000000"}
    signed = run(
        recipes["binance_signed_query_asymmetric"](
            conductor.client, ct, params, algorithm="rsa-pkcs1v15-sha256"
        )
    )
    query, _, encoded = signed.rpartition("&signature=")
    key.public_key().verify(
        base64.b64decode(unquote(encoded)), query.encode(), padding.PKCS1v15(), hashes.SHA256()
    )


# -- Bybit, OKX, KuCoin, Gate, Coinbase Exchange: HMAC against an independent computation --------


def test_bybit_recipe_signs_timestamp_key_window_and_payload(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    secret = "bybit-secret-" + "x" * 24
    body = '{"category":"spot","symbol":"BTCUSDT","side":"Buy","orderType":"Limit","qty":"0.01"}'
    headers = run(
        recipes["bybit_headers"](
            conductor.client, encrypt(served, secret), "APIKEY123", body, timestamp_ms=1658384314791
        )
    )
    expected = hmac.new(
        secret.encode(), ("1658384314791APIKEY1235000" + body).encode(), hashlib.sha256
    ).hexdigest()
    assert headers == {
        "X-BAPI-API-KEY": "APIKEY123",
        "X-BAPI-TIMESTAMP": "1658384314791",
        "X-BAPI-RECV-WINDOW": "5000",
        "X-BAPI-SIGN": expected,
    }


def test_okx_recipe_signs_iso_timestamp_method_path_and_body(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    secret = "okx-secret-" + "y" * 22
    now = datetime(2020, 12, 8, 9, 8, 57, 715000, tzinfo=UTC)
    body = (
        '{"instId":"BTC-USDT","tdMode":"cash","side":"buy","ordType":"limit","px":"2.15","sz":"2"}'
    )
    headers = run(
        recipes["okx_headers"](
            conductor.client,
            encrypt(served, secret),
            "K",
            "P",
            "post",
            "/api/v5/trade/order",
            body,
            now=now,
        )
    )
    assert headers["OK-ACCESS-TIMESTAMP"] == "2020-12-08T09:08:57.715Z"
    prehash = "2020-12-08T09:08:57.715ZPOST/api/v5/trade/order" + body
    assert headers["OK-ACCESS-SIGN"] == hmac_b64(secret.encode(), prehash)
    assert (headers["OK-ACCESS-KEY"], headers["OK-ACCESS-PASSPHRASE"]) == ("K", "P")


def test_okx_recipe_get_signs_the_path_with_its_query(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    secret = "okx-secret-" + "z" * 22
    now = datetime(2024, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)
    headers = run(
        recipes["okx_headers"](
            conductor.client,
            encrypt(served, secret),
            "K",
            "P",
            "GET",
            "/api/v5/account/balance?ccy=BTC",
            now=now,
        )
    )
    prehash = "2024-01-02T03:04:05.006ZGET/api/v5/account/balance?ccy=BTC"
    assert headers["OK-ACCESS-SIGN"] == hmac_b64(secret.encode(), prehash)


def test_kucoin_recipe_signs_the_request_and_the_passphrase(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    secret = "kucoin-secret-" + "q" * 22
    ct = encrypt(served, secret)
    signed_passphrase = run(
        recipes["kucoin_signed_passphrase"](conductor.client, ct, "my-passphrase")
    )
    assert signed_passphrase == hmac_b64(secret.encode(), "my-passphrase")
    body = (
        '{"clientOid":"5c52e11203aa677f33e493fb","side":"buy","symbol":"BTC-USDT","size":"0.001"}'
    )
    headers = run(
        recipes["kucoin_headers"](
            conductor.client,
            ct,
            "K",
            signed_passphrase,
            "post",
            "/api/v1/orders",
            body,
            timestamp_ms=1547015186532,
        )
    )
    assert headers == {
        "KC-API-KEY": "K",
        "KC-API-SIGN": hmac_b64(secret.encode(), "1547015186532POST/api/v1/orders" + body),
        "KC-API-TIMESTAMP": "1547015186532",
        "KC-API-PASSPHRASE": signed_passphrase,
        "KC-API-KEY-VERSION": "2",
    }


def test_gate_recipe_signs_method_path_query_body_hash_and_timestamp(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    secret = "gate-secret-" + "g" * 20
    body = '{"currency_pair":"BTC_USDT","side":"buy","amount":"0.001","price":"20000"}'
    headers = run(
        recipes["gate_headers"](
            conductor.client,
            encrypt(served, secret),
            "K",
            "post",
            "/api/v4/spot/orders",
            "",
            body,
            timestamp_s=1700000000,
        )
    )
    string = (
        "POST\n/api/v4/spot/orders\n\n" + hashlib.sha512(body.encode()).hexdigest() + "\n1700000000"
    )
    expected = hmac.new(secret.encode(), string.encode(), hashlib.sha512).hexdigest()
    assert headers == {"KEY": "K", "Timestamp": "1700000000", "SIGN": expected}


def test_gate_recipe_get_hashes_the_empty_body(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    secret = "gate-secret-" + "h" * 20
    headers = run(
        recipes["gate_headers"](
            conductor.client,
            encrypt(served, secret),
            "K",
            "GET",
            "/api/v4/spot/orders",
            "currency_pair=BTC_USDT&status=open",
            timestamp_s=1700000000,
        )
    )
    string = (
        "GET\n/api/v4/spot/orders\ncurrency_pair=BTC_USDT&status=open\n"
        + hashlib.sha512(b"").hexdigest()
        + "\n1700000000"
    )
    assert headers["SIGN"] == hmac.new(secret.encode(), string.encode(), hashlib.sha512).hexdigest()


def test_coinbase_exchange_recipe_uses_the_base64_decoded_secret(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    raw = bytes(range(64))
    secret = base64.b64encode(raw).decode()
    body = '{"product_id":"BTC-USD","side":"buy","price":"20000","size":"0.01"}'
    headers = run(
        recipes["coinbase_exchange_headers"](
            conductor.client,
            encrypt(served, secret),
            "K",
            "P",
            "POST",
            "/orders",
            body,
            timestamp_s=1700000000,
        )
    )
    assert headers["CB-ACCESS-SIGN"] == hmac_b64(raw, "1700000000POST/orders" + body)
    assert headers["CB-ACCESS-TIMESTAMP"] == "1700000000"


# -- Kraken -----------------------------------------------------------------------------------------


def test_kraken_recipe_gives_the_documented_api_sign(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    ct = encrypt(served, KRAKEN_SECRET)
    headers, postdata = run(
        recipes["kraken_request"](
            conductor.client, ct, "APIKEY", "/0/private/AddOrder", KRAKEN_PARAMS, nonce=KRAKEN_NONCE
        )
    )
    assert postdata == KRAKEN_POSTDATA
    assert headers["API-Sign"] == KRAKEN_API_SIGN
    assert headers["API-Key"] == "APIKEY"
    assert dict(parse_qsl(postdata))["nonce"] == str(KRAKEN_NONCE)


def test_kraken_json_body_on_the_page_gives_the_documented_api_sign(served: Served) -> None:
    text = recipes_text()
    (body,) = [
        json.loads(b)
        for b in re.findall(r"```json\n(.*?)```", text, flags=re.S)
        if '"hmac-sha512"' in b and '"base64"' in b
    ]
    body["encrypted_data"] = encrypt(served, KRAKEN_SECRET)
    with served.client() as c:
        r = c.post("/sign", json=body, headers={"X-Internal-API-Key": KEYS["conductor"]})
    assert r.json() == {"signature": KRAKEN_API_SIGN}


def test_sign_audit_line_fingerprints_the_decoded_message_bytes(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    ct = encrypt(served, KRAKEN_SECRET)
    run(
        recipes["kraken_request"](
            conductor.client, ct, "K", "/0/private/AddOrder", KRAKEN_PARAMS, nonce=KRAKEN_NONCE
        )
    )
    sent = conductor.bodies[-1]["message"]
    prehash = base64.b64decode(sent)
    msg_fp = hashlib.sha256(prehash).hexdigest()[:16]
    events = [
        e
        for e in served.audit.events()
        if e.get("operation") == "sign" and e.get("msg_fp") == msg_fp
    ]
    assert events, "no /sign audit line carries the fingerprint of the decoded message"
    event = events[-1]
    assert event["algorithm"] == "hmac-sha512"
    assert event["code"] == "ok"
    assert event["ct_fp"] == hashlib.sha256(ct.encode()).hexdigest()[:16]
    assert sent not in served.audit.text()
    assert "API-Sign" not in served.audit.text() and KRAKEN_API_SIGN not in served.audit.text()


# -- Coinbase Advanced Trade ------------------------------------------------------------------------


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_coinbase_recipe_builds_an_es256_jwt_that_verifies(
    served: Served, recipes: dict[str, Any], conductor: Conductor
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ct = encrypt(served, pem(key, ser.PrivateFormat.TraditionalOpenSSL))  # CDP's SEC 1 form
    key_name = "organizations/org-1/apiKeys/key-1"
    token = run(
        recipes["coinbase_jwt"](
            conductor.client, ct, key_name, "get", "/api/v3/brokerage/accounts", now=1700000000
        )
    )
    header_b64, payload_b64, signature_b64 = token.split(".")
    header = json.loads(unb64url(header_b64))
    payload = json.loads(unb64url(payload_b64))
    assert header["alg"] == "ES256" and header["kid"] == key_name and header["typ"] == "JWT"
    assert len(header["nonce"]) == 32
    assert payload == {
        "sub": key_name,
        "iss": "cdp",
        "nbf": 1700000000,
        "exp": 1700000120,
        "uri": "GET api.coinbase.com/api/v3/brokerage/accounts",
    }
    raw = unb64url(signature_b64)
    assert len(raw) == 64 and "=" not in signature_b64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.public_key().verify(der, f"{header_b64}.{payload_b64}".encode(), ec.ECDSA(hashes.SHA256()))


# -- the hardening path -----------------------------------------------------------------------------


def test_after_hardening_conductor_signs_but_cannot_decrypt(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, acl={"sentinel": ["encrypt"], "conductor": ["sign"]})
    with serve_citadel(settings) as s, s.client() as c:
        ct = encrypt(s, BINANCE_SECRET)
        conductor = {"X-Internal-API-Key": KEYS["conductor"]}
        r = c.post("/decrypt", json={"encrypted_data": ct}, headers=conductor)
        assert (r.status_code, r.json()["code"]) == (403, "forbidden")
        assert BINANCE_SECRET not in r.text
        conductor = Conductor(s.url)
        signed = run(
            recipe_namespace()["binance_signed_query"](conductor.client, ct, BINANCE_PARAMS)
        )
        run(conductor.client.aclose())
    assert signed.endswith(BINANCE_SIGNATURE)


def test_by_default_no_one_may_sign(tmp_path: Path) -> None:
    with serve_citadel(make_settings(tmp_path)) as s, s.client() as c:
        ct = encrypt(s, BINANCE_SECRET)
        body = {
            "encrypted_data": ct,
            "algorithm": "hmac-sha256",
            "message": "symbol=LTCBTC",
            "message_encoding": "utf-8",
            "key_encoding": "utf-8",
            "signature_encoding": "hex",
        }
        for caller in ("conductor", "sentinel"):
            r = c.post("/sign", json=body, headers={"X-Internal-API-Key": KEYS[caller]})
            assert (r.status_code, r.json()["code"]) == (403, "forbidden")
