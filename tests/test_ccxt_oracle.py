"""citadel_client.ccxt against ccxt itself: the requests are byte for byte plain ccxt's.

For every case of tests/ccxt_oracle.py, sync and async, against a live Citadel
on loopback whose caller holds only ``sign``: a plain ccxt object with the
plaintext secret and the adapter's object with its ciphertext, with the same
frozen clock and ids, build each private request; both are captured instead of
sent and compared (URL, method, headers, body).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import ccxt
import ccxt.async_support as ccxt_async
import pytest
from ccxt_oracle import (
    CASES,
    SECRETS,
    Case,
    capture_async,
    capture_class,
    capture_sync,
    endpoints,
    freeze,
)
from support import KEYS, Served, make_settings, serve_citadel

from citadel_client import AsyncCitadelClient, CitadelClient
from citadel_client.ccxt import async_exchange, exchange

ACL = {"sentinel": ["encrypt"], "conductor": ["sign"], "api-gateway": [], "alchemist": []}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = make_settings(
        tmp_path_factory.mktemp("ccxt"),
        acl=ACL,
        rate_limit_per_caller="1000000/minute",
        rate_limit_per_user="1000000/minute",
    )
    with serve_citadel(settings) as s:
        yield s


@pytest.fixture(scope="module")
def ciphertexts(served: Served) -> dict[str, str]:
    with CitadelClient(served.url, api_key=KEYS["sentinel"]) as sentinel:
        return {form: sentinel.encrypt(secret) for form, secret in SECRETS.items()}


@pytest.fixture(scope="module")
def conductor(served: Served) -> Iterator[CitadelClient]:
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as client:
        yield client


def endpoints_of(case: Case, ex: Any) -> list[tuple[Any, str, str]]:
    return endpoints(ex) + list(case.more)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_sync_requests_are_byte_for_byte_plain_ccxts(
    case: Case, ciphertexts: dict[str, str], conductor: CitadelClient
) -> None:
    cls = capture_class(getattr(ccxt, case.exchange_id), asynchronous=False)
    plain = cls(case.config(SECRETS[case.secret]))
    adapted = exchange(cls, conductor, case.config(ciphertexts[case.secret]))
    assert isinstance(adapted, getattr(ccxt, case.exchange_id))
    tried = endpoints_of(case, plain)
    assert tried
    for api, method, path in tried:
        freeze(plain)
        freeze(adapted)
        expected = capture_sync(plain, (api, method, path))
        got = capture_sync(adapted, (api, method, path))
        assert got == expected, (api, method, path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_async_requests_are_byte_for_byte_plain_ccxts(
    case: Case, served: Served, ciphertexts: dict[str, str]
) -> None:
    async def main() -> None:
        cls = capture_class(getattr(ccxt_async, case.exchange_id), asynchronous=True)
        plain = cls(case.config(SECRETS[case.secret]))
        async with AsyncCitadelClient(served.url, api_key=KEYS["conductor"]) as client:
            adapted = async_exchange(cls, client, case.config(ciphertexts[case.secret]))
            assert isinstance(adapted, getattr(ccxt_async, case.exchange_id))
            try:
                for api, method, path in endpoints_of(case, plain):
                    freeze(plain)
                    freeze(adapted)
                    expected = await capture_async(plain, (api, method, path))
                    got = await capture_async(adapted, (api, method, path))
                    assert got == expected, (api, method, path)
            finally:
                await plain.close()
                await adapted.close()

    asyncio.run(main())


# -- the evervault provider: the same requests from ev: ciphertexts -----------------------------

EV_CASES = [
    c for c in CASES if c.name in {"binance-hmac", "binance-ed25519", "kraken", "coinbase-es256"}
]


@pytest.fixture(scope="module")
def ev_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from support import wait_until

    from evervault_emulator import EvervaultEmulator

    with EvervaultEmulator() as emu:
        settings = make_settings(
            tmp_path_factory.mktemp("ccxt-ev"),
            provider="evervault",
            evervault_app_id=emu.app_id,
            evervault_api_key=emu.api_key,
            evervault_api_url=emu.url,
            acl=ACL,
            rate_limit_per_caller="1000000/minute",
            rate_limit_per_user="1000000/minute",
        )
        with serve_citadel(settings) as s, s.client() as c:
            wait_until(lambda: c.get("/ready").status_code == 200)
            yield s


@pytest.mark.parametrize("case", EV_CASES, ids=[c.name for c in EV_CASES])
def test_evervault_ciphertexts_give_plain_ccxts_requests_sync_and_async(
    case: Case, ev_served: Served
) -> None:
    with CitadelClient(ev_served.url, api_key=KEYS["sentinel"]) as sentinel:
        secret_ct = sentinel.encrypt(SECRETS[case.secret])
    assert secret_ct.startswith("ev:")
    cls = capture_class(getattr(ccxt, case.exchange_id), asynchronous=False)
    plain = cls(case.config(SECRETS[case.secret]))
    with CitadelClient(ev_served.url, api_key=KEYS["conductor"]) as conductor:
        adapted = exchange(cls, conductor, case.config(secret_ct))
        for endpoint in endpoints_of(case, plain):
            freeze(plain)
            freeze(adapted)
            assert capture_sync(adapted, endpoint) == capture_sync(plain, endpoint)

    async def main() -> None:
        acls = capture_class(getattr(ccxt_async, case.exchange_id), asynchronous=True)
        aplain = acls(case.config(SECRETS[case.secret]))
        async with AsyncCitadelClient(ev_served.url, api_key=KEYS["conductor"]) as client:
            aadapted = async_exchange(acls, client, case.config(secret_ct))
            try:
                for endpoint in endpoints_of(case, aplain):
                    freeze(aplain)
                    freeze(aadapted)
                    want = await capture_async(aplain, endpoint)
                    assert await capture_async(aadapted, endpoint) == want
            finally:
                await aplain.close()
                await aadapted.close()

    asyncio.run(main())
