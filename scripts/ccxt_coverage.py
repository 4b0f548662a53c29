"""Which ccxt exchanges citadel_client.ccxt covers, found by running ccxt itself.

For every exchange id of the installed ccxt, and every form an exchange secret
comes in (text, hex, base64, an RSA, Ed25519 or P-256 PEM, a 64-byte Ed25519
key in base64), it builds a plain ccxt object with a made-up plaintext and an
adapted one with a stand-in ciphertext (signed here by citadel.signing, the
code /sign runs, so no server is needed), freezes both clocks and random ids,
captures the first private GET and POST requests each builds (or, without
such endpoints, fetch_balance's), sync and async, and compares them byte for
byte. An exchange is covered for a form when every request plain ccxt could
build matched, sync and async; otherwise the table gives the reason.

    .venv/bin/python scripts/ccxt_coverage.py          # rewrites docs/ccxt.md's table and tests/data/ccxt_coverage.json
    .venv/bin/python scripts/ccxt_coverage.py --check  # exit 1 when they are out of date

The tests (tests/test_ccxt_covered.py) read tests/data/ccxt_coverage.json and
repeat the comparison for every covered exchange against a live Citadel.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import ccxt
import ccxt.async_support as ccxt_async
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from citadel import signing
from citadel_client.ccxt import PROBE_MESSAGE, NotCovered, async_exchange, exchange

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ccxt.md"
DATA = ROOT / "tests" / "data" / "ccxt_coverage.json"
BEGIN = "<!-- ccxt-coverage:begin (scripts/ccxt_coverage.py writes this table) -->"
END = "<!-- ccxt-coverage:end -->"

FROZEN_MS = 1_764_633_600_123
HTTP_METHODS = {"get", "post", "put", "delete", "patch"}
PARAMS = {"symbol": "BTCUSDT", "limit": 5, "note": "a b&c=d/é"}


# -- made-up secrets of every form, fixed so that the survey is reproducible -----------------------


def _pem(key: Any, fmt: ser.PrivateFormat = ser.PrivateFormat.PKCS8) -> str:
    text: str = key.private_bytes(ser.Encoding.PEM, fmt, ser.NoEncryption()).decode()
    return text


def make_secrets() -> dict[str, str]:
    """One made-up secret per form (never a real one); the RSA key is fresh each run."""
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    ed_raw = ed.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    ed_pub = ed.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    p256 = ec.derive_private_key(
        0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721, ec.SECP256R1()
    )
    return {
        "text": "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
        "hex": "6b2f6a1d9e0c4b3a8f7e6d5c4b3a29180716f5e4d3c2b1a09f8e7d6c5b4a3928",
        "base64": base64.b64encode(bytes(range(7, 71))).decode(),
        "rsa-pem": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "ed25519-pem": _pem(ed),
        "ec-pem": _pem(p256, ser.PrivateFormat.TraditionalOpenSSL),
        "ed25519-64": base64.b64encode(ed_raw + ed_pub).decode(),
    }


# A secp256k1 wallet key (DEXes' privateKey) and other credentials ccxt asks for.
WALLET_KEY = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
DUMMIES = {
    "apiKey": "test-api-key-0001",
    "uid": "123456",
    "login": "test-login",
    "password": "test-passphrase",
    "twofa": None,
    "walletAddress": "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23",
    "accountId": "123456",
    "token": "test-token",
}


def credentials(ex_class: type, form: str, secret: str, private_key: str) -> dict[str, Any]:
    """ccxt's config for ``ex_class`` with made-up credentials of every kind it requires."""
    required = getattr(ex_class(), "requiredCredentials", {})
    # No throttling: the survey sends nothing, and ccxt's throttle would sleep.
    config: dict[str, Any] = {
        "apiKey": DUMMIES["apiKey"],
        "secret": secret,
        "enableRateLimit": False,
    }
    for name, needed in required.items():
        if needed and name not in ("secret", "privateKey") and DUMMIES.get(name):
            config[name] = DUMMIES[name]
        if needed and name == "privateKey":
            config["privateKey"] = private_key
    if ex_class.__name__ == "gemini":
        config["apiKey"] = "account-test-0001"  # ccxt refuses Gemini master keys
    if ex_class.__name__ == "coinbase" and form == "ec-pem":
        config["apiKey"] = "organizations/o1/apiKeys/k1"
    return config


