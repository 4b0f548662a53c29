"""The Python client, re-exported from the ``citadel-client`` distribution.

Callers that only talk to Citadel should depend on ``citadel-client`` and
import ``citadel_client``; this module keeps ``from citadel.client import
CitadelClient`` working for code that has the server installed anyway.
"""

from citadel_client.async_client import AsyncCitadelClient
from citadel_client.batch import ItemResult
from citadel_client.config import ConfigError
from citadel_client.errors import CitadelConnectionError
from citadel_client.plaintext import Plaintext
from citadel_client.sync_client import CitadelClient

__all__ = [
    "AsyncCitadelClient",
    "CitadelClient",
    "CitadelConnectionError",
    "ConfigError",
    "ItemResult",
    "Plaintext",
]
