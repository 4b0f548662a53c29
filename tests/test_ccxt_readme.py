"""The README's HMAC-SHA384 and Ed25519 JWT recipes, and its "Conductor on ccxt" blocks, against Citadel.

The recipes are the signing section's blocks, executed as written (as
tests/test_recipes.py does for the others) and checked against an independent
computation; the ccxt section's blocks run as written in a child process with
the environment a service has (tests/test_readme_blocks.py also runs them in a
client-only virtual environment), against a Citadel whose Conductor holds only
``sign``, and must leave no failed audit line (no trial calls).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519
from support import KEYS, Served, make_settings, serve_citadel

from citadel_client import AsyncCitadelClient, CitadelClient

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CANARY = "CANARY-CCXT-README-7731"


def section(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def blocks(heading: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section(heading), flags=re.S)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = make_settings(
        tmp_path_factory.mktemp("ccxt-readme"),
        acl={"sentinel": ["encrypt"], "conductor": ["sign"]},
        rate_limit_per_caller="100000/minute",
        rate_limit_per_user="100000/minute",
    )
    with serve_citadel(settings) as s:
        yield s


@pytest.fixture(scope="module")
def recipes() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "signing_recipes"}
    for block in blocks("## Signing orders without seeing the secret"):
        exec(compile(block, str(README), "exec"), namespace)
    return namespace


def encrypt(served: Served, secret: str) -> str:
    with CitadelClient(served.url, api_key=KEYS["sentinel"]) as sentinel:
        return sentinel.encrypt(secret)


def call(served: Served, recipe: Any, *args: Any, **kwargs: Any) -> Any:
    async def main() -> Any:
        async with AsyncCitadelClient(served.url, api_key=KEYS["conductor"]) as citadel:
            return await recipe(citadel, *args, **kwargs)

    return asyncio.run(main())


SECRET = "bfx-or-gemini-secret-0123456789abcdef"


def test_bitfinex_recipe_signs_api_path_nonce_and_body_with_hmac_sha384(
    served: Served, recipes: dict[str, Any]
) -> None:
    body = '{"type":"EXCHANGE LIMIT"}'
    got = call(
        served,
        recipes["bitfinex_headers"],
        encrypt(served, SECRET),
        "key-1",
        "v2/auth/w/order/submit",
        body,
        nonce="1700000000000",
    )
    message = "/api/v2/auth/w/order/submit1700000000000" + body
    assert got == {
        "bfx-nonce": "1700000000000",
        "bfx-apikey": "key-1",
        "bfx-signature": hmac.new(SECRET.encode(), message.encode(), "sha384").hexdigest(),
    }


def test_gemini_recipe_signs_the_base64_payload_with_hmac_sha384(
    served: Served, recipes: dict[str, Any]
) -> None:
    got = call(
        served,
        recipes["gemini_headers"],
        encrypt(served, SECRET),
        "account-key",
        "/v1/balances",
        {"account": "primary"},
        nonce=1700000000000,
    )
    payload = got["X-GEMINI-PAYLOAD"]
    assert json.loads(base64.b64decode(payload)) == {
        "request": "/v1/balances",
        "nonce": 1700000000000,
        "account": "primary",
    }
    expected = hmac.new(SECRET.encode(), payload.encode(), "sha384").hexdigest()
    assert got["X-GEMINI-SIGNATURE"] == expected


def test_coinbase_ed25519_recipe_builds_an_eddsa_jwt_that_verifies(
    served: Served, recipes: dict[str, Any]
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    stored = base64.b64encode(seed + public).decode()  # as CDP issues it
    token = call(
        served,
        recipes["coinbase_jwt_ed25519"],
        encrypt(served, stored),
        "key-id",
        "GET",
        "/api/v3/brokerage/accounts",
        now=1_700_000_000,
    )
    head, payload, signature = token.split(".")

    def unb64(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    assert json.loads(unb64(head))["alg"] == "EdDSA"
    assert json.loads(unb64(payload))["uris"] == ["GET api.coinbase.com/api/v3/brokerage/accounts"]
    key.public_key().verify(unb64(signature), f"{head}.{payload}".encode())


def test_recipe_json_bodies_name_only_contract_fields() -> None:
    text = section("## Signing orders without seeing the secret")
    for body in (json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, flags=re.S)):
        assert set(body) == {
            "encrypted_data",
            "algorithm",
            "message",
            "message_encoding",
            "key_encoding",
            "signature_encoding",
        }


CCXT_BLOCKS = blocks("## Conductor on ccxt")


def test_the_ccxt_section_has_its_blocks() -> None:
    assert len(CCXT_BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(CCXT_BLOCKS)))
def test_ccxt_section_block_runs_with_a_conductor_holding_only_sign(
    served: Served, index: int, tmp_path: Path
) -> None:
    script = tmp_path / "block.py"
    script.write_text(CCXT_BLOCKS[index], encoding="utf-8")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT / "client"),
        "CITADEL_URL": served.url,
        "CITADEL_API_KEY": KEYS["sentinel"],
        "SENTINEL_KEY": KEYS["sentinel"],
        "CONDUCTOR_KEY": KEYS["conductor"],
        "EXCHANGE_SECRET": CANARY,
    }
    before = len(served.audit.events())
    run = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert CANARY not in run.stdout
    events = served.audit.events()[before:]
    assert events and all(e["success"] for e in events)
    if index:  # the Conductor blocks: one /sign for their one request, no trial calls
        assert sum(e["operation"] == "sign" for e in events) == 1