# -- frozen clocks, captured requests, private endpoints -----------------------------------------


class Captured(Exception):
    """Raised by the capture in place of sending: carries the request, byte for byte."""

    def __init__(self, url: str, method: str, headers: Any, body: Any) -> None:
        super().__init__("captured")
        self.request = (url, method, dict(headers or {}), body)


def _count(ex: Any) -> int:
    counter = ex.__dict__.get("_frozen_ids")
    if counter is None:
        counter = ex.__dict__["_frozen_ids"] = itertools.count(1)
    return next(counter)


# A frozen clock and a fixed sequence of random ids, as methods of the capture class:
# below the adapter's own subclass, so that the adapter sees (and records) them as it
# would see ccxt's.
FROZEN: dict[str, Any] = {
    "milliseconds": lambda self: FROZEN_MS,
    "seconds": lambda self: FROZEN_MS // 1000,
    "microseconds": lambda self: FROZEN_MS * 1000,
    "uuid": lambda self: f"00000000-0000-4000-8000-{_count(self):012d}",
    "uuid16": lambda self, length=16: f"{_count(self):016d}"[:length],
    "uuid22": lambda self, length=22: f"{_count(self):022d}"[:length],
    "random_bytes": lambda self, length: f"{_count(self):x}".rjust(length * 2, "0"),
    "rand_number": lambda self, size: int(f"{_count(self)}".rjust(size, "1")[:size]),
}


def capture_class(base: type, *, asynchronous: bool) -> type:
    """A subclass of ccxt's ``base`` with a frozen clock whose ``fetch`` raises :class:`Captured`."""
    if asynchronous:

        async def afetch(
            self: Any, url: str, method: str = "GET", headers: Any = None, body: Any = None
        ) -> Any:
            raise Captured(url, method, headers, body)

        return type(base.__name__, (base,), {"fetch": afetch, **FROZEN})

    def fetch(
        self: Any, url: str, method: str = "GET", headers: Any = None, body: Any = None
    ) -> Any:
        raise Captured(url, method, headers, body)

    return type(base.__name__, (base,), {"fetch": fetch, **FROZEN})


def freeze(ex: Any) -> None:
    """Restart the sequence of random ids (the clock is always frozen)."""
    ex.__dict__["_frozen_ids"] = itertools.count(1)


def private_endpoints(ex: Any) -> list[tuple[Any, str, str]]:
    """(api, method, path) of the first parameter-free private GET and POST endpoints."""
    found: dict[str, tuple[Any, str, str]] = {}

    def walk(node: Any, trail: list[str]) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key.lower() in HTTP_METHODS and isinstance(value, dict | list):
                if not any("private" in t.lower() for t in trail) or key.upper() in found:
                    continue
                for path in value if isinstance(value, list) else list(value):
                    if "{" not in path:
                        found[key.upper()] = (list(trail), key.upper(), path)
                        break
            else:
                walk(value, [*trail, key])

    walk(ex.api, [])
    return [found[m] for m in ("GET", "POST") if m in found]


BALANCE = ("fetch_balance", "", "")  # the fallback "endpoint": ccxt's unified fetch_balance


def endpoints(ex: Any) -> list[tuple[Any, str, str]]:
    return private_endpoints(ex) or [BALANCE]


def _no_markets(ex: Any, asynchronous: bool) -> None:
    if asynchronous:

        async def aload(*_: Any, **__: Any) -> dict[str, Any]:
            return {}

        ex.load_markets = aload
    else:
        ex.load_markets = lambda *_, **__: {}


def capture_sync(ex: Any, endpoint: tuple[Any, str, str]) -> tuple[Any, ...]:
    """The request ``ex`` would send for ``endpoint``; raises whatever else ccxt raises."""
    api, method, path = endpoint
    try:
        if endpoint == BALANCE:
            _no_markets(ex, False)
            ex.fetch_balance()
        else:
            ex.request(path, api, method, dict(PARAMS))
    except Captured as got:
        return got.request
    raise RuntimeError("no request was made")


