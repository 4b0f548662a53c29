"""The Python client, re-exported from the ``citadel-client`` distribution.

Callers that only talk to Citadel should depend on ``citadel-client`` and
import ``citadel_client``; this module keeps ``from citadel.client import
CitadelClient`` working for code that has the server installed anyway.
"""

from citadel_client.client import AsyncCitadelClient, CitadelClient, Plaintext
from citadel_client.errors import CitadelConnectionError

__all__ = ["AsyncCitadelClient", "CitadelClient", "CitadelConnectionError", "Plaintext"]
