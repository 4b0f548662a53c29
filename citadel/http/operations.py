"""The four operations: a checked body in, the response body and the audit fields out.

Called by the pipeline (:mod:`citadel.http.pipeline`) once the request is
authenticated, rate-limited, authorised and its body read; nothing here
knows about any of that, and nothing here imports the pipeline. An operation
runs in two steps, so that a batch is checked whole before anything is done
and its rate-limit cost is known before it runs: :meth:`Operations.prepare`
parses and checks the body (raising 422 or 413 for the whole request) and
returns a :class:`Call` with its item count; :meth:`Call.run` does the work.
Each item comes back as an :class:`Item`: its answer, or the error its data
caused (``invalid_ciphertext``, ``key_retired``, ``invalid_key``), with the
audit fields it carries (fingerprints, the algorithm, the context's keys).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel

from citadel import signing
from citadel.context import keys
from citadel.errors import (
    CitadelError,
    InvalidCiphertext,
    InvalidKey,
    InvalidRequest,
    KeyRetired,
    PayloadTooLarge,
)
from citadel.http.bodies import (
    DecryptBatch,
    DecryptRequest,
    EncryptBatch,
    EncryptRequest,
    RewrapBatch,
    RewrapRequest,
    SignBatch,
    SignRequest,
    parse,
)
from citadel.pseudonyms import fingerprint
from citadel.service import SignJob, Vault

# Path → ACL operation name: the paths the pipeline serves itself.
PATHS = {"/encrypt": "encrypt", "/decrypt": "decrypt", "/sign": "sign", "/rewrap": "rewrap"}
# The errors an item's own data causes: the only ones a batch answers per item.
ITEM_ERRORS = (InvalidCiphertext, KeyRetired, InvalidKey)
Audit = dict[str, Any]
Single = TypeVar("Single", bound=BaseModel)


@dataclass(slots=True)
class Item:
    """One item's result: the single form's answer, or its error, and its audit fields."""

    answer: dict[str, str] | None
    error: CitadelError | None
    audit: Audit

    @property
    def code(self) -> str:
        """``ok``, or the error's code."""
        return "ok" if self.error is None else self.error.code


@dataclass(slots=True)
class Outcome:
    """What a call gives back: the response body (or the single form's error) and its items.

    ``items`` holds one entry per item, in order; the single form has one and
    ``batch`` False. For the single form an item's error is the answer; in a
    batch it is that item's result.
    """

    items: tuple[Item, ...]
    batch: bool

    @classmethod
    def single(cls, field: str, result: str, audit: Audit) -> Outcome:
        """The single form's answer: ``{field: result}``."""
        return cls((Item({field: result}, None, audit),), False)

    @classmethod
    def failed(cls, error: CitadelError, audit: Audit) -> Outcome:
        """The single form's error, with the audit fields known before it."""
        return cls((Item(None, error, audit),), False)

    def body(self) -> bytes:
        """The JSON answer: the single form's body, or the batch of results."""
        if not self.batch:
            answer = self.items[0].answer
            assert answer is not None
            return orjson.dumps(answer)
        return orjson.dumps({"batch": [_result(item) for item in self.items]})


def _result(item: Item) -> dict[str, Any]:
    if item.error is None:
        assert item.answer is not None
        return item.answer
    return {"error": {"code": item.error.code, "detail": item.error.detail}}


@dataclass(slots=True)
class Call:
    """A request whose body passed every check, ready to run; ``items`` is its rate-limit cost."""

    items: int
    run: Callable[[], Awaitable[Outcome]]


def _audit(ciphertext: str, context: Any) -> Audit:
    """The audit fields every item that names a ciphertext carries."""
    audit: Audit = {"ct_fp": fingerprint(ciphertext)}
    if context:
        audit["context_keys"] = keys(context)
    return audit


