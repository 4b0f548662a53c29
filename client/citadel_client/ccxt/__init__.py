"""ccxt exchanges that sign through Citadel: the exchange secret is only ever a ciphertext.

``exchange(id, client, config)`` and ``async_exchange(id, client, config)``
return an instance of ccxt's own class for ``id`` (a per-instance subclass of
it), built from ccxt's own ``config`` except that ``secret`` and
``privateKey`` hold the ciphertexts ``/encrypt`` returned for them. ccxt builds
every request as it always does; where it would compute a signature with the
secret, the adapter asks Citadel's ``/sign`` for it instead.

How (``docs/ccxt.md`` has the long form):

- ccxt decides how to sign from the secret's *form* (a PEM or not, its
  length, whether it is base64), so the object's ``secret`` is a *stand-in*:
  a string of the same form as the real secret, holding nothing of it. The
  form is learned once per ciphertext from Citadel itself, by trial
  ``/sign`` calls on a fixed message under the ``sign`` operation (which of
  a few algorithm and key-encoding pairs the secret parses as), never from
  the secret's value.
- ccxt's signing primitives (``hmac``, ``rsa``, ``eddsa``, ``ecdsa``,
  ``jwt``, ``hash``) are replaced on the instance, never on a ccxt class.
  A call whose key is the stand-in (or a form of it ccxt made: its bytes,
  its base64 or hex decoding, the 32-byte seed of a 64-byte Ed25519 key)
  becomes one ``/sign`` request; a key that is one of ccxt's own constants
  (a broker id in its options) or another config value (a passphrase) is
  left to ccxt; any other key (one derived from the secret), a scheme
  ``/sign`` lacks, or the secret hashed, encoded or sent as it is raises
  :class:`NotCovered` before anything is sent.
- Sync: the primitive blocks on Citadel, as ccxt blocks on the exchange.
  Async: ccxt's ``sign()`` is synchronous, so it runs once with placeholder
  signatures, recording the messages and ccxt's clock and random ids; the
  request's ``fetch`` awaits Citadel for the messages, then runs ``sign()``
  again with the recorded clock and ids played back and the real
  signatures, and ccxt's own ``fetch`` sends that request. The event loop
  never waits on Citadel, and ccxt's throttling, retries (each retry signs
  again) and several keyed calls in one request (KuCoin's passphrase) are
  ccxt's own. ``citadel_batch`` sends concurrent requests' signatures in
  shared ``sign_many`` batches.
"""

from citadel_client.ccxt.build import async_exchange, exchange
from citadel_client.ccxt.errors import NotCovered
from citadel_client.ccxt.forms import FORMS, PROBE_MESSAGE, learn_form, secret_form

__all__ = [
    "FORMS",
    "PROBE_MESSAGE",
    "NotCovered",
    "async_exchange",
    "exchange",
    "learn_form",
    "secret_form",
]
