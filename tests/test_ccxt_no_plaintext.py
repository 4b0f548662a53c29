"""The plaintext secret never enters the process that runs citadel_client.ccxt.

A child process receives only ciphertexts, Conductor's key (which holds only
``sign``) and the SHA-256 of each secret. It builds sync and async exchanges,
signs private requests through Citadel (the form learned by the trial calls,
so every code path runs), then walks every object the garbage collector
knows and everything they refer to: no ``str`` or ``bytes`` in it, nor any
line of one, hashes to a secret's hash. As a control, the same walk finds the
ciphertext it was given, so the walk does see such strings.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ccxt_oracle import SECRETS
from support import KEYS, Served, make_settings, serve_citadel

from citadel_client import CitadelClient

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, gc, hashlib, json, os, sys

import ccxt
import ccxt.async_support as ccxt_async

from citadel_client import AsyncCitadelClient, CitadelClient
from citadel_client.ccxt import async_exchange, exchange

url, key = os.environ["CITADEL_URL"], os.environ["CONDUCTOR_KEY"]
cases = json.loads(os.environ["CASES"])  # [exchange id, ciphertext, extra config, endpoint]
hashes = set(json.loads(os.environ["SECRET_HASHES"]))
control = hashlib.sha256(cases[0][1].encode()).hexdigest()
del os.environ["CASES"]


class Captured(Exception):
    pass


def capture_class(base, asynchronous):
    # Only what this child needs (tests/ccxt_oracle.py holds made-up plaintexts).
    if asynchronous:
        async def fetch(self, url, method="GET", headers=None, body=None):
            raise Captured()
    else:
        def fetch(self, url, method="GET", headers=None, body=None):
            raise Captured()
    return type(base.__name__, (base,), {"fetch": fetch})


def capture_sync(ex, endpoint):
    api, method, path = endpoint
    try:
        ex.request(path, api, method, {})
    except Captured:
        return
    raise AssertionError("nothing was captured")


async def capture_async(ex, endpoint):
    api, method, path = endpoint
    try:
        await ex.request(path, api, method, {})
    except Captured:
        return
    raise AssertionError("nothing was captured")


with CitadelClient(url, api_key=key) as client:
    for exchange_id, ct, extra, endpoint in cases:
        cls = capture_class(getattr(ccxt, exchange_id), asynchronous=False)
        ex = exchange(cls, client, {"apiKey": "k", "secret": ct, "enableRateLimit": False, **extra})
        capture_sync(ex, tuple(endpoint))

async def run_async():
    async with AsyncCitadelClient(url, api_key=key) as client:
        for exchange_id, ct, extra, endpoint in cases:
            cls = capture_class(getattr(ccxt_async, exchange_id), asynchronous=True)
            ex = async_exchange(cls, client, {"apiKey": "k", "secret": ct, "enableRateLimit": False, **extra})
            try:
                await capture_async(ex, tuple(endpoint))
            finally:
                await ex.close()

asyncio.run(run_async())
gc.collect()


def digests(value):
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
    yield hashlib.sha256(raw).hexdigest()
    for line in raw.splitlines():
        yield hashlib.sha256(line).hexdigest()


found = {"secret": 0, "control": 0, "strings": 0}
seen = set()
for obj in gc.get_objects():
    for ref in [obj, *gc.get_referents(obj)]:
        if isinstance(ref, (str, bytes, bytearray)) and id(ref) not in seen:
            seen.add(id(ref))
            found["strings"] += 1
            for digest in digests(ref):
                if digest in hashes:
                    found["secret"] += 1
                if digest == control:
                    found["control"] += 1
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = make_settings(
        tmp_path_factory.mktemp("ccxt-no-plaintext"),
        acl={"sentinel": ["encrypt"], "conductor": ["sign"]},
        rate_limit_per_caller="100000/minute",
        rate_limit_per_user="100000/minute",
    )
    with serve_citadel(settings) as s:
        yield s


def test_no_string_or_bytes_in_the_adapters_process_is_the_secret(
    served: Served, tmp_path: Path
) -> None:
    forms = {
        "binance": ("text", {}, [["private"], "GET", "account"]),
        "kraken": ("base64", {}, [["private"], "POST", "Balance"]),
        "coinbase": ("ed25519-64", {}, [["v3", "private"], "GET", "brokerage/accounts"]),
        "bybit": ("rsa-pem", {}, [["private"], "GET", "v5/account/wallet-balance"]),
        "kucoin": ("hex", {"password": "p"}, [["private"], "GET", "user-info"]),
    }
    with CitadelClient(served.url, api_key=KEYS["sentinel"]) as sentinel:
        cases = [
            [exchange_id, sentinel.encrypt(SECRETS[form]), extra, endpoint]
            for exchange_id, (form, extra, endpoint) in forms.items()
        ]
    hashes = [hashlib.sha256(SECRETS[form].encode()).hexdigest() for form, _, _ in forms.values()]
    run = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT / "client"),
            "CITADEL_URL": served.url,
            "CONDUCTOR_KEY": KEYS["conductor"],
            "CASES": json.dumps(cases),
            "SECRET_HASHES": json.dumps(hashes),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["strings"] > 1000
    assert found["control"] >= 1  # the walk sees the strings it must see
    assert found["secret"] == 0
