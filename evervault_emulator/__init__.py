"""An Evervault API emulator: the two endpoints the Python SDK uses, with real cryptography.

- ``GET /cages/key`` serves the app's secp256k1 and P-256 public keys
  (``ecdhKey``, ``ecdhP256Key``) after checking the ``Api-Key`` header.
- ``POST /decrypt`` checks HTTP Basic ``app_id:api_key`` and really decrypts the
  SDK's ECIES output (both curves, with or without data-role metadata; strings,
  numbers, booleans, and lists or objects of them; other values come back as they
  are). Anything it cannot decrypt is a 422 Problem JSON, as Evervault answers.
- Faults per path (status codes, latency, dropped connections) and call
  counters, from Python (:class:`EvervaultEmulator`) or over HTTP
  (``/_emulator/faults``, ``/_emulator/stats``, ``/_emulator/reset``).

Run it for a person: ``python -m evervault_emulator --port 3999``.
"""

from evervault_emulator.crypto import AppKeys, UndecryptableError
from evervault_emulator.server import EvervaultEmulator, Fault

__all__ = ["AppKeys", "EvervaultEmulator", "Fault", "UndecryptableError"]
