"""Signing with an exchange secret: the cryptographic core of ``POST /sign``.

No HTTP: the caller (the service layer) decrypts the secret for one request,
calls :func:`sign`, and drops the secret. A key is parsed on every call and
never cached, so no parsed key outlives its request
(``scripts/bench_sign.py`` measures what parsing costs per call). The one piece
of state is :class:`_ValidatedRsaKeys`, which remembers that an RSA PEM passed
the (slow) key check, as a keyed fingerprint, never the key.

RSA signing with a key not seen before costs tens of milliseconds of CPU (the
key check): call :func:`sign` off the event loop (``anyio.to_thread``).

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
import secrets
import threading
from collections import OrderedDict
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from citadel.errors import InvalidKey, InvalidRequest

__all__ = [
    "ALGORITHMS",
    "MESSAGE_ENCODINGS",
    "SIGNATURE_ENCODINGS",
    "decode_message",
    "sign",
]

# Algorithm -> the key encodings it takes, the default first (the contract's table).
ALGORITHMS: Final[dict[str, tuple[str, ...]]] = {
    "hmac-sha256": ("utf-8", "base64", "hex"),
    "hmac-sha512": ("utf-8", "base64", "hex"),
    "ed25519": ("pem", "base64", "hex"),
    "rsa-pkcs1v15-sha256": ("pem",),
    "ecdsa-p256-sha256": ("pem",),
}
MESSAGE_ENCODINGS: Final[tuple[str, ...]] = ("utf-8", "base64")
SIGNATURE_ENCODINGS: Final[tuple[str, ...]] = ("hex", "base64", "base64url")

# hashlib names, as hmac.digest takes them (its one-shot C path, no HMAC object).
_HMAC_DIGESTS: Final = {"hmac-sha256": "sha256", "hmac-sha512": "sha512"}
_ED25519_SEED_BYTES: Final = 32
_P256_COORDINATE_BYTES: Final = 32

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
_EMPTY_KEY: Final = "The decrypted secret is empty after decoding; an HMAC key must not be empty."

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


def sign(
    algorithm: str, secret: str, message: bytes, *, key_encoding: str, signature_encoding: str
) -> str:
    """Sign ``message`` with ``secret`` read as a key of ``algorithm`` per ``key_encoding``.

    Returns the signature in ``signature_encoding`` (``hex``, ``base64``, or
    unpadded ``base64url``). A name outside the contract's tables (an encoding
    the algorithm does not take included) is :class:`InvalidRequest`; a secret
    that is not such a key is :class:`InvalidKey`.
    """
    if (
        key_encoding not in ALGORITHMS.get(algorithm, ())
        or signature_encoding not in SIGNATURE_ENCODINGS
    ):
        raise InvalidRequest()
    refused: str | None = None
    try:
        key = _parse_key(algorithm, secret, key_encoding)
    except _Refused as exc:
        refused = exc.detail
    if refused is not None:
        # Raised here, outside the handler, so the error has no __context__; and the
        # secret is dropped from this frame, which the error's traceback keeps alive.
        del secret
        raise InvalidKey(refused)
    return _encode(_sign_with(algorithm, key, message), signature_encoding)


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


def _parse_key(algorithm: str, secret: str, key_encoding: str) -> _Key:
    """The key ``secret`` holds for ``algorithm``; raises :class:`_Refused` when it holds none."""
    if algorithm in _HMAC_DIGESTS:
        raw = _decode_bytes(secret, key_encoding)
        if not raw:
            # HMAC takes an empty key, but then anyone can forge the signature. No
            # exchange issues an empty secret, so an empty one is a stored mistake.
            raise _Refused(_EMPTY_KEY)
        return raw
    if algorithm == "ed25519" and key_encoding != "pem":
        seed = _decode_bytes(secret, key_encoding)
        if len(seed) != _ED25519_SEED_BYTES:
            raise _Refused(_NOT_A_KEY)
        return Ed25519PrivateKey.from_private_bytes(seed)
    key = _load_pem(secret)
    if algorithm == "ed25519" and isinstance(key, Ed25519PrivateKey):
        return key
    if algorithm == "rsa-pkcs1v15-sha256" and isinstance(key, rsa.RSAPrivateKey):
        return key
    if (
        algorithm == "ecdsa-p256-sha256"
        and isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP256R1)
    ):
        return key
    # An RSA key for ed25519, a P-384 or secp256k1 key for ecdsa-p256, an Ed448 key, ...
    raise _Refused(_OTHER_KEY_TYPE)


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


class _ValidatedRsaKeys:
    """Keyed fingerprints of the RSA PEMs that passed cryptography's full key check.

    Loading an RSA key checks it (primality of p and q, CRT consistency): about
    30 ms for 2048 bits and 250 ms for 4096, against about 15 us without the
    check (``scripts/bench_sign.py``). The check guards against a malformed key
    whose signatures could leak it, and its verdict depends only on the PEM's
    bytes, so each distinct PEM is checked once per process and later loads skip
    it. Only an HMAC of the PEM under a random per-process key is kept, never the
    key or any parsed object: nothing here can be turned back into a secret, and
    no key outlives its request. Bounded, oldest forgotten first.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._salt = secrets.token_bytes(32)
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()  # sign() may run in worker threads

    def fingerprint(self, pem: bytes) -> bytes:
        return hmac.digest(self._salt, pem, "sha256")

    def checked(self, fingerprint: bytes) -> bool:
        with self._lock:
            if fingerprint not in self._seen:
                return False
            self._seen.move_to_end(fingerprint)
            return True

    def add(self, fingerprint: bytes) -> None:
        with self._lock:
            self._seen[fingerprint] = None
            self._seen.move_to_end(fingerprint)
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)


_VALIDATED_RSA = _ValidatedRsaKeys()


def _load_pem(secret: str) -> PrivateKeyTypes:
    """The private key of a PEM (PKCS#8, PKCS#1 or SEC 1), unencrypted."""
    data = secret.encode("utf-8", "replace")
    fingerprint = _VALIDATED_RSA.fingerprint(data)
    refused: str | None = None
    try:
        key = load_pem_private_key(
            data, password=None, unsafe_skip_rsa_key_validation=_VALIDATED_RSA.checked(fingerprint)
        )
    except TypeError:
        # cryptography's answer to an encrypted PEM loaded without a password.
        refused = _ENCRYPTED_PEM
    except (ValueError, UnsupportedAlgorithm):
        refused = _PUBLIC_PEM if _PUBLIC_LABEL.search(data) else _NOT_A_KEY
    if refused is not None:
        raise _Refused(refused)
    if isinstance(key, rsa.RSAPrivateKey):
        _VALIDATED_RSA.add(fingerprint)
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
    # fixed 32-byte big-endian integer.
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(_P256_COORDINATE_BYTES, "big") + s.to_bytes(_P256_COORDINATE_BYTES, "big")


def _encode(signature: bytes, signature_encoding: str) -> str:
    if signature_encoding == "hex":
        return signature.hex()
    if signature_encoding == "base64":
        return base64.b64encode(signature).decode("ascii")
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")
