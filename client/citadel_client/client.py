"""Python clients for Citadel: :class:`CitadelClient` (sync) and :class:`AsyncCitadelClient`.

Sentinel::

    with CitadelClient("http://citadel:8004", api_key=SENTINEL_KEY) as citadel:
        ciphertext = citadel.encrypt(exchange_secret, user_id=user.id)

Conductor::

    async with AsyncCitadelClient("http://citadel:8004", api_key=CONDUCTOR_KEY) as citadel:
        with await citadel.decrypt(ciphertext, user_id=user.id) as secret:
            sign(order, secret.reveal())
        # here the Plaintext holds nothing any more

Conductor, once granted ``sign`` (the secret then never leaves Citadel)::

    signature = await citadel.sign(ciphertext, query_string, algorithm="hmac-sha256")

A migration job (``citadel rewrap`` does this in bulk)::

    new_ciphertext = citadel.rewrap(old_ciphertext)

A ciphertext bound to an encryption context (``context=`` on every call, the
same context each time), and many items in one request
(:mod:`citadel_client.batch`)::

    ct = citadel.encrypt(secret, context={"user_id": "8413"})
    results = citadel.decrypt_many([{"encrypted_data": ct, "context": {"user_id": "8413"}}])

Errors are the classes of :mod:`citadel_client.errors`, one per contract code,
plus :class:`CitadelConnectionError` when Citadel could not be reached. An
answer without a known code (a proxy's HTML page, say) is a plain
:class:`~citadel_client.errors.CitadelError` whose ``status`` is the HTTP status.
No error carries the plaintext, the ciphertext or the API key, and none is
chained to the httpx exception behind it (whose request holds all three).

Retries happen only where they are safe and useful: on 503 and 429 answers
and on connection errors and timeouts. Attempt *n* (from 0) is followed by a
wait of ``min(16, 2**n)`` seconds, scaled by a random factor in
[0.75, 1.25) so that many clients do not retry in step: about 1, 2, 4, 8, 16,
16 … s. When the answer has ``Retry-After``, the wait is exactly that many
seconds instead. A wait that would reach the call's ``deadline`` is not
started: the last error is raised. Each attempt's timeout is also cut to
what is left of the deadline, so a call never runs much past it. Encrypting
again is safe (it makes a new ciphertext and changes nothing), decrypting and
signing are idempotent, and rewrapping again only makes another ciphertext of
the same plaintext (the caller stores whichever answer it got).

Both clients take ``verify=`` and ``cert=`` for TLS and mutual TLS, and
``from_env()`` builds one from the contract's ``CITADEL_*`` variables
(:mod:`citadel_client.config`).

The clients keep no plaintext: a request body lives for one call, a response
for one attempt (it is closed before the next), and the API key is set once,
in the connection pool's default headers. They log nothing.
"""

from __future__ import annotations

from citadel_client._base import (
    BACKOFF_CAP_S,
    JITTER,
    RETRY_STATUSES,
    KeyEncoding,
    MessageEncoding,
    SignAlgorithm,
    SignatureEncoding,
)
from citadel_client.async_client import AsyncCitadelClient
from citadel_client.batch import ItemResult
from citadel_client.errors import CitadelConnectionError
from citadel_client.plaintext import Plaintext
from citadel_client.sync_client import CitadelClient

# The module is the clients' overview (its docstring) and keeps the names it has
# always exported; each concern lives in its own module.
__all__ = [
    "BACKOFF_CAP_S",
    "JITTER",
    "RETRY_STATUSES",
    "AsyncCitadelClient",
    "CitadelClient",
    "CitadelConnectionError",
    "ItemResult",
    "KeyEncoding",
    "MessageEncoding",
    "Plaintext",
    "SignAlgorithm",
    "SignatureEncoding",
]
