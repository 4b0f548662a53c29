"""The interface every provider offers the service layer."""

from __future__ import annotations

from typing import Protocol

from citadel.breaker import BreakerState


class Provider(Protocol):
    """Encrypts and decrypts strings; raises only :mod:`citadel.errors` types."""

    name: str
    prefix: str  # what every ciphertext this provider makes starts with

    async def start(self) -> None:
        """Acquire keys or connections; must not block start-up on a remote service."""

    async def aclose(self) -> None:
        """Release what ``start`` acquired."""

    def ready(self) -> bool:
        """True when ``encrypt`` and ``decrypt`` can be served now."""

    def breaker_state(self) -> BreakerState:
        """The circuit breaker's state; ``closed`` for providers without one."""

    async def encrypt(self, plaintext: str) -> str:
        """Return a ciphertext that :meth:`decrypt` turns back into ``plaintext``."""

    async def decrypt(self, ciphertext: str) -> str:
        """The plaintext, or ``InvalidCiphertext`` / ``KeyRetired`` / ``ProviderUnavailable``."""
