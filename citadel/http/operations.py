"""The four operations: a checked body in, the response body and the audit fields out.

Called by the pipeline (:mod:`citadel.http.pipeline`) once the request is
authenticated, rate-limited, authorised and its body read; nothing here
knows about any of that, and nothing here imports the pipeline. Errors are
raised (the pipeline maps them in one place); what a handler learned that
the audit line needs (fingerprints, the algorithm) travels back in its
:class:`Outcome`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from citadel import signing
from citadel.errors import CitadelError, InvalidRequest, PayloadTooLarge
from citadel.http.bodies import CiphertextRequest, EncryptRequest, SignRequest, parse
from citadel.pseudonyms import fingerprint
from citadel.service import Vault

# Path → ACL operation name: the paths the pipeline serves itself.
PATHS = {"/encrypt": "encrypt", "/decrypt": "decrypt", "/sign": "sign", "/rewrap": "rewrap"}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an operation gives back: its response body or its error, and its audit fields.

    An error the data caused once the request was understood (an undecryptable
    ciphertext, a secret that is not a key) comes back here rather than raised,
    with the fingerprints already known, so the audit line still says which
    ciphertext failed. Errors of the request itself (a bad body) are raised.
    """

    body: bytes = b""
    error: CitadelError | None = None
    ct_fp: str | None = None
    extra: dict[str, str] | None = None


class Operations:
    """The operation handlers over one :class:`~citadel.service.Vault`."""

    def __init__(self, vault: Vault, max_sign_message_bytes: int) -> None:
        self.vault = vault
        self._max_message = max_sign_message_bytes
        self._handlers: dict[str, Callable[[bytes], Awaitable[Outcome]]] = {
            "encrypt": self.encrypt,
            "decrypt": self.decrypt,
            "sign": self.sign,
            "rewrap": self.rewrap,
        }
        assert set(self._handlers) == set(PATHS.values())

    async def perform(self, operation: str, raw: bytes) -> Outcome:
        """Run ``operation`` (a value of :data:`PATHS`) on the raw body."""
        return await self._handlers[operation](raw)

    async def encrypt(self, raw: bytes) -> Outcome:
        """``/encrypt``: the plaintext's ciphertext."""
        request = parse(raw, EncryptRequest)
        ciphertext = await self.vault.encrypt(request.plaintext)
        return Outcome(orjson.dumps({"encrypted_data": ciphertext}), ct_fp=fingerprint(ciphertext))

    async def decrypt(self, raw: bytes) -> Outcome:
        """``/decrypt``: the plaintext (the pipeline sends it with ``Cache-Control: no-store``)."""
        ciphertext = parse(raw, CiphertextRequest).encrypted_data
        ct_fp = fingerprint(ciphertext)
        try:
            plaintext = await self.vault.decrypt(ciphertext)
        except CitadelError as err:
            return Outcome(error=err, ct_fp=ct_fp)
        return Outcome(orjson.dumps({"plaintext": plaintext}), ct_fp=ct_fp)

    async def rewrap(self, raw: bytes) -> Outcome:
        """``/rewrap``: the same plaintext under the active key; it never leaves the server."""
        ciphertext = parse(raw, CiphertextRequest).encrypted_data
        ct_fp = fingerprint(ciphertext)
        try:
            new = await self.vault.rewrap(ciphertext)
        except CitadelError as err:
            return Outcome(error=err, ct_fp=ct_fp)
        return Outcome(
            orjson.dumps({"encrypted_data": new}),
            ct_fp=ct_fp,
            extra={"ct_fp_new": fingerprint(new)},
        )

    async def sign(self, raw: bytes) -> Outcome:
        """``/sign``: a signature by the secret inside the ciphertext; only the signature leaves."""
        request = parse(raw, SignRequest)
        message = signing.decode_message(request.message, request.message_encoding)
        if len(message) > self._max_message:
            raise PayloadTooLarge(f"The message is over {self._max_message} bytes.")
        if not message:
            raise InvalidRequest("The field message must not decode to nothing.")
        ct_fp = fingerprint(request.encrypted_data)
        audit = {"algorithm": request.algorithm, "msg_fp": fingerprint(message)}
        try:
            signature = await self.vault.sign(
                request.encrypted_data,
                algorithm=request.algorithm,
                message=message,
                key_encoding=request.key_encoding,
                signature_encoding=request.signature_encoding,
            )
        except CitadelError as err:
            return Outcome(error=err, ct_fp=ct_fp, extra=audit)
        return Outcome(orjson.dumps({"signature": signature}), ct_fp=ct_fp, extra=audit)
