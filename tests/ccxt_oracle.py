"""Test support for citadel_client.ccxt: keys, frozen clocks, captured requests, private endpoints.

The oracle is ccxt itself: a plain ccxt object with the plaintext secret and an
adapted one with the ciphertext are given the same frozen clock and random
ids, their ``fetch`` is replaced by a capture (the network is never reached),
and the requests each would have sent are compared byte for byte.
"""

from __future__ import annotations

import base64
import itertools
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

FROZEN_MS = 1_764_633_600_123  # 2025-12-02, fixed for both objects
HTTP_METHODS = {"get", "post", "put", "delete", "patch"}


def _pem(key: Any, fmt: ser.PrivateFormat = ser.PrivateFormat.PKCS8) -> str:
    text: str = key.private_bytes(ser.Encoding.PEM, fmt, ser.NoEncryption()).decode()
    return text


_ED = ed25519.Ed25519PrivateKey.generate()
_ED_RAW = _ED.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
_ED_PUB = _ED.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)

# Secrets of each form an exchange issues, made here (never real ones).
SECRETS: dict[str, str] = {
    "text": "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
    "hex": "6b2f6a1d9e0c4b3a8f7e6d5c4b3a29180716f5e4d3c2b1a09f8e7d6c5b4a3928",
    "base64": base64.b64encode(bytes(range(7, 71))).decode(),  # Kraken: 64 bytes, 88 chars
    "base64-short": base64.b64encode(b"coinbase-exchange-secret-bytes!!").decode(),
    "rsa-pem": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    "ed25519-pem": _pem(_ED),
    "ec-pem": _pem(ec.generate_private_key(ec.SECP256R1()), ser.PrivateFormat.TraditionalOpenSSL),
    "ed25519-64": base64.b64encode(_ED_RAW + _ED_PUB).decode(),  # Coinbase's Ed25519 form
}


@dataclass(frozen=True)
class Case:
    """One exchange and credential form to compare."""

    name: str
    exchange_id: str
    secret: str  # a key of SECRETS
    extra: tuple[tuple[str, str], ...] = ()
    endpoints: tuple[tuple[Any, str, str], ...] = ()  # besides the first private GET and POST

    def config(self, secret: str) -> dict[str, Any]:
        return {"apiKey": "test-api-key-0001", "secret": secret, **dict(self.extra)}


CASES = [
    Case("binance-hmac", "binance", "text"),
    Case("binance-ed25519", "binance", "ed25519-pem"),
    Case("binance-rsa", "binance", "rsa-pem"),
    Case("bybit-hmac", "bybit", "text"),
    Case("bybit-rsa", "bybit", "rsa-pem"),
    Case("okx", "okx", "text", (("password", "okx-passphrase"),)),
    Case("kraken", "kraken", "base64"),
    Case(
        "coinbase-es256",
        "coinbase",
        "ec-pem",
        (("apiKey", "organizations/o1/apiKeys/k1"),),
        ((["v3", "private"], "GET", "brokerage/accounts"),),
    ),
    Case(
        "coinbase-ed25519",
        "coinbase",
        "ed25519-64",
        endpoints=((["v3", "private"], "POST", "brokerage/orders"),),
    ),
    Case("coinbase-legacy-hmac", "coinbase", "text"),
    Case(
        "coinbaseexchange",
        "coinbaseexchange",
        "base64-short",
        (("password", "cb-passphrase"),),
    ),
    Case("kucoin", "kucoin", "text", (("password", "kucoin-passphrase"),)),
    Case("gate", "gate", "hex"),
    Case("bitget", "bitget", "text", (("password", "bitget-passphrase"),)),
    Case("htx", "htx", "text"),
    Case("mexc", "mexc", "text"),
    Case("deribit", "deribit", "text"),
    Case("bitfinex", "bitfinex", "text"),
    Case("gemini", "gemini", "text", (("apiKey", "account-test-0001"),)),
]


class Captured(Exception):
    """Raised by the capture in place of sending: carries the request, byte for byte."""

    def __init__(self, url: str, method: str, headers: Any, body: Any) -> None:
        super().__init__("captured")
        self.request = (url, method, dict(headers or {}), body)


def capture_class(base: type, *, asynchronous: bool) -> type:
    """A subclass of ccxt's ``base`` whose ``fetch`` raises :class:`Captured` instead of sending."""
    if asynchronous:

        async def afetch(
            self: Any, url: str, method: str = "GET", headers: Any = None, body: Any = None
        ) -> Any:
            raise Captured(url, method, headers, body)

        return type(base.__name__, (base,), {"fetch": afetch})

    def fetch(
        self: Any, url: str, method: str = "GET", headers: Any = None, body: Any = None
    ) -> Any:
        raise Captured(url, method, headers, body)

    return type(base.__name__, (base,), {"fetch": fetch})


def freeze(ex: Any) -> None:
    """The same clock and the same sequence of random ids for every object frozen so."""
    counter = itertools.count(1)
    ex.milliseconds = lambda: FROZEN_MS
    ex.seconds = lambda: FROZEN_MS // 1000
    ex.microseconds = lambda: FROZEN_MS * 1000
    ex.uuid = lambda: f"00000000-0000-4000-8000-{next(counter):012d}"
    ex.uuid16 = lambda length=16: f"{next(counter):016d}"[:length]
    ex.uuid22 = lambda length=22: f"{next(counter):022d}"[:length]
    ex.random_bytes = lambda length: f"{next(counter):x}".rjust(length * 2, "0")
    ex.rand_number = lambda size: int(f"{next(counter)}".rjust(size, "1")[:size])


def private_endpoints(ex: Any) -> list[tuple[Any, str, str]]:
    """(api, method, path) of the first parameter-free private GET and POST endpoints."""
    found: dict[str, tuple[Any, str, str]] = {}

    def walk(node: Any, trail: list[str]) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key.lower() in HTTP_METHODS and isinstance(value, dict | list):
                if not any("private" in t.lower() for t in trail):
                    continue
                method = key.upper()
                if method in found:
                    continue
                paths = value if isinstance(value, list) else list(value)
                for path in paths:
                    if "{" not in path:
                        api = list(trail)
                        found[method] = (api, method, path)
                        break
            else:
                walk(value, [*trail, key])

    walk(ex.api, [])
    return [found[m] for m in ("GET", "POST") if m in found]


PARAMS = {"symbol": "BTCUSDT", "limit": 5, "note": "a b&c=d/é"}
