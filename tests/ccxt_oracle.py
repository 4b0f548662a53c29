"""Test support for citadel_client.ccxt: the helpers of scripts/ccxt_coverage.py, and the cases.

The oracle is ccxt itself: a plain ccxt object with the plaintext secret and an
adapted one with the ciphertext share a frozen clock and the same sequence of
random ids, their ``fetch`` is replaced by a capture (the network is never
reached), and the requests each would have sent are compared byte for byte.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ccxt_coverage.py"
_spec = importlib.util.spec_from_file_location("ccxt_coverage", _SCRIPT)
assert _spec is not None and _spec.loader is not None
coverage: Any = importlib.util.module_from_spec(_spec)
sys.modules["ccxt_coverage"] = coverage
_spec.loader.exec_module(coverage)

Captured = coverage.Captured
capture_class = coverage.capture_class
freeze = coverage.freeze
endpoints = coverage.endpoints
capture_sync = coverage.capture_sync
capture_async = coverage.capture_async
credentials = coverage.credentials
WALLET_KEY = coverage.WALLET_KEY
COVERAGE_JSON = Path(__file__).resolve().parent / "data" / "ccxt_coverage.json"

# Secrets of each form an exchange issues, made here (never real ones).
SECRETS: dict[str, str] = coverage.make_secrets()
SECRETS["base64-short"] = "Y29pbmJhc2UtZXhjaGFuZ2Utc2VjcmV0LWJ5dGVzISE="  # 32 bytes


@dataclass(frozen=True)
class Case:
    """One exchange and credential form to compare, with the endpoints to try."""

    name: str
    exchange_id: str
    secret: str  # a key of SECRETS
    extra: tuple[tuple[str, str], ...] = ()
    more: tuple[tuple[Any, str, str], ...] = ()  # besides the first private GET and POST

    def config(self, secret: str) -> dict[str, Any]:
        return {
            "apiKey": "test-api-key-0001",
            "secret": secret,
            "enableRateLimit": False,
            **dict(self.extra),
        }


CASES = [
    Case("binance-hmac", "binance", "text"),
    Case("binance-ed25519", "binance", "ed25519-pem"),
    Case("binance-rsa", "binance", "rsa-pem"),
    Case("bybit-hmac", "bybit", "text"),
    Case("bybit-rsa", "bybit", "rsa-pem"),
    Case(
        "okx",
        "okx",
        "text",
        (("password", "okx-passphrase"),),
        ((["private"], "POST", "trade/order"),),  # sign() adds a clOrdId to the params
    ),
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
        more=((["v3", "private"], "POST", "brokerage/orders"),),
    ),
    Case("coinbase-legacy-hmac", "coinbase", "text"),
    Case("coinbaseexchange", "coinbaseexchange", "base64-short", (("password", "cb-pass"),)),
    Case("kucoin", "kucoin", "text", (("password", "kucoin-passphrase"),)),
    Case("gate", "gate", "hex"),
    Case("bitget", "bitget", "text", (("password", "bitget-passphrase"),)),
    Case("htx", "htx", "text"),
    Case("mexc", "mexc", "text"),
    Case("deribit", "deribit", "text"),
    Case("bitfinex", "bitfinex", "text"),
    Case("gemini", "gemini", "text", (("apiKey", "account-test-0001"),)),
]
