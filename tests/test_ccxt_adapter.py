"""citadel_client.ccxt's behaviours beyond byte equality: ACL, NotCovered, the event loop, ccxt's semantics.

Against a live Citadel on loopback (in-process uvicorn, real HTTP). Every
NotCovered test also checks that nothing was sent: the capture that stands for
the network was never reached.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Iterator
from typing import Any

import ccxt
import ccxt.async_support as ccxt_async
import ccxt.pro as ccxt_pro
import httpx
import pytest
from ccxt_oracle import SECRETS, Captured, capture_async, capture_class, capture_sync, freeze
from support import KEYS, Served, make_settings, serve_citadel

from citadel_client import AsyncCitadelClient, CitadelClient, Forbidden
from citadel_client.ccxt import NotCovered, async_exchange, exchange, learn_form, secret_form

ACL = {"sentinel": ["encrypt"], "conductor": ["sign"], "api-gateway": ["encrypt"], "alchemist": []}
CONFIG = {"apiKey": "test-api-key-0001", "enableRateLimit": False}
BINANCE_GET = (["private"], "GET", "account")
KUCOIN_GET = (["private"], "GET", "user-info")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = make_settings(
        tmp_path_factory.mktemp("ccxt-adapter"),
        acl=ACL,
        rate_limit_per_caller="1000000/minute",
        rate_limit_per_user="1000000/minute",
    )
    with serve_citadel(settings) as s:
        yield s


@pytest.fixture(scope="module")
def ct(served: Served) -> dict[str, str]:
    with CitadelClient(served.url, api_key=KEYS["sentinel"]) as sentinel:
        return {form: sentinel.encrypt(secret) for form, secret in SECRETS.items()}


class CountingTransport(httpx.BaseTransport):
    """Counts the /sign requests the client makes (the caller's rate-limit units)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.signs = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/sign":
            self.signs += 1
        return self.inner.handle_request(request)


class GatedTransport(httpx.AsyncBaseTransport):
    """Holds every /sign request until ``gate`` opens; counts those waiting."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.gate = asyncio.Event()
        self.waiting = 0
        self.signs = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/sign":
            self.signs += 1
            self.waiting += 1
            await self.gate.wait()
            self.waiting -= 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def sync_ex(exchange_id: str, client: CitadelClient, **config: Any) -> Any:
    return exchange(
        capture_class(getattr(ccxt, exchange_id), asynchronous=False), client, {**CONFIG, **config}
    )


# -- the caller and its ACL ---------------------------------------------------------------------


def test_a_caller_holding_only_sign_signs_binance_requests(
    served: Served, ct: dict[str, str]
) -> None:
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        ex = sync_ex("binance", conductor, secret=ct["text"])
        freeze(ex)
        url = capture_sync(ex, BINANCE_GET)[0]
    query, _, signature = url.partition("?")[2].rpartition("&signature=")
    expected = hmac.new(SECRETS["text"].encode(), query.encode(), "sha256").hexdigest()
    assert signature == expected


def test_a_caller_without_sign_is_forbidden_before_anything_is_sent(
    served: Served, ct: dict[str, str]
) -> None:
    with CitadelClient(served.url, api_key=KEYS["api-gateway"]) as gateway:
        ex = sync_ex("binance", gateway, secret=ct["text"])
        with pytest.raises(Forbidden):
            capture_sync(ex, BINANCE_GET)


def test_kucoin_makes_two_sign_calls_per_private_request_binance_one(
    served: Served, ct: dict[str, str]
) -> None:
    """KuCoin signs its passphrase with the secret too: size the rate limit for it."""
    transport = CountingTransport()
    with CitadelClient(served.url, api_key=KEYS["conductor"], transport=transport) as conductor:
        kucoin = sync_ex("kucoin", conductor, secret=ct["text"], password="kucoin-passphrase")
        binance = sync_ex("binance", conductor, secret=ct["text"])
        capture_sync(kucoin, KUCOIN_GET)  # learns the form (cached per client and ciphertext)
        capture_sync(binance, BINANCE_GET)
        before = transport.signs
        capture_sync(kucoin, KUCOIN_GET)
        after_kucoin = transport.signs
        capture_sync(binance, BINANCE_GET)
    assert (after_kucoin - before, transport.signs - after_kucoin) == (2, 1)


def test_the_form_is_learned_once_per_client_and_ciphertext(
    served: Served, ct: dict[str, str]
) -> None:
    transport = CountingTransport()
    with CitadelClient(served.url, api_key=KEYS["conductor"], transport=transport) as conductor:
        first = learn_form(conductor, ct["rsa-pem"])
        probes = transport.signs
        again = learn_form(conductor, ct["rsa-pem"])
    assert (first, again) == ("rsa-pem", "rsa-pem")
    assert probes >= 1 and transport.signs == probes


@pytest.mark.parametrize(
    "form,expected",
    [
        ("text", "base64"),  # 64 letters and digits: canonical base64 too, as ccxt would see it
        ("hex", "ed25519-hex"),  # 32 bytes in hex: also an Ed25519 seed
        ("rsa-pem", "rsa-pem"),
        ("ed25519-pem", "ed25519-pem"),
        ("ec-pem", "ec-pem"),
        ("ed25519-64", "ed25519-base64"),
    ],
)
def test_the_form_says_which_keys_the_secret_parses_as(
    served: Served, ct: dict[str, str], form: str, expected: str
) -> None:
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        assert learn_form(conductor, ct[form]) == expected


@pytest.mark.parametrize("form", sorted(SECRETS))
def test_secret_form_at_onboarding_agrees_with_what_citadel_says(
    served: Served, ct: dict[str, str], form: str
) -> None:
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        assert secret_form(SECRETS[form]) == learn_form(conductor, ct[form])


def test_a_form_given_at_onboarding_spares_the_trial_calls(
    served: Served, ct: dict[str, str]
) -> None:
    transport = CountingTransport()
    with CitadelClient(served.url, api_key=KEYS["conductor"], transport=transport) as conductor:
        ex = sync_ex("binance", conductor, secret=ct["ed25519-pem"], citadel_form="ed25519-pem")
        freeze(ex)
        request = ex.signed_request("account", ["private"], "GET", {})
    assert transport.signs == 1
    signature = request["url"].rpartition("&signature=")[2]
    assert signature  # verified byte for byte by the oracle tests; here: one /sign, no probes


def test_the_stand_in_holds_nothing_of_the_secret(served: Served, ct: dict[str, str]) -> None:
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        ex = sync_ex("binance", conductor, secret=ct["rsa-pem"])
        capture_sync(ex, BINANCE_GET)
    assert ex.secret != SECRETS["rsa-pem"] and ex.secret != ct["rsa-pem"]
    assert ex.secret.startswith("-----BEGIN PRIVATE KEY-----") and len(ex.secret) > 120
    body_lines = SECRETS["rsa-pem"].splitlines()[1:-1]
    assert not any(line in ex.secret for line in body_lines)


# -- NotCovered, each kind, nothing sent --------------------------------------------------------


def test_a_key_ccxt_derives_from_the_secret_is_not_covered(
    served: Served, ct: dict[str, str]
) -> None:
    """Coinone HMACs with the secret upper-cased: /sign cannot, so nothing is sent."""
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        ex = sync_ex("coinone", conductor, secret=ct["text"])
        with pytest.raises(NotCovered, match="neither a Citadel ciphertext"):
            capture_sync(ex, (["private"], "POST", "account/balance"))


def test_a_secret_sent_as_it_is_is_not_covered(served: Served, ct: dict[str, str]) -> None:
    """Luno sends apiKey:secret in HTTP Basic: Citadel never gives the secret out."""
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        ex = sync_ex("luno", conductor, secret=ct["text"])
        with pytest.raises(NotCovered, match="would encode"):
            capture_sync(ex, (["exchangePrivate"], "GET", "candles"))


def _md5_signing(base: type) -> type:
    class Md5Signing(base):  # type: ignore[misc,valid-type]
        def sign(
            self,
            path: str,
            api: Any = "public",
            method: str = "GET",
            params: Any = None,
            headers: Any = None,
            body: Any = None,
        ) -> Any:
            signature = self.hmac(self.encode(path), self.encode(self.secret), hashlib.md5)
            return {
                "url": "https://example.test/" + path + "?s=" + signature,
                "method": method,
                "headers": {},
                "body": None,
            }

    return Md5Signing


def test_a_scheme_sign_lacks_is_not_covered(served: Served, ct: dict[str, str]) -> None:
    """An HMAC-MD5 (no /sign algorithm) is refused before the request exists."""
    cls = _md5_signing(capture_class(ccxt.binance, asynchronous=False))
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        ex = exchange(cls, conductor, {**CONFIG, "secret": ct["text"]})
        with pytest.raises(NotCovered, match="HMAC hash that /sign does not offer"):
            ex.fetch2("x", ["private"], "GET", {})


def test_secp256k1_wallet_signing_is_not_covered(served: Served, ct: dict[str, str]) -> None:
    """A privateKey used for secp256k1 (a DEX's wallet signature) never reaches Citadel as a digest."""

    class WalletSigning(capture_class(ccxt.binance, asynchronous=False)):  # type: ignore[misc]
        def sign(
            self,
            path: str,
            api: Any = "public",
            method: str = "GET",
            params: Any = None,
            headers: Any = None,
            body: Any = None,
        ) -> Any:
            digest = self.hash(self.encode(path), "sha256")
            self.ecdsa(digest, self.privateKey, "secp256k1", None)
            raise AssertionError("unreachable")

    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        ex = exchange(
            WalletSigning, conductor, {**CONFIG, "secret": ct["text"], "privateKey": ct["hex"]}
        )
        with pytest.raises(NotCovered, match="ECDSA"):
            ex.fetch2("x", ["private"], "GET", {})


def test_a_real_dex_deriving_from_its_wallet_key_is_not_covered(
    served: Served, ct: dict[str, str]
) -> None:
    """Derive signs with keys computed from its privateKey: NotCovered, nothing sent."""
    ex_id = "derive"
    cls = capture_class(getattr(ccxt, ex_id), asynchronous=False)
    config = {
        **CONFIG,
        "secret": ct["text"],
        "privateKey": ct["hex"],
        "walletAddress": "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23",
    }
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        ex = exchange(cls, conductor, config)
        with pytest.raises(NotCovered):
            capture_sync(ex, ("fetch_balance", "", ""))


def test_a_websocket_authenticate_is_not_covered_and_nothing_is_sent(
    served: Served, ct: dict[str, str]
) -> None:
    async def main() -> None:
        async with AsyncCitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
            cls = capture_class(ccxt_pro.okx, asynchronous=True)
            ex = async_exchange(cls, conductor, {**CONFIG, "secret": ct["text"], "password": "p"})
            sent: list[Any] = []

            async def watch(*args: Any, **kwargs: Any) -> Any:
                sent.append(args)

            ex.watch = watch
            try:
                await capture_async(ex, (["private"], "GET", "rfq/counterparties"))  # REST works
                with pytest.raises(NotCovered, match="websocket"):
                    await ex.authenticate()
            finally:
                await ex.close()
            assert sent == []

    asyncio.run(main())


def _context_ciphertext(served: Served, context: dict[str, str]) -> str:
    from citadel_client import InvalidRequest

    with CitadelClient(served.url, api_key=KEYS["sentinel"]) as sentinel:
        try:
            return sentinel.encrypt(SECRETS["text"], context=context)
        except InvalidRequest:
            pytest.skip("this server does not take encryption contexts yet")


def test_citadel_context_is_sent_with_every_sign(served: Served) -> None:
    context = {"user_id": "8413", "exchange": "binance"}
    secret_ct = _context_ciphertext(served, context)
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        ex = sync_ex("binance", conductor, secret=secret_ct, citadel_context=context)
        url = capture_sync(ex, BINANCE_GET)[0]
    query, _, signature = url.partition("?")[2].rpartition("&signature=")
    assert signature == hmac.new(SECRETS["text"].encode(), query.encode(), "sha256").hexdigest()


def test_a_wrong_citadel_context_fails_before_anything_is_sent(served: Served) -> None:
    from citadel_client import InvalidCiphertext

    secret_ct = _context_ciphertext(served, {"user_id": "8413"})
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        ex = sync_ex("binance", conductor, secret=secret_ct, citadel_context={"user_id": "9999"})
        with pytest.raises(InvalidCiphertext):
            capture_sync(ex, BINANCE_GET)


# -- the async form: the loop, ccxt's throttle and retries ----------------------------------------


def test_the_event_loop_keeps_running_while_requests_wait_on_citadel(
    served: Served, ct: dict[str, str]
) -> None:
    """Eight requests held at Citadel's door; a ticker task keeps ticking meanwhile."""

    async def main() -> None:
        transport = GatedTransport()
        async with AsyncCitadelClient(
            served.url, api_key=KEYS["conductor"], transport=transport
        ) as conductor:
            cls = capture_class(ccxt_async.binance, asynchronous=True)
            ex = async_exchange(cls, conductor, {**CONFIG, "secret": ct["text"]})
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            tick_task = asyncio.create_task(ticker())
            requests = [asyncio.create_task(capture_async(ex, BINANCE_GET)) for _ in range(8)]
            try:
                async with asyncio.timeout(30):
                    while transport.waiting < 1:  # the form probes, then the requests
                        await asyncio.sleep(0)
                    transport.gate.set()
                    while not all(r.done() for r in requests):
                        await asyncio.sleep(0)
                    # Now hold the next round of signatures and watch the ticker run.
                    transport.gate.clear()
                    requests = [
                        asyncio.create_task(capture_async(ex, BINANCE_GET)) for _ in range(8)
                    ]
                    while transport.waiting < 8:
                        await asyncio.sleep(0)
                    ticks_while_waiting = ticks
                    for _ in range(100):
                        await asyncio.sleep(0)
                    assert ticks - ticks_while_waiting >= 50
                    assert not any(r.done() for r in requests)
                    transport.gate.set()
                    done = await asyncio.gather(*requests)
            finally:
                tick_task.cancel()
                await ex.close()
            assert len({d[0] for d in done}) >= 1 and all("signature=" in d[0] for d in done)

    asyncio.run(main())


def test_async_retries_sign_again_as_ccxt_does(served: Served, ct: dict[str, str]) -> None:
    """maxRetriesOnFailure: a failed request is signed afresh (a new nonce) and sent again."""

    async def main() -> tuple[int, list[str]]:
        transport = CountingAsyncTransport()
        urls: list[str] = []
        base = ccxt_async.binance

        class Flaky(base):  # type: ignore[misc,valid-type]
            async def fetch(
                self, url: str, method: str = "GET", headers: Any = None, body: Any = None
            ) -> Any:
                urls.append(url)
                if len(urls) == 1:
                    raise ccxt.RequestTimeout("first attempt times out")
                raise Captured(url, method, headers, body)

        async with AsyncCitadelClient(
            served.url, api_key=KEYS["conductor"], transport=transport
        ) as conductor:
            ex = async_exchange(
                Flaky,
                conductor,
                {**CONFIG, "secret": ct["text"], "options": {"maxRetriesOnFailure": 1}},
            )
            ticks = iter(range(1_700_000_000_000, 1_800_000_000_000, 1000))
            ex.milliseconds = lambda: next(ticks)
            try:
                with pytest.raises(Captured):
                    await ex.request("account", ["private"], "GET", {})
            finally:
                await ex.close()
        return transport.signs, urls

    _, urls = asyncio.run(main())
    assert len(urls) == 2 and urls[0] != urls[1]
    for url in urls:
        query, _, signature = url.partition("?")[2].rpartition("&signature=")
        assert signature == hmac.new(SECRETS["text"].encode(), query.encode(), "sha256").hexdigest()


class CountingAsyncTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.signs = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/sign":
            self.signs += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_async_throttle_is_ccxts_own(served: Served, ct: dict[str, str]) -> None:
    """With enableRateLimit, ccxt's throttle runs before each request is signed."""

    async def main() -> list[str]:
        order: list[str] = []
        async with AsyncCitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
            cls = capture_class(ccxt_async.binance, asynchronous=True)
            ex = async_exchange(
                cls, conductor, {**CONFIG, "enableRateLimit": True, "secret": ct["text"]}
            )
            original = ex.throttle

            async def throttle(cost: Any = None) -> Any:
                order.append("throttle")
                return await original(cost)

            ex.throttle = throttle
            try:
                for _ in range(2):
                    with pytest.raises(Captured):
                        await ex.request("account", ["private"], "GET", {})
                    order.append("sent")
            finally:
                await ex.close()
        return order

    assert asyncio.run(main()) == ["throttle", "sent", "throttle", "sent"]


# -- published examples -------------------------------------------------------------------------

# Binance's API documentation (SIGNED endpoint example).
BINANCE_DOC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
BINANCE_DOC_QUERY = (
    "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1"
    "&recvWindow=5000&timestamp=1499827319559"
)
BINANCE_DOC_SIGNATURE = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
# Kraken's REST authentication documentation.
KRAKEN_DOC_SECRET = (
    "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg=="
)
KRAKEN_DOC_NONCE = 1616492376594
KRAKEN_DOC_SIGNATURE = (
    "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ=="
)


def test_binance_published_example_signature_through_the_adapter(served: Served) -> None:
    with CitadelClient(served.url, api_key=KEYS["sentinel"]) as sentinel:
        secret_ct = sentinel.encrypt(BINANCE_DOC_SECRET)
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        ex = sync_ex("binance", conductor, secret=secret_ct)
        capture_sync(ex, BINANCE_GET)  # adopt the stand-in
        signature = ex.hmac(BINANCE_DOC_QUERY.encode(), ex.encode(ex.secret))
    assert signature == BINANCE_DOC_SIGNATURE


def test_kraken_published_example_signature_through_the_adapter(served: Served) -> None:
    with CitadelClient(served.url, api_key=KEYS["sentinel"]) as sentinel:
        secret_ct = sentinel.encrypt(KRAKEN_DOC_SECRET)
    cls = capture_class(ccxt.kraken, asynchronous=False)
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        ex = exchange(cls, conductor, {**CONFIG, "secret": secret_ct})
        ex.nonce = lambda: KRAKEN_DOC_NONCE
        params = {
            "ordertype": "limit",
            "pair": "XBTUSD",
            "price": "37500",
            "type": "buy",
            "volume": "1.25",
        }
        with pytest.raises(Captured) as info:
            ex.private_post_addorder(params)
    url, _, headers, body = info.value.request
    assert url.endswith("/0/private/AddOrder")
    assert (
        body
        == f"nonce={KRAKEN_DOC_NONCE}&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25"
    )
    assert headers["API-Sign"] == KRAKEN_DOC_SIGNATURE
    assert base64.b64decode(headers["API-Sign"])  # well-formed


def test_ccxts_classes_and_other_objects_keep_their_own_primitives(
    served: Served, ct: dict[str, str]
) -> None:
    """The primitives are replaced on the adapted instance alone, sync and async."""
    from ccxt.base.exchange import Exchange

    names = ("hmac", "rsa", "eddsa", "ecdsa", "jwt", "hash", "sign", "fetch")
    before = {n: (getattr(ccxt.binance, n), getattr(ccxt_async.binance, n)) for n in names}
    with CitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
        adapted = exchange("binance", conductor, {**CONFIG, "secret": ct["text"]})
        aadapted = async_exchange(
            "binance", AsyncCitadelClient(served.url, api_key="k"), {**CONFIG, "secret": ct["text"]}
        )
    after = {n: (getattr(ccxt.binance, n), getattr(ccxt_async.binance, n)) for n in names}
    assert before == after
    assert ccxt.binance.hmac is Exchange.hmac
    assert isinstance(adapted, ccxt.binance) and isinstance(aadapted, ccxt_async.binance)
    assert type(adapted) is not ccxt.binance and "hmac" in vars(adapted)
    plain = ccxt.binance({**CONFIG, "secret": SECRETS["text"]})
    assert "hmac" not in vars(plain)
    assert (
        plain.hmac(b"m", SECRETS["text"].encode())
        == hmac.new(SECRETS["text"].encode(), b"m", "sha256").hexdigest()
    )


# -- citadel_batch: concurrent requests' signatures in shared sign_many batches ----------------


def test_citadel_batch_sends_concurrent_signatures_in_fewer_requests_byte_for_byte(
    served: Served, ct: dict[str, str]
) -> None:
    async def main() -> tuple[int, list[Any], list[Any]]:
        transport = CountingAsyncTransport()
        cls = capture_class(ccxt_async.binance, asynchronous=True)
        plain = cls({**CONFIG, "secret": SECRETS["text"]})
        async with AsyncCitadelClient(
            served.url, api_key=KEYS["conductor"], transport=transport
        ) as conductor:
            ex = async_exchange(
                cls,
                conductor,
                {**CONFIG, "secret": ct["text"], "citadel_form": "base64", "citadel_batch": True},
            )
            try:
                got = await asyncio.gather(
                    *(capture_async(ex, (["private"], "GET", f"account{i}")) for i in range(16))
                )
                want = [
                    await capture_async(plain, (["private"], "GET", f"account{i}"))
                    for i in range(16)
                ]
            finally:
                await ex.close()
                await plain.close()
        return transport.signs, got, want

    signs, got, want = asyncio.run(main())
    assert got == want  # the frozen clock: the same nonces in both
    assert signs < 16


def test_citadel_batch_gives_each_request_its_own_item_error(
    served: Served, ct: dict[str, str]
) -> None:
    from citadel_client import InvalidCiphertext

    async def main() -> list[Any]:
        cls = capture_class(ccxt_async.binance, asynchronous=True)
        async with AsyncCitadelClient(served.url, api_key=KEYS["conductor"]) as conductor:
            good = async_exchange(
                cls,
                conductor,
                {**CONFIG, "secret": ct["text"], "citadel_form": "base64", "citadel_batch": True},
            )
            bad = async_exchange(
                cls,
                conductor,
                {
                    **CONFIG,
                    "secret": ct["text"][:-8] + "AAAAAAAA",
                    "citadel_form": "base64",
                    "citadel_batch": True,
                },
            )
            try:
                return await asyncio.gather(
                    *(capture_async(ex, BINANCE_GET) for ex in (good, bad, good)),
                    return_exceptions=True,
                )
            finally:
                await good.close()
                await bad.close()

    first, second, third = asyncio.run(main())
    assert isinstance(first, tuple) and isinstance(third, tuple)
    assert isinstance(second, InvalidCiphertext)


def test_concurrent_first_async_requests_share_one_set_of_probes(
    served: Served, ct: dict[str, str]
) -> None:
    async def main() -> int:
        transport = CountingAsyncTransport()
        cls = capture_class(ccxt_async.binance, asynchronous=True)
        async with AsyncCitadelClient(
            served.url, api_key=KEYS["conductor"], transport=transport
        ) as conductor:
            ex = async_exchange(cls, conductor, {**CONFIG, "secret": ct["ed25519-pem"]})
            try:
                await asyncio.gather(*(capture_async(ex, BINANCE_GET) for _ in range(10)))
            finally:
                await ex.close()
        return transport.signs

    # 7 probes at most, once, then one /sign per request.
    assert asyncio.run(main()) <= 7 + 10
