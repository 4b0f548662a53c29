"""Signing with an exchange secret: the cryptographic core of ``POST /sign``.

No HTTP: the caller (the service layer) decrypts the secret for one request,
prepares the key (:func:`prepare`: cheap, always on the caller's thread),
has an RSA key that was never checked put through the full key check, signs
(:func:`sign_prepared`) and drops the secret. A key is parsed on every call and
never cached, so no parsed key outlives its request
(``scripts/bench_sign.py`` measures what parsing costs per call). This module
keeps no state: what is remembered between requests (which ciphertexts hold
checked or refused keys) is the service's, by keyed fingerprints of ciphertexts.

No step here can take long: a PEM is always loaded without cryptography's RSA
key check, an RSA key of a size exchanges do not issue is refused before
anything else, and the check itself (tens to hundreds of milliseconds, with
the GIL held) is :func:`citadel.keycheck.rsa_key_passes`, which the service
runs in a child process. :func:`sign` does all of it inline, for tools and tests.

Errors carry fixed text only. Nothing from the secret, the message or the
signature is ever put in an exception, and :class:`~citadel.errors.InvalidKey`
is raised outside any ``except`` block, so it has no ``__context__``: no chained
cryptography exception (nor the frames and locals it holds) travels with it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from citadel.errors import InvalidKey, InvalidRequest

__all__ = [
    "ALGORITHMS",
    "MESSAGE_ENCODINGS",
    "RSA_KEY_BITS",
    "RSA_KEY_CHECK_FAILED",
    "SIGNATURE_ENCODINGS",
    "PreparedKey",
    "decode_message",
    "prepare",
    "sign",
    "sign_prepared",
]

# Algorithm -> the key encodings it takes, the default first (the contract's table).
ALGORITHMS: Final[dict[str, tuple[str, ...]]] = {
    "hmac-sha256": ("utf-8", "base64", "hex"),
    "hmac-sha384": ("utf-8", "base64", "hex"),
    "hmac-sha512": ("utf-8", "base64", "hex"),
    "ed25519": ("pem", "base64", "hex"),
    "rsa-pkcs1v15-sha256": ("pem",),
    "ecdsa-p256-sha256": ("pem",),
}
MESSAGE_ENCODINGS: Final[tuple[str, ...]] = ("utf-8", "base64")
SIGNATURE_ENCODINGS: Final[tuple[str, ...]] = ("hex", "base64", "base64url")

# hashlib names, as hmac.digest takes them (its one-shot C path, no HMAC object).
_HMAC_DIGESTS: Final = {
    "hmac-sha256": "sha256",
    "hmac-sha384": "sha384",
    "hmac-sha512": "sha512",
}
# The RSA sizes exchanges issue or accept (Binance takes 2048 and 4096). Anything
# else is refused before the key check, whose cost grows with the cube of the size.
RSA_KEY_BITS: Final = frozenset({2048, 3072, 4096})
_ED25519_SEED_BYTES: Final = 32
# Coinbase issues Ed25519 keys as 64 bytes: the seed, then the public key it gives.
_ED25519_KEYPAIR_BYTES: Final = 64
_P256_COORDINATE_BYTES: Final = 32
_P256_ORDER: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# RFC 6979: the nonce derived from the key and the message, so one key and one message
# always give one signature (the one ccxt computes) and no random source is trusted.
_ES256: Final = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)

# Fixed details of InvalidKey. They say what kind of thing the secret is (enough for
# an operator to fix the stored key), never any of its content.
_NOT_A_KEY: Final = InvalidKey.default_detail
_ENCRYPTED_PEM: Final = (
    "The decrypted secret is a passphrase-protected PEM; store the private key unencrypted "
    "(Citadel encrypts it)."
)
_PUBLIC_PEM: Final = (
    "The decrypted secret is a public key or certificate; signing needs the private key."
)
_OTHER_KEY_TYPE: Final = (
    "The decrypted secret is a private key of another type or curve than the algorithm needs."
)
_KEYPAIR_MISMATCH: Final = (
    "The decrypted secret is 64 bytes whose second half is not the public key of its first "
    "half; an Ed25519 key of 64 bytes is the seed then its own public key."
)
_EMPTY_KEY: Final = "The decrypted secret is empty after decoding; an HMAC key must not be empty."
_RSA_SIZE: Final = (
    "The decrypted secret is an RSA key of a size Citadel does not sign with "
    "(2048, 3072 or 4096 bits)."
)
RSA_KEY_CHECK_FAILED: Final = (
    "The decrypted secret is an RSA key that fails the key check (its primes or CRT values "
    "are inconsistent); generate the key again."
)

# PEM labels that are a public half, never a signing key.
_PUBLIC_LABEL: Final = re.compile(rb"-----BEGIN (?:[A-Z0-9 ]* )?(?:PUBLIC KEY|CERTIFICATE)-----")
_HEX: Final = re.compile(r"(?:[0-9A-Fa-f]{2})+")

_PrivateKey = Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_Key = bytes | _PrivateKey


class _Refused(Exception):
    """The secret is not a key: carries one of the fixed details above, nothing else."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def decode_message(message: str, encoding: str) -> bytes:
    """The bytes to sign: ``message`` per ``message_encoding`` (``utf-8`` or ``base64``).

    ``base64`` is the standard alphabet with exactly the padding an encoder
    writes (canonical, RFC 4648 section 3.5): a character outside the alphabet,
    whitespace, a missing or extra pad, or stray low bits is
    :class:`InvalidRequest`, never silently dropped, since a signature over other
    bytes than the caller meant would fail at the exchange with nothing to say
    why. The size limit is the caller's to enforce.
    """
    if encoding == "utf-8":
        try:
            # A JSON string may hold a lone surrogate (e.g. "\\ud800"), which has no UTF-8.
            return message.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest("The field message is not valid Unicode text.") from None
    if encoding == "base64":
        decoded = _strict_b64decode(message)
        if decoded is None:
            raise InvalidRequest("The field message is not canonical standard base64.")
        return decoded
    raise InvalidRequest()