async def capture_async(ex: Any, endpoint: tuple[Any, str, str]) -> tuple[Any, ...]:
    api, method, path = endpoint
    try:
        if endpoint == BALANCE:
            _no_markets(ex, True)
            await ex.fetch_balance()
        else:
            await ex.request(path, api, method, dict(PARAMS))
    except Captured as got:
        return got.request
    raise RuntimeError("no request was made")


# -- the survey's stand-in for Citadel: citadel.signing over ciphertexts it knows ----------------


class LocalSigner:
    """Answers the adapter's sign() calls as /sign would, for ``ct:<form>`` ciphertexts."""

    def __init__(self, plaintexts: dict[str, str]) -> None:
        self.plaintexts = plaintexts
        self.algorithms: set[str] = set()  # of the requests signed (the form probes aside)

    def sign(self, encrypted_data: str, message: str, **kw: Any) -> str:
        if message != PROBE_MESSAGE:
            self.algorithms.add(kw["algorithm"])
        return signing.sign(
            kw["algorithm"],
            self.plaintexts[encrypted_data],
            signing.decode_message(message, kw.get("message_encoding", "utf-8")),
            key_encoding=kw.get("key_encoding") or signing.ALGORITHMS[kw["algorithm"]][0],
            signature_encoding=kw.get("signature_encoding", "hex"),
        )


class AsyncLocalSigner(LocalSigner):
    async def sign(self, encrypted_data: str, message: str, **kw: Any) -> str:  # type: ignore[override]
        return LocalSigner.sign(self, encrypted_data, message, **kw)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NotCovered):
        return exc.detail
    return f"ccxt raises {type(exc).__name__}"


def survey_one(exchange_id: str, secrets: dict[str, str]) -> dict[str, Any]:
    """The verdict on one exchange: the forms it signs through Citadel with, and why not others."""
    sync_cls = capture_class(getattr(ccxt, exchange_id), asynchronous=False)
    async_cls = capture_class(getattr(ccxt_async, exchange_id), asynchronous=True)
    plaintexts = {f"ct:{form}": value for form, value in secrets.items()}
    plaintexts["ct:wallet"] = WALLET_KEY
    covered: list[str] = []
    algorithms: set[str] = set()
    reasons: dict[str, str] = {}
    unsigned = 0
    for form, secret in secrets.items():
        plain_conf = credentials(sync_cls, form, secret, WALLET_KEY)
        adapted_conf = credentials(sync_cls, form, f"ct:{form}", "ct:wallet")
        signer = LocalSigner(plaintexts)
        try:
            verdict = _compare(sync_cls, async_cls, plain_conf, adapted_conf, signer)
        except _PlainFails:
            continue
        if verdict is not None:
            reasons[form] = verdict
        elif not signer.algorithms:
            unsigned += 1
        else:
            covered.append(form)
            algorithms |= signer.algorithms
    if not covered and not reasons:
        reasons["*"] = (
            "plain ccxt builds no private REST request signed with the secret "
            "from made-up credentials (its requests sign with a wallet key or not at all)"
            if unsigned
            else "plain ccxt builds no private REST request from made-up credentials"
        )
    return {
        "status": "covered" if covered else "not covered",
        "forms": covered,
        "algorithms": sorted(algorithms),
        "reasons": {} if covered else reasons,
    }


class _PlainFails(Exception):
    """Plain ccxt itself cannot build the request with this form (so it is no test of the adapter)."""


def _compare(
    sync_cls: type,
    async_cls: type,
    plain_conf: dict[str, Any],
    adapted_conf: dict[str, Any],
    signer: LocalSigner,
) -> str | None:
    """None when the adapter's requests equal plain ccxt's, sync and async; else why not."""
    plain = sync_cls(plain_conf)
    expected: list[tuple[Any, ...]] = []
    built: list[tuple[Any, str, str]] = []
    for ep in endpoints(plain):
        freeze(plain)
        try:
            expected.append(capture_sync(plain, ep))
            built.append(ep)
        except Exception:  # plain ccxt cannot build it (missing parameter, unsupported form)
            continue
    if not built:
        raise _PlainFails()
    adapted = exchange(sync_cls, signer, adapted_conf)  # type: ignore[arg-type]
    for ep, want in zip(built, expected, strict=True):
        freeze(adapted)
        try:
            got = capture_sync(adapted, ep)
        except Exception as exc:
            return _reason(exc)
        if got != want:
            return "the request differs from plain ccxt's"
    async_signer = AsyncLocalSigner(signer.plaintexts)
    verdict = asyncio.run(_compare_async(async_cls, plain_conf, adapted_conf, async_signer, built))
    signer.algorithms |= async_signer.algorithms
    return verdict


