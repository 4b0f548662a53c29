"""The interface every provider offers the service layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from citadel.breaker import BreakerState
from citadel.context import Context
from citadel.errors import CitadelError


class Provider(Protocol):
    """Encrypts and decrypts strings; raises only :mod:`citadel.errors` types."""

    name: str
    prefix: str  # what every ciphertext this provider makes starts with
    has_breaker: bool  # whether citadel_breaker_state has a series for it

    async def start(self) -> None:
        """Acquire keys or connections; must not block start-up on a remote service."""

    async def aclose(self) -> None:
        """Release what ``start`` acquired."""

    def ready(self) -> bool:
        """True when ``encrypt`` and ``decrypt`` can be served now."""

    def breaker_state(self) -> BreakerState:
        """The circuit breaker's state; ``closed`` for providers without one."""

    async def encrypt(self, plaintext: str, context: Context | None = None) -> str:
        """A ciphertext that :meth:`decrypt` turns back into ``plaintext`` (with this context)."""

    async def decrypt(self, ciphertext: str, context: Context | None = None) -> str:
        """The plaintext, or ``InvalidCiphertext`` / ``KeyRetired`` / ``ProviderUnavailable``.

        ``InvalidCiphertext`` too when ``context`` is not the one it was made with.
        """

    async def decrypt_many(
        self, items: Sequence[tuple[str, Context | None]]
    ) -> list[str | CitadelError]:
        """Each item's plaintext or the error its data caused, in order (a batch).

        Errors of the provider itself (``ProviderUnavailable``) are raised, for
        the whole batch.
        """
