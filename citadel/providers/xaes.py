"""XAES-256-GCM (c2sp.org/XAES-256-GCM): AES-256-GCM with a 192-bit nonce and a key per message.

See :mod:`citadel.providers.local` and docs/formats.md for why the local
provider uses it.
"""

from __future__ import annotations

import threading

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


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
        """Seal ``plaintext`` under the key derived from the 24-byte ``nonce``, with ``aad``."""
        return self._derive(nonce).encrypt(nonce[12:], plaintext, aad)

    def decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Open what :meth:`encrypt` sealed; cryptography's ``InvalidTag`` if anything changed."""
        return self._derive(nonce).decrypt(nonce[12:], ciphertext, aad)
