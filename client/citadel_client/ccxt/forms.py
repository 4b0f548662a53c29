"""The secret's form (PEM or not, base64, hex...), learned from Citadel, and its stand-in.

ccxt chooses its signing scheme from the form of ``secret``; the adapter gives
ccxt a stand-in of the same form that holds nothing of the secret.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Final

from citadel_client.client import AsyncCitadelClient, CitadelClient
from citadel_client.errors import InvalidKey

# -- the secret's form, learned from Citadel -------------------------------------------------------

# The fixed message of the trial signatures. Its signatures say nothing about the
# secret beyond whether it parses as each kind of key (anyone holding `sign` could
# ask for signatures of any message anyway).
PROBE_MESSAGE: Final = "citadel-client ccxt form probe"
# (form, algorithm, key_encoding), the most specific form first.
_PROBES: Final = (
    ("rsa-pem", "rsa-pkcs1v15-sha256", "pem"),
    ("ed25519-pem", "ed25519", "pem"),
    ("ec-pem", "ecdsa-p256-sha256", "pem"),
    ("ed25519-base64", "ed25519", "base64"),
    ("ed25519-hex", "ed25519", "hex"),
    ("hex", "hmac-sha256", "hex"),
    ("base64", "hmac-sha256", "base64"),
)
FORMS: Final = (*(form for form, _, _ in _PROBES), "text")

_FORM_CACHE: weakref.WeakKeyDictionary[object, dict[tuple[str, str], str]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_LOCK = threading.Lock()


def _cache_key(ciphertext: str, context: Mapping[str, str] | None) -> tuple[str, str]:
    return ciphertext, json.dumps(dict(context or {}), sort_keys=True)


def _form_of(answers: dict[str, bool]) -> str:
    """The form of a secret from which probes it passed (``text``: none but utf-8 HMAC)."""
    for form, _, _ in _PROBES:
        if answers.get(form):
            return form
    return "text"


def _sign_kwargs(context: Mapping[str, str] | None) -> dict[str, Any]:
    return {} if context is None else {"context": dict(context)}


def learn_form(
    client: CitadelClient, ciphertext: str, context: Mapping[str, str] | None = None
) -> str:
    """The form of the secret in ``ciphertext`` (one of :data:`FORMS`), by trial ``/sign`` calls.

    What it reveals to this process: which of the probed kinds of key the secret
    parses as (an RSA, Ed25519 or P-256 PEM, an Ed25519 key in base64 or hex, a
    hex or base64 string, or other text), nothing of its value or length.
    Cached per client and ciphertext.
    """
    key = _cache_key(ciphertext, context)
    with _CACHE_LOCK:
        cached = _FORM_CACHE.setdefault(client, {}).get(key)
    if cached is not None:
        return cached
    answers: dict[str, bool] = {}
    for form, algorithm, key_encoding in _PROBES:
        try:
            client.sign(
                ciphertext,
                PROBE_MESSAGE,
                algorithm=algorithm,  # type: ignore[arg-type]
                key_encoding=key_encoding,  # type: ignore[arg-type]
                **_sign_kwargs(context),
            )
        except InvalidKey:
            answers[form] = False
        else:
            answers[form] = True
            if form.endswith("-pem"):
                break  # the PEM forms exclude each other and every other form
    form = _form_of(answers)
    with _CACHE_LOCK:
        _FORM_CACHE.setdefault(client, {})[key] = form
    return form


async def learn_form_async(
    client: AsyncCitadelClient,
    ciphertext: str,
    context: Mapping[str, str] | None = None,
) -> str:
    """:func:`learn_form` with the async client (the probes run concurrently).

    Concurrent first requests for one ciphertext share one set of probes.
    """
    key = _cache_key(ciphertext, context)
    cached = _FORM_CACHE.setdefault(client, {}).get(key)
    if cached is not None:
        return cached
    inflight = _LEARNING.setdefault(client, {})
    task = inflight.get(key)
    if task is None:
        task = inflight[key] = asyncio.ensure_future(_probe_all(client, ciphertext, context))
        task.add_done_callback(lambda _: inflight.pop(key, None))
    form = await asyncio.shield(task)
    _FORM_CACHE.setdefault(client, {})[key] = form
    return form


_LEARNING: weakref.WeakKeyDictionary[object, dict[tuple[str, str], asyncio.Future[str]]] = (
    weakref.WeakKeyDictionary()
)


async def _probe_all(
    client: AsyncCitadelClient, ciphertext: str, context: Mapping[str, str] | None
) -> str:
    async def probe(algorithm: str, key_encoding: str) -> bool:
        try:
            await client.sign(
                ciphertext,
                PROBE_MESSAGE,
                algorithm=algorithm,  # type: ignore[arg-type]
                key_encoding=key_encoding,  # type: ignore[arg-type]
                **_sign_kwargs(context),
            )
        except InvalidKey:
            return False
        return True

    results = await asyncio.gather(*(probe(a, e) for _, a, e in _PROBES))
    return _form_of({f: ok for (f, _, _), ok in zip(_PROBES, results, strict=True)})


_HEX_PAIRS: Final = re.compile(r"(?:[0-9A-Fa-f]{2})+")


def _canonical_b64(text: str) -> bytes | None:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, ValueError):
        return None
    return raw if raw and base64.b64encode(raw) == text.encode("ascii") else None


def _ed25519_raw_ok(raw: bytes) -> bool:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if len(raw) == 32:
        return True
    if len(raw) != 64:
        return False
    public = Ed25519PrivateKey.from_private_bytes(raw[:32]).public_key()
    return public.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw) == raw[32:]


def secret_form(secret: str) -> str:
    """The form of a plaintext secret, as :func:`learn_form` would learn it from Citadel.

    For Sentinel at onboarding, which holds the plaintext then: stored beside
    the ciphertext and passed as ``citadel_form``, it spares Conductor the
    trial ``/sign`` calls (and their ``invalid_key`` audit lines). Needs
    cryptography, which the ``ccxt`` extra brings.
    """
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if "-----BEGIN" in secret:
        try:
            key = load_pem_private_key(
                secret.encode("utf-8", "replace"),
                None,
                unsafe_skip_rsa_key_validation=True,
            )
        except (TypeError, ValueError, Exception):
            return "text"
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size in (2048, 3072, 4096):
            return "rsa-pem"
        if isinstance(key, Ed25519PrivateKey):
            return "ed25519-pem"
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            return "ec-pem"
        return "text"
    raw64 = _canonical_b64(secret)
    is_hex = _HEX_PAIRS.fullmatch(secret) is not None
    if raw64 is not None and _ed25519_raw_ok(raw64):
        return "ed25519-base64"
    if is_hex and _ed25519_raw_ok(bytes.fromhex(secret)):
        return "ed25519-hex"
    if is_hex:
        return "hex"
    if raw64 is not None:
        return "base64"
    return "text"


def _stand_in(form: str) -> str:
    """A string of ``form`` that holds nothing of any secret (random, fresh per object).

    Its shape follows what ccxt tests: PEMs carry their label and a length on
    the right side of Binance's 120-character line between Ed25519 and RSA;
    an Ed25519 key in base64 is 88 characters (Coinbase's test); a base64 HMAC
    secret has no padding (so Coinbase does not take it for an Ed25519 key).
    The PEM bodies are not base64 DER, so nothing can ever load them as a key.
    """
    token = os.urandom(16).hex()
    if form == "rsa-pem":
        body = "\n".join(["CITADELSTANDIN" + token] * 26)
        return f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"
    if form == "ed25519-pem":
        return (
            f"-----BEGIN PRIVATE KEY-----\nCITADELSTANDIN{token[:32]}\n-----END PRIVATE KEY-----\n"
        )
    if form == "ec-pem":
        body = "\n".join(["CITADELSTANDIN" + token] * 4)
        return f"-----BEGIN EC PRIVATE KEY-----\n{body}\n-----END EC PRIVATE KEY-----\n"
    if form == "ed25519-base64":
        return base64.b64encode(os.urandom(64)).decode("ascii")
    if form == "ed25519-hex":
        return os.urandom(64).hex()
    if form == "hex":
        # 33 bytes: 66 hex digits, not a multiple of 4, so not base64 as well.
        return os.urandom(33).hex()
    if form == "base64":
        return base64.b64encode(os.urandom(30)).decode("ascii")
    return "citadel-stand-in-" + token
