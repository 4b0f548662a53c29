"""citadel-client: the Python client of Citadel, without the server's dependencies.

Sentinel, Conductor and jobs install this distribution alone (it needs httpx,
anyio and sniffio only)::

    from citadel_client import CitadelClient, InvalidCiphertext

The server re-exports the same objects (``from citadel import CitadelClient``
keeps working), and its ``citadel.errors`` is this package's
:mod:`citadel_client.errors`: one definition of the error codes for both sides.
"""

from citadel_client._base import KeyEncoding, MessageEncoding, SignAlgorithm, SignatureEncoding
from citadel_client.async_client import AsyncCitadelClient
from citadel_client.batch import Context, DecryptItem, EncryptItem, ItemResult, RewrapItem, SignItem
from citadel_client.config import ConfigError
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
from citadel_client.plaintext import Plaintext
from citadel_client.sync_client import CitadelClient

__version__ = "2.1.0"

__all__ = [
    "AsyncCitadelClient",
    "AuditUnavailable",
    "BadRequest",
    "CitadelClient",
    "CitadelConnectionError",
    "CitadelError",
    "ConfigError",
    "Context",
    "DecryptItem",
    "EncryptItem",
    "Forbidden",
    "HeadersTooLarge",
    "InternalError",
    "InvalidCiphertext",
    "InvalidKey",
    "InvalidRequest",
    "ItemResult",
    "KeyEncoding",
    "KeyRetired",
    "MessageEncoding",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "Plaintext",
    "ProviderUnavailable",
    "RateLimited",
    "RequestTimeout",
    "RewrapItem",
    "SignAlgorithm",
    "SignItem",
    "SignatureEncoding",
    "Unauthenticated",
    "__version__",
    "error_for_code",
]
