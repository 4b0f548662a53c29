"""The embedded provider: XAES-256-GCM under a local keyring.

Ciphertext: ``cit1:<key id>:<base64url(nonce[24] || ciphertext || tag[16])>``.
The header ``cit1:<key id>:`` is the associated data, so a ciphertext cannot be
re-labelled to another key or format version without failing authentication.

Why XAES-256-GCM (C2SP) and not plain AES-256-GCM: with random 96-bit nonces
one AES-GCM key is good for about 2^32 messages, which several instances at
full speed would exhaust in days. XAES derives a fresh AES-256-GCM key per
message from the first 96 bits of a 192-bit random nonce (NIST SP 800-108 KDF
in counter mode with CMAC-AES-256), and uses the remaining 96 bits as the GCM
nonce, so nonce collisions stop being a practical concern. It is AES-256-GCM
all the same, and costs two extra AES block operations. See docs/formats.md.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from citadel.config import SettingError, Settings
from citadel.errors import InvalidCiphertext
from citadel.keyring import Keyring, create_keyring, load_keyring
from citadel.metrics import Metrics
from citadel.providers.base import BreakerState

log = structlog.get_logger("citadel")

PREFIX = "cit1"
NONCE_BYTES = 24
TAG_BYTES = 16


class XAES256GCM:
    """XAES-256-GCM as specified at c2sp.org/XAES-256-GCM, for one 256-bit key."""

    __slots__ = ("_key", "_local", "_m1_k1", "_m2_k1")

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("XAES-256-GCM needs a 32-byte key")
        self._key = key
        self._local = threading.local()
        # K1 is the CMAC subkey: L = AES_K(0^128), doubled in GF(2^128).
        k1 = int.from_bytes(self._aes_blocks(bytes(16)), "big") << 1
        if k1 >> 128:
            k1 = (k1 & ((1 << 128) - 1)) ^ 0x87
        # M_i xor K1, with the nonce bits still zero: the nonce is xored in per message.
        self._m1_k1 = int.from_bytes(b"\x00\x01X\x00" + bytes(12), "big") ^ k1
        self._m2_k1 = int.from_bytes(b"\x00\x02X\x00" + bytes(12), "big") ^ k1

    def _aes_blocks(self, data: bytes) -> bytes:
        # ECB over whole blocks is the raw block cipher, stateless between
        # calls, so one encryptor per thread serves every message of that thread.
        enc = getattr(self._local, "ecb", None)
        if enc is None:
            enc = Cipher(algorithms.AES(self._key), modes.ECB()).encryptor()  # noqa: S305
            self._local.ecb = enc
        out: bytes = enc.update(data)
        return out

    def _derive(self, nonce: bytes) -> AESGCM:
        n = int.from_bytes(nonce[:12], "big")
        blocks = ((self._m1_k1 ^ n) << 128 | (self._m2_k1 ^ n)).to_bytes(32, "big")
        return AESGCM(self._aes_blocks(blocks))

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._derive(nonce).encrypt(nonce[12:], plaintext, aad)

    def decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return self._derive(nonce).decrypt(nonce[12:], ciphertext, aad)


class LocalProvider:
    """Encrypts in-process; the work is a few microseconds, so it runs inline on the loop."""

    name = "local"
    prefix = PREFIX + ":"

    def __init__(self, keyring: Keyring) -> None:
        self._ciphers = {kid: XAES256GCM(key) for kid, key in keyring.keys.items()}
        self._active = keyring.active
        self._header = f"{PREFIX}:{keyring.active}:"
        self._header_bytes = self._header.encode()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics, *, create: bool) -> LocalProvider:
        """The keyring at ``CITADEL_LOCAL_KEYRING``; created in development when ``create``."""
        path = settings.local_keyring
        if create and settings.env == "development" and create_keyring(path, origin="auto"):
            log.info("keyring_created", path=str(path))
        keyring = load_keyring(path)
        if settings.env == "production" and keyring.origin == "auto":
            raise SettingError(
                "CITADEL_LOCAL_KEYRING",
                "was auto-created for development; create one with `citadel keyring init`",
            )
        return cls(keyring)

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def ready(self) -> bool:
        return True

    def breaker_state(self) -> BreakerState:
        return BreakerState.CLOSED

    async def encrypt(self, plaintext: str) -> str:
        return self.encrypt_sync(plaintext)

    async def decrypt(self, ciphertext: str) -> str:
        return self.decrypt_sync(ciphertext)

    def encrypt_sync(self, plaintext: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self._active].encrypt(nonce, plaintext.encode(), self._header_bytes)
        return self._header + _b64(nonce + sealed)

    def decrypt_sync(self, ciphertext: str) -> str:
        prefix, sep, rest = ciphertext.partition(":")
        kid, sep2, body = rest.partition(":")
        cipher = self._ciphers.get(kid)
        if prefix != PREFIX or not sep or not sep2 or cipher is None or len(body) > 2_000_000:
            raise InvalidCiphertext()
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise InvalidCiphertext() from None
        # Only the canonical encoding is accepted, so no two strings decrypt to
        # the same message (base64's spare trailing bits would allow it).
        if len(raw) < NONCE_BYTES + TAG_BYTES or _b64(raw) != body:
            raise InvalidCiphertext()
        header = f"{PREFIX}:{kid}:".encode()
        try:
            plain = cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], header)
            return plain.decode()
        except (InvalidTag, UnicodeDecodeError):
            raise InvalidCiphertext() from None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