@dataclass(slots=True)  # one per /sign: not frozen, which costs three times as much to build
class PreparedKey:
    """A parsed key for one request; ``unchecked_pem`` is an RSA PEM not yet through the check."""

    algorithm: str
    key: _Key
    unchecked_pem: bytes | None = None


def prepare(
    algorithm: str,
    secret: str,
    *,
    key_encoding: str,
    signature_encoding: str,
    rsa_checked: bool = False,
) -> PreparedKey:
    """The key ``secret`` holds for ``algorithm`` per ``key_encoding``; cheap, whatever the secret.

    A name outside the contract's tables (an encoding the algorithm does not
    take included) is :class:`InvalidRequest`; a secret that is not such a key
    is :class:`InvalidKey`. An RSA key comes back with its PEM in
    ``unchecked_pem`` unless ``rsa_checked`` says this secret passed the check
    before: sign with it only once :func:`citadel.keycheck.rsa_key_passes` said so.
    """
    if (
        key_encoding not in ALGORITHMS.get(algorithm, ())
        or signature_encoding not in SIGNATURE_ENCODINGS
    ):
        raise InvalidRequest()
    refused: str | None = None
    try:
        prepared = _parse_key(algorithm, secret, key_encoding, rsa_checked)
    except _Refused as exc:
        refused = exc.detail
    if refused is not None:
        # Raised here, outside the handler, so the error has no __context__; and the
        # secret is dropped from this frame, which the error's traceback keeps alive.
        del secret
        raise InvalidKey(refused)
    return prepared


def sign_prepared(prepared: PreparedKey, message: bytes, signature_encoding: str) -> str:
    """The signature of ``message`` in ``signature_encoding`` (hex, base64, unpadded base64url)."""
    return _encode(_sign_with(prepared.algorithm, prepared.key, message), signature_encoding)


def sign(
    algorithm: str, secret: str, message: bytes, *, key_encoding: str, signature_encoding: str
) -> str:
    """Prepare, check (inline: slow for an RSA key) and sign, on the caller's thread.

    For tools and tests; the server runs the RSA check in a child process instead.
    """
    from citadel.keycheck import rsa_key_passes

    refused: str | None = None
    try:
        prepared = prepare(
            algorithm, secret, key_encoding=key_encoding, signature_encoding=signature_encoding
        )
    except InvalidKey as err:
        refused = err.detail
    del secret  # this frame would travel with the error's traceback
    if refused is not None:
        raise InvalidKey(refused)
    if prepared.unchecked_pem is not None and not rsa_key_passes(prepared.unchecked_pem):
        raise InvalidKey(RSA_KEY_CHECK_FAILED)
    return sign_prepared(prepared, message, signature_encoding)


def _strict_b64decode(text: str) -> bytes | None:
    """Canonical standard base64, or None.

    ``b64decode(validate=True)`` alone still takes extra ``=`` and non-zero
    unused bits, so two different strings would decode to the same bytes; the
    round trip refuses both.
    """
    try:
        decoded = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        return None
    return decoded if base64.b64encode(decoded) == text.encode("ascii") else None


# -- keys -----------------------------------------------------------------------------------------