class Operations:
    """The operation handlers over one :class:`~citadel.service.Vault`."""

    def __init__(
        self,
        vault: Vault,
        max_sign_message_bytes: int,
        max_batch_items: int,
        item_limits: dict[str, int],
    ) -> None:
        self.vault = vault
        self._max_message = max_sign_message_bytes
        self._max_items = max_batch_items
        # Per operation, the single form's body limit: no batch item may be larger.
        self._item_limits = item_limits
        self._preparers: dict[str, Callable[[bytes], Call]] = {
            "encrypt": self.encrypt,
            "decrypt": self.decrypt,
            "sign": self.sign,
            "rewrap": self.rewrap,
        }
        assert set(self._preparers) == set(PATHS.values())

    def prepare(self, operation: str, raw: bytes) -> Call:
        """Parse and check the body of ``operation`` (a value of :data:`PATHS`), single or batch."""
        return self._preparers[operation](raw)

    def _items(
        self, operation: str, raw: bytes, single: type[Single], batch: type[BaseModel]
    ) -> tuple[list[Single], bool]:
        """The body's items (one for the single form), and whether it was a batch.

        A batch item larger than the single form's whole body limit is 413, as
        that body would be (measured compactly, so never larger than as sent).
        """
        request = parse(raw, single, batch, self._max_items)
        if isinstance(request, single):
            return [request], False
        items: list[Single] = request.batch  # type: ignore[attr-defined]
        limit = self._item_limits[operation]
        if any(len(item.model_dump_json()) > limit for item in items):
            raise PayloadTooLarge("A batch item is over the size limit of one request.")
        return items, True

    # -- encrypt -----------------------------------------------------------------------------------

    def encrypt(self, raw: bytes) -> Call:
        """``/encrypt``: each plaintext's ciphertext (limits checked for every item first)."""
        items, batched = self._items("encrypt", raw, EncryptRequest, EncryptBatch)
        for item in items:
            self.vault.check_plaintext(item.plaintext)
        if not batched:
            return Call(1, partial(self._encrypt_one, items[0]))

        async def run() -> Outcome:
            done = []
            for item in items:
                ciphertext = await self.vault.encrypt_checked(item.plaintext, item.context)
                done.append(
                    Item({"encrypted_data": ciphertext}, None, _audit(ciphertext, item.context))
                )
            return Outcome(tuple(done), True)

        return Call(len(items), run)

    async def _encrypt_one(self, item: EncryptRequest) -> Outcome:
        ciphertext = await self.vault.encrypt_checked(item.plaintext, item.context)
        return Outcome.single("encrypted_data", ciphertext, _audit(ciphertext, item.context))

    # -- decrypt -----------------------------------------------------------------------------------

    def decrypt(self, raw: bytes) -> Call:
        """``/decrypt``: each plaintext (sent with ``Cache-Control: no-store``)."""
        items, batched = self._items("decrypt", raw, DecryptRequest, DecryptBatch)
        if not batched:
            return Call(1, partial(self._decrypt_one, items[0]))

        async def run() -> Outcome:
            pairs = [(item.encrypted_data, item.context) for item in items]
            found = await self.vault.decrypt_many(pairs)
            return Outcome(
                tuple(
                    _item(result, "plaintext", _audit(ct, ctx))
                    for (ct, ctx), result in zip(pairs, found, strict=True)
                ),
                True,
            )

        return Call(len(items), run)

    def _decrypt_one(self, item: DecryptRequest) -> Awaitable[Outcome]:
        audit = _audit(item.encrypted_data, item.context)
        return _single("plaintext", self.vault.decrypt(item.encrypted_data, item.context), audit)

    # -- rewrap ------------------------------------------------------------------------------------

    def rewrap(self, raw: bytes) -> Call:
        """``/rewrap``: each plaintext under the active key, bound to the same or a new context."""
        items, batched = self._items("rewrap", raw, RewrapRequest, RewrapBatch)
        triples = [
            (
                item.encrypted_data,
                item.context,
                item.new_context if "new_context" in item.model_fields_set else item.context,
            )
            for item in items
        ]
        if not batched:
            return Call(1, partial(self._rewrap_one, *triples[0]))

        async def run() -> Outcome:
            found = await self.vault.rewrap_many(triples)
            return Outcome(
                tuple(
                    _item(result, "encrypted_data", _rewrap_audit(ct, ctx, target, result))
                    for (ct, ctx, target), result in zip(triples, found, strict=True)
                ),
                True,
            )

        return Call(len(items), run)

    async def _rewrap_one(self, ciphertext: str, context: Any, target: Any) -> Outcome:
        try:
            result = await self.vault.rewrap(ciphertext, context, target)
        except CitadelError as err:
            return Outcome.failed(err, _rewrap_audit(ciphertext, context, target, err))
        audit = _rewrap_audit(ciphertext, context, target, result)
        return Outcome.single("encrypted_data", result, audit)

    # -- sign --------------------------------------------------------------------------------------

    def sign(self, raw: bytes) -> Call:
        """``/sign``: each signature by the secret inside its ciphertext; only signatures leave."""
        items, batched = self._items("sign", raw, SignRequest, SignBatch)
        jobs = [self._job(item) for item in items]
        if not batched:
            return Call(1, partial(self._sign_one, jobs[0]))

        async def run() -> Outcome:
            found = await self.vault.sign_many(jobs)
            return Outcome(
                tuple(
                    _item(result, "signature", _sign_audit(job))
                    for job, result in zip(jobs, found, strict=True)
                ),
                True,
            )

        return Call(len(items), run)

    def _sign_one(self, job: SignJob) -> Awaitable[Outcome]:
        audit = _sign_audit(job)
        return _single("signature", self.vault.sign(job), audit)

    def _job(self, item: SignRequest) -> SignJob:
        message = signing.decode_message(item.message, item.message_encoding)
        if len(message) > self._max_message:
            raise PayloadTooLarge(f"The message is over {self._max_message} bytes.")
        if not message:
            raise InvalidRequest("The field message must not decode to nothing.")
        return SignJob(
            item.encrypted_data,
            item.algorithm,
            message,
            item.key_encoding,
            item.signature_encoding,
            item.context,
        )


async def _single(field: str, work: Awaitable[str], audit: Audit) -> Outcome:
    """The single form's outcome of ``work``: its answer, or its error with ``audit`` kept.

    The error is kept, not raised, so its audit line still has the fields
    known before it (the ciphertext's fingerprint).
    """
    try:
        result = await work
    except CitadelError as err:
        return Outcome.failed(err, audit)
    return Outcome.single(field, result, audit)


def _rewrap_audit(ciphertext: str, context: Any, target: Any, result: str | CitadelError) -> Audit:
    audit = _audit(ciphertext, context)
    if isinstance(result, str):
        audit["ct_fp_new"] = fingerprint(result)
    new_keys = keys(target) if target != context else None
    if new_keys:
        audit["new_context_keys"] = new_keys
    return audit


def _sign_audit(job: SignJob) -> Audit:
    audit: Audit = {
        "ct_fp": fingerprint(job.ciphertext),
        "algorithm": job.algorithm,
        "msg_fp": fingerprint(job.message),
    }
    if job.context:
        audit["context_keys"] = keys(job.context)
    return audit


def _item(result: str | CitadelError, field: str, audit: Audit) -> Item:
    """A batch item from a vault result; an error no item causes (a 503) fails the batch whole."""
    if isinstance(result, str):
        return Item({field: result}, None, audit)
    if not isinstance(result, ITEM_ERRORS):
        raise result
    return Item(None, result, audit)
