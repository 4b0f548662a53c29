"""Citadel's errors, defined once in the client distribution and re-exported here.

The server raises them from the service layer and maps them to HTTP in one
handler; the client raises them from a response's ``code``. Keeping the one
definition in ``citadel_client.errors`` (a dependency of the server) means the
codes cannot drift apart; see that module for the tree of classes.
"""

from citadel_client.errors import (
    AuditUnavailable,
    BadRequest,
    CitadelConnectionError,
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
    error_for_code,
)

__all__ = [
    "AuditUnavailable",
    "BadRequest",
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
    "ProviderUnavailable",
    "RateLimited",
    "RequestTimeout",
    "Unauthenticated",
    "error_for_code",
]
