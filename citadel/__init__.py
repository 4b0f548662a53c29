"""Citadel: the credential vault of the trading platform.

Callers import the client and the errors from here::

    from citadel import CitadelClient, InvalidCiphertext

Both come from the ``citadel-client`` distribution (import ``citadel_client``),
which callers install alone, without the server's dependencies.
"""

from citadel.client import AsyncCitadelClient, CitadelClient, CitadelConnectionError, Plaintext
from citadel.errors import (
    AuditUnavailable,
    BadRequest,
    CitadelError,
    Forbidden,
    HeadersTooLarge,
    InternalError,
    InvalidCiphertext,
    InvalidKey,
    InvalidRequest,
    KeyRetired,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProviderUnavailable,
    RateLimited,
    RequestTimeout,
    Unauthenticated,
)

__all__ = [
    "AsyncCitadelClient",
    "AuditUnavailable",
    "BadRequest",
    "CitadelClient",
    "CitadelConnectionError",
    "CitadelError",
    "Forbidden",
    "HeadersTooLarge",
    "InternalError",
    "InvalidCiphertext",
    "InvalidKey",
    "InvalidRequest",
    "KeyRetired",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "Plaintext",
    "ProviderUnavailable",
    "RateLimited",
    "RequestTimeout",
    "Unauthenticated",
]