def _parse_key(algorithm: str, secret: str, key_encoding: str, rsa_checked: bool) -> PreparedKey:
    """The key ``secret`` holds for ``algorithm``; raises :class:`_Refused` when it holds none."""
    if algorithm in _HMAC_DIGESTS:
        raw = _decode_bytes(secret, key_encoding)
        if not raw:
            # HMAC takes an empty key, but then anyone can forge the signature. No
            # exchange issues an empty secret, so an empty one is a stored mistake.
            raise _Refused(_EMPTY_KEY)
        return PreparedKey(algorithm, raw)
    if algorithm == "ed25519" and key_encoding != "pem":
        return PreparedKey(algorithm, _ed25519_raw(_decode_bytes(secret, key_encoding)))
    data = secret.encode("utf-8", "replace")
    key = _load_pem(data)
    if algorithm == "ed25519" and isinstance(key, Ed25519PrivateKey):
        return PreparedKey(algorithm, key)
    if algorithm == "rsa-pkcs1v15-sha256" and isinstance(key, rsa.RSAPrivateKey):
        if key.key_size not in RSA_KEY_BITS:
            raise _Refused(_RSA_SIZE)
        return PreparedKey(algorithm, key, None if rsa_checked else data)
    if (
        algorithm == "ecdsa-p256-sha256"
        and isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return PreparedKey(algorithm, key)
    # An RSA key for ed25519, a P-384 or secp256k1 key for ecdsa-p256, an Ed448 key, ...
    raise _Refused(_OTHER_KEY_TYPE)


def _ed25519_raw(raw: bytes) -> Ed25519PrivateKey:
    """The key of a 32-byte seed, or of 64 bytes (seed then public key) whose halves agree.

    A public half that is not the seed's would sign under another identity than
    the exchange registered, so it is refused rather than ignored.
    """
    if len(raw) not in (_ED25519_SEED_BYTES, _ED25519_KEYPAIR_BYTES):
        raise _Refused(_NOT_A_KEY)
    key = Ed25519PrivateKey.from_private_bytes(raw[:_ED25519_SEED_BYTES])
    if len(raw) == _ED25519_KEYPAIR_BYTES:
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if not hmac.compare_digest(public, raw[_ED25519_SEED_BYTES:]):
            raise _Refused(_KEYPAIR_MISMATCH)
    return key


def _decode_bytes(secret: str, key_encoding: str) -> bytes:
    if key_encoding == "utf-8":
        try:
            return secret.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused(_NOT_A_KEY) from None
    if key_encoding == "hex":
        # Strict: pairs of hex digits only. bytes.fromhex would skip spaces, which a
        # stored secret never legitimately has.
        if not _HEX.fullmatch(secret):
            raise _Refused(_NOT_A_KEY)
        return bytes.fromhex(secret)
    if key_encoding == "base64":
        decoded = _strict_b64decode(secret)
        if decoded is None:
            raise _Refused(_NOT_A_KEY)
        return decoded
    raise AssertionError("unreachable: sign() checked the key encoding")  # pragma: no cover


def _load_pem(data: bytes) -> PrivateKeyTypes:
    """The private key of a PEM (PKCS#8, PKCS#1 or SEC 1), unencrypted, never RSA-checked here.

    Without the check, loading is parsing only (microseconds, whatever the
    key): an RSA key is checked later, and only when it is to sign as RSA.
    """
    refused: str | None = None
    try:
        key = load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
    except TypeError:
        # cryptography's answer to an encrypted PEM loaded without a password.
        refused = _ENCRYPTED_PEM
    except (ValueError, UnsupportedAlgorithm):
        refused = _PUBLIC_PEM if _PUBLIC_LABEL.search(data) else _NOT_A_KEY
    if refused is not None:
        raise _Refused(refused)
    return key


# -- signatures -----------------------------------------------------------------------------------


def _sign_with(algorithm: str, key: _Key, message: bytes) -> bytes:
    if isinstance(key, bytes):
        return hmac.digest(key, message, _HMAC_DIGESTS[algorithm])
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    # ECDSA: cryptography returns DER; JWS ES256 (RFC 7518 3.4) wants r || s, each a
    # fixed 32-byte big-endian integer. s in its low form (as ccxt and most exchanges'
    # verifiers expect), so the signature is unique, not one of two valid ones.
    r, s = decode_dss_signature(key.sign(message, _ES256))
    if s > _P256_ORDER // 2:
        s = _P256_ORDER - s
    return r.to_bytes(_P256_COORDINATE_BYTES, "big") + s.to_bytes(_P256_COORDINATE_BYTES, "big")


def _encode(signature: bytes, signature_encoding: str) -> str:
    if signature_encoding == "hex":
        return signature.hex()
    if signature_encoding == "base64":
        return base64.b64encode(signature).decode("ascii")
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")
