"""citadel-client: the Python client of Citadel, without the server's dependencies.

Sentinel, Conductor and jobs install this distribution alone (it needs httpx,
anyio and sniffio only)::

    from citadel_client import CitadelClient, InvalidCiphertext

The server re-exports the same objects (``from citadel import CitadelClient``
keeps working), and its ``citadel.errors`` is this package's
:mod:`citadel_client.errors`: one definition of the error codes for both sides.
"""

from citadel_client.client import (
    AsyncCitadelClient,
    CitadelClient,
    KeyEncoding,
    MessageEncoding,
    Plaintext,
    SignAlgorithm,
    SignatureEncoding,
)
from citadel_client.errors import (
    AuditUnavailable,
    CitadelConnectionError,
    CitadelError,
    Forbidden,
    InvalidCiphertext,
    InvalidKey,
    InvalidRequest,
    KeyRetired,
    PayloadTooLarge,
    ProviderUnavailable,
    RateLimited,
    RequestTimeout,
    Unauthenticated,
    error_for_code,
)

__version__ = "2.1.0"

__all__ = [
    "AsyncCitadelClient",
    "AuditUnavailable",
    "CitadelClient",
    "CitadelConnectionError",
    "CitadelError",
    "Forbidden",
    "InvalidCiphertext",
    "InvalidKey",
    "InvalidRequest",
    "KeyEncoding",
    "KeyRetired",
    "MessageEncoding",
    "PayloadTooLarge",
    "Plaintext",
    "ProviderUnavailable",
    "RateLimited",
    "RequestTimeout",
    "SignAlgorithm",
    "SignatureEncoding",
    "Unauthenticated",
    "__version__",
    "error_for_code",
]
