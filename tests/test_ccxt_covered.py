"""Every exchange tests/data/ccxt_coverage.json calls covered, against a live Citadel, sync and async.

The table is scripts/ccxt_coverage.py's, generated from the installed ccxt (it
signs with citadel.signing in-process); here each covered exchange and secret
form is compared again with plain ccxt, through real HTTP to a Citadel whose
caller holds only ``sign``. A ccxt upgrade that changes the exchange list fails
the first test until the table is regenerated.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import ccxt
import ccxt.async_support as ccxt_async
import pytest
from ccxt_oracle import (
    COVERAGE_JSON,
    SECRETS,
    WALLET_KEY,
    capture_async,
    capture_class,
    capture_sync,
    credentials,
    endpoints,
    freeze,
)
from support import KEYS, Served, make_settings, serve_citadel

from citadel_client import AsyncCitadelClient, CitadelClient
from citadel_client.ccxt import async_exchange, exchange

TABLE = json.loads(COVERAGE_JSON.read_text(encoding="utf-8"))
COVERED = [
    (exchange_id, form)
    for exchange_id, verdict in TABLE["exchanges"].items()
    if verdict["status"] == "covered"
    for form in verdict["forms"]
]
ACL = {"sentinel": ["encrypt"], "conductor": ["sign"], "api-gateway": [], "alchemist": []}


def test_the_table_is_of_the_installed_ccxt() -> None:
    assert TABLE["ccxt"] == ccxt.__version__
    assert sorted(TABLE["exchanges"]) == sorted(ccxt.exchanges)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = make_settings(
        tmp_path_factory.mktemp("ccxt-covered"),
        acl=ACL,
        rate_limit_per_caller="1000000/minute",
        rate_limit_per_user="1000000/minute",
    )
    with serve_citadel(settings) as s:
        yield s


@pytest.fixture(scope="module")
def ct(served: Served) -> dict[str, str]:
    with CitadelClient(served.url, api_key=KEYS["sentinel"]) as sentinel:
        out = {form: sentinel.encrypt(secret) for form, secret in SECRETS.items()}
        out["wallet"] = sentinel.encrypt(WALLET_KEY)
        return out


@pytest.fixture(scope="module")
def conductor(served: Served) -> Iterator[CitadelClient]:
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as client:
        yield client


def _built(plain: Any) -> list[tuple[Any, str, str]]:
    """The endpoints plain ccxt can build a request for with these credentials."""
    out = []
    for endpoint in endpoints(plain):
        freeze(plain)
        try:
            capture_sync(plain, endpoint)
        except Exception:
            continue
        out.append(endpoint)
    return out


@pytest.mark.parametrize(("exchange_id", "form"), COVERED, ids=[f"{e}-{f}" for e, f in COVERED])
def test_covered_exchange_requests_are_plain_ccxts_sync_and_async(
    exchange_id: str, form: str, served: Served, ct: dict[str, str], conductor: CitadelClient
) -> None:
    cls = capture_class(getattr(ccxt, exchange_id), asynchronous=False)
    plain_conf = credentials(cls, form, SECRETS[form], WALLET_KEY)
    adapted_conf = credentials(cls, form, ct[form], ct["wallet"])
    built = _built(cls(plain_conf))  # a throwaway object: a nonce counter advances there
    plain = cls(plain_conf)
    assert built, "the table calls it covered, so plain ccxt builds a private request"
    adapted = exchange(cls, conductor, adapted_conf)
    for endpoint in built:
        freeze(plain)
        freeze(adapted)
        assert capture_sync(adapted, endpoint) == capture_sync(plain, endpoint), endpoint

    async def main() -> None:
        acls = capture_class(getattr(ccxt_async, exchange_id), asynchronous=True)
        aplain = acls(plain_conf)
        async with AsyncCitadelClient(served.url, api_key=KEYS["conductor"]) as client:
            aadapted = async_exchange(acls, client, adapted_conf)
            try:
                for endpoint in built:
                    freeze(aplain)
                    freeze(aadapted)
                    want = await capture_async(aplain, endpoint)
                    assert await capture_async(aadapted, endpoint) == want, endpoint
            finally:
                await aplain.close()
                await aadapted.close()

    asyncio.run(main())