async def _compare_async(
    async_cls: type,
    plain_conf: dict[str, Any],
    adapted_conf: dict[str, Any],
    signer: AsyncLocalSigner,
    built: list[tuple[Any, str, str]],
) -> str | None:
    plain = async_cls(plain_conf)
    adapted = async_exchange(async_cls, signer, adapted_conf)  # type: ignore[arg-type]
    try:
        for ep in built:
            freeze(plain)
            freeze(adapted)
            want = await capture_async(plain, ep)
            try:
                got = await capture_async(adapted, ep)
            except Exception as exc:
                return "async: " + _reason(exc)
            if got != want:
                return "async: the request differs from plain ccxt's"
    finally:
        await plain.close()
        await adapted.close()
    return None


def survey() -> dict[str, Any]:
    """The verdict on every exchange id of the installed ccxt."""
    secrets = make_secrets()
    return {
        "ccxt": ccxt.__version__,
        "exchanges": {
            exchange_id: survey_one(exchange_id, secrets) for exchange_id in ccxt.exchanges
        },
    }


# -- the outputs -----------------------------------------------------------------------------------

FORM_NAMES = {
    "text": "HMAC (text secret)",
    "hex": "HMAC (hex secret)",
    "base64": "HMAC (base64 secret)",
    "rsa-pem": "RSA PEM",
    "ed25519-pem": "Ed25519 PEM",
    "ec-pem": "ES256 (P-256 PEM)",
    "ed25519-64": "Ed25519 (64 bytes, base64)",
}


def _main_reasons(reasons: dict[str, str]) -> list[str]:
    """The reasons to show: NotCovered's own where there are any (other forms merely differ)."""
    every = sorted(set(reasons.values()))
    vague = ("the request differs", "async: the request differs", "ccxt raises")
    specific = [r for r in every if not r.startswith(vague)]
    return specific or every


def table(result: dict[str, Any]) -> str:
    exchanges = result["exchanges"]
    covered = sum(v["status"] == "covered" for v in exchanges.values())
    rows = [
        f"ccxt {result['ccxt']}: **{covered} of {len(exchanges)}** exchanges covered.",
        "",
        "| exchange | covered | secret forms tested | Citadel algorithms | why not |",
        "| --- | --- | --- | --- | --- |",
    ]
    for exchange_id, v in exchanges.items():
        forms = ", ".join(FORM_NAMES[f] for f in v["forms"]) or "—"
        algorithms = ", ".join(f"`{a}`" for a in v["algorithms"]) or "—"
        why = "; ".join(_main_reasons(v["reasons"]))
        mark = "yes" if v["status"] == "covered" else "no"
        rows.append(f"| `{exchange_id}` | {mark} | {forms} | {algorithms} | {why} |")
    return "\n".join(rows)


def render_doc(doc: str, result: dict[str, Any]) -> str:
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table(result)}\n{END}{tail}"


def data(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the table is out of date")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    result = survey()
    doc = render_doc(DOC.read_text(encoding="utf-8"), result)
    if args.check:
        ok = DOC.read_text(encoding="utf-8") == doc and DATA.read_text(encoding="utf-8") == data(
            result
        )
        print("up to date" if ok else "out of date: run scripts/ccxt_coverage.py")
        return 0 if ok else 1
    DOC.write_text(doc, encoding="utf-8")
    DATA.write_text(data(result), encoding="utf-8")
    covered = sum(v["status"] == "covered" for v in result["exchanges"].values())
    print(f"ccxt {result['ccxt']}: {covered} of {len(result['exchanges'])} exchanges covered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
