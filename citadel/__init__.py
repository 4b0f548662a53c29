"""Citadel: the credential vault of the trading platform.

Callers import the client and the errors from here::

    from citadel import CitadelClient, InvalidCiphertext
"""

from citadel.client import AsyncCitadelClient, CitadelClient, CitadelConnectionError, Plaintext
from citadel.errors import (
    AuditUnavailable,
    CitadelError,
    Forbidden,
    InvalidCiphertext,
    InvalidRequest,
    PayloadTooLarge,
    ProviderUnavailable,
    RateLimited,
    Unauthenticated,
)

__all__ = [
    "AsyncCitadelClient",
    "AuditUnavailable",
    "CitadelClient",
    "CitadelConnectionError",
    "CitadelError",
    "Forbidden",
    "InvalidCiphertext",
    "InvalidRequest",
    "PayloadTooLarge",
    "Plaintext",
    "ProviderUnavailable",
    "RateLimited",
    "Unauthenticated",
]
