"""The vault: what each operation means, independent of HTTP.

One provider encrypts (``CITADEL_PROVIDER``); every provider named in
``CITADEL_DECRYPT_PROVIDERS`` decrypts the ciphertexts that carry its prefix
(``cit1:`` local, ``ev:`` Evervault), so data can move from one provider to
the other by rewrapping while both keep working.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

from citadel import signing
from citadel.errors import InvalidCiphertext, InvalidRequest, PayloadTooLarge
from citadel.providers.base import Provider

# Signing with these takes long enough (RSA: about a millisecond) that it
# runs in a worker thread instead of holding the event loop.
_SLOW_ALGORITHMS = frozenset({"rsa-pkcs1v15-sha256"})


class Vault:
    """Checks the size limit, then asks the provider that owns the data.

    Who may call which operation is decided before: the request path checks the
    ACL before it reads a body (see :mod:`citadel.middleware`).
    """

    def __init__(
        self, encryptor: Provider, decryptors: Sequence[Provider], max_plaintext_bytes: int
    ) -> None:
        self.provider = encryptor
        self.decryptors = tuple(decryptors)
        self._routes = tuple((p.prefix, p) for p in self.decryptors)
        self._max = max_plaintext_bytes

    def owner(self, ciphertext: str) -> Provider:
        """The decrypting provider whose prefix the ciphertext carries."""
        for prefix, provider in self._routes:
            if ciphertext.startswith(prefix):
                return provider
        raise InvalidCiphertext()

    async def encrypt(self, plaintext: str) -> str:
        try:
            size = len(plaintext.encode())
        except UnicodeEncodeError:
            # A lone surrogate (JSON "\\ud800") is valid JSON but not UTF-8.
            raise InvalidRequest("The plaintext is not valid Unicode text.") from None
        if size > self._max:
            raise PayloadTooLarge(f"The plaintext is over {self._max} UTF-8 bytes.")
        return await self.provider.encrypt(plaintext)

    async def decrypt(self, ciphertext: str) -> str:
        return await self.owner(ciphertext).decrypt(ciphertext)

    async def rewrap(self, ciphertext: str) -> str:
        """The same plaintext, encrypted again by the encrypting provider under its active key."""
        plaintext = await self.owner(ciphertext).decrypt(ciphertext)
        return await self.provider.encrypt(plaintext)

    async def sign(
        self,
        ciphertext: str,
        *,
        algorithm: str,
        message: bytes,
        key_encoding: str,
        signature_encoding: str,
    ) -> str:
        """Sign ``message`` with the secret inside ``ciphertext``; only the signature leaves."""
        secret = await self.owner(ciphertext).decrypt(ciphertext)
        work = functools.partial(
            signing.sign,
            algorithm,
            secret,
            message,
            key_encoding=key_encoding,
            signature_encoding=signature_encoding,
        )
        return await asyncio.to_thread(work) if algorithm in _SLOW_ALGORITHMS else work()
