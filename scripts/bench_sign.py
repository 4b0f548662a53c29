"""Per-call cost of citadel.signing.sign(), and the share of it that is key parsing.

In-process, one core, no HTTP: it answers "would caching parsed keys matter?"
against the rest of a /sign request (a decrypt, the audit line, HTTP), which
costs far more. Prints microseconds per call for each algorithm: the whole
sign(), the key parsing alone, and the rest (signing and encoding). RSA rows
"cold" run cryptography's key check on every call, inline (a key the server has
no verdict on yet: the server runs that check in its key-check process, and the
last rows time that round trip); the others sign with a key already checked.

    .venv/bin/python scripts/bench_sign.py [--scale 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
import timeit
from collections.abc import Callable
from functools import partial

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from citadel import signing
from citadel.keycheck import RsaKeyChecker

MESSAGE = (
    b"symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.01&price=37500"
    b"&recvWindow=5000&timestamp=1700000000000"
)


def _pem(key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()).decode()


def cases() -> list[tuple[str, str, str, str, int]]:
    """(label, algorithm, key_encoding, secret, calls)."""
    ed = ed25519.Ed25519PrivateKey.generate()
    seed = ed.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    rsa2048 = _pem(rsa.generate_private_key(65537, 2048))
    rsa4096 = _pem(rsa.generate_private_key(65537, 4096))
    return [
        ("hmac-sha256 utf-8", "hmac-sha256", "utf-8", "k" * 64, 2000),
        ("hmac-sha512 base64", "hmac-sha512", "base64", base64.b64encode(b"k" * 64).decode(), 2000),
        ("ed25519 hex seed", "ed25519", "hex", seed.hex(), 2000),
        ("ed25519 pem", "ed25519", "pem", _pem(ed), 2000),
        (
            "ecdsa-p256 pem",
            "ecdsa-p256-sha256",
            "pem",
            _pem(ec.generate_private_key(ec.SECP256R1())),
            2000,
        ),
        ("rsa-2048 pem", "rsa-pkcs1v15-sha256", "pem", rsa2048, 200),
        ("rsa-2048 pem cold", "rsa-pkcs1v15-sha256", "pem", rsa2048, 20),
        ("rsa-4096 pem", "rsa-pkcs1v15-sha256", "pem", rsa4096, 200),
        ("rsa-4096 pem cold", "rsa-pkcs1v15-sha256", "pem", rsa4096, 4),
    ]


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    timer = timeit.Timer(fn)
    # Best of 3 runs: the least disturbed by the other processes sharing the machine.
    return min(timer.repeat(repeat=3, number=calls)) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the call counts")
    args = parser.parse_args()
    print(
        f"{'case':<20} {'calls':>6} {'sign() us':>10} {'parse us':>9} {'rest us':>8} {'parse %':>8}"
    )
    for label, algorithm, key_encoding, secret, calls in cases():
        n = max(1, int(calls * args.scale))
        cold = label.endswith("cold")
        prepare = partial(
            signing.prepare,
            algorithm,
            secret,
            key_encoding=key_encoding,
            signature_encoding="hex",
            rsa_checked=True,
        )

        def warm_sign(prepare: Callable[[], signing.PreparedKey] = prepare) -> str:
            return signing.sign_prepared(prepare(), MESSAGE, "hex")

        cold_sign = partial(
            signing.sign,
            algorithm,
            secret,
            MESSAGE,
            key_encoding=key_encoding,
            signature_encoding="hex",
        )
        whole = per_call_us(cold_sign if cold else warm_sign, n)
        parse = per_call_us(prepare, n)
        print(
            f"{label:<20} {n:>6} {whole:>10.1f} {parse:>9.1f} {whole - parse:>8.1f} "
            f"{100 * parse / whole:>7.0f}%"
        )
    asyncio.run(child_round_trips(cases(), args.scale))


async def child_round_trips(rows: list[tuple[str, str, str, str, int]], scale: float) -> None:
    """The server's way: the key check in the child process, timed from the event loop."""
    checker = RsaKeyChecker()
    try:
        for label, _, _, secret, calls in rows:
            if not label.endswith("cold"):
                continue
            n = max(1, int(calls * scale))
            await checker.passes(secret.encode())  # the child's start-up is not the check
            start = time.perf_counter()
            for _ in range(n):
                await checker.passes(secret.encode())
            us = (time.perf_counter() - start) / n * 1e6
            print(f"{label + ' in child':<27} {n:>6} {us:>10.1f} us per check, off the loop")
    finally:
        await checker.aclose()


if __name__ == "__main__":
    main()
