"""The vault: what encrypt and decrypt mean, independent of HTTP."""

from __future__ import annotations

from citadel.errors import Forbidden, InvalidRequest, PayloadTooLarge
from citadel.providers.base import Provider
from citadel.security import Authenticator


class Vault:
    """Checks the ACL and the size limit, then asks the provider."""

    def __init__(
        self, provider: Provider, authenticator: Authenticator, max_plaintext_bytes: int
    ) -> None:
        self.provider = provider
        self._auth = authenticator
        self._max = max_plaintext_bytes

    def authorize(self, caller: str, operation: str) -> None:
        if not self._auth.allowed(caller, operation):
            raise Forbidden()

    async def encrypt(self, caller: str, plaintext: str) -> str:
        self.authorize(caller, "encrypt")
        try:
            size = len(plaintext.encode())
        except UnicodeEncodeError:
            # A lone surrogate (JSON "\\ud800") is valid JSON but not UTF-8.
            raise InvalidRequest("The plaintext is not valid Unicode text.") from None
        if size > self._max:
            raise PayloadTooLarge(f"The plaintext is over {self._max} UTF-8 bytes.")
        return await self.provider.encrypt(plaintext)

    async def decrypt(self, caller: str, ciphertext: str) -> str:
        self.authorize(caller, "decrypt")
        return await self.provider.decrypt(ciphertext)
