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


@dataclass(frozen=True, slots=True)
class Item:
    """One item's result: the single form's answer, or its error, and its audit fields."""

    answer: dict[str, str] | None
    error: CitadelError | None
    audit: Audit

    @property
    def code(self) -> str:
        """``ok``, or the error's code."""
        return "ok" if self.error is None else self.error.code


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a call gives back: the response body (or the single form's error) and its items.

    ``items`` holds one entry per item, in order; the single form has one and
    ``batch`` False. For the single form an item's error is the answer; in a
    batch it is that item's result.
    """

    items: tuple[Item, ...]
    batch: bool

    @property
    def error(self) -> CitadelError | None:
        """The error the whole answer is (the single form's item error), or None."""
        return None if self.batch else self.items[0].error

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


@dataclass(frozen=True, slots=True)
class Call:
    """A request whose body passed every check, ready to run; ``items`` is its rate-limit cost."""

    items: int
    run: Callable[[], Awaitable[Outcome]]


def _with_context(audit: Audit, context: Any) -> Audit:
    found = keys(context)
    if found:
        audit["context_keys"] = found
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

        async def run() -> Outcome:
            done = []
            for item in items:
                ciphertext = await self.vault.encrypt_checked(item.plaintext, item.context)
                audit = _with_context({"ct_fp": fingerprint(ciphertext)}, item.context)
                done.append(Item({"encrypted_data": ciphertext}, None, audit))
            return Outcome(tuple(done), batched)

        return Call(len(items), run)

    # -- decrypt -----------------------------------------------------------------------------------

    def decrypt(self, raw: bytes) -> Call:
        """``/decrypt``: each plaintext (sent with ``Cache-Control: no-store``)."""
        items, batched = self._items("decrypt", raw, DecryptRequest, DecryptBatch)

        async def run() -> Outcome:
            pairs = [(item.encrypted_data, item.context) for item in items]
            found = await _found(
                batched, self.vault.decrypt_many, lambda pair: self.vault.decrypt(*pair), pairs
            )
            done = [
                _item(result, "plaintext", _with_context(_fp(ct), ctx), batched)
                for (ct, ctx), result in zip(pairs, found, strict=True)
            ]
            return Outcome(tuple(done), batched)

        return Call(len(items), run)

    # -- rewrap ------------------------------------------------------------------------------------

    def rewrap(self, raw: bytes) -> Call:
        """``/rewrap``: each plaintext under the active key, bound to the same or a new context."""
        items, batched = self._items("rewrap", raw, RewrapRequest, RewrapBatch)

        async def run() -> Outcome:
            triples = [
                (
                    item.encrypted_data,
                    item.context,
                    item.new_context if "new_context" in item.model_fields_set else item.context,
                )
                for item in items
            ]
            found = await _found(
                batched, self.vault.rewrap_many, lambda each: self.vault.rewrap(*each), triples
            )
            done = []
            for (ct, ctx, target), result in zip(triples, found, strict=True):
                audit = _with_context(_fp(ct), ctx)
                if isinstance(result, str):
                    audit["ct_fp_new"] = fingerprint(result)
                if target != ctx and keys(target):
                    audit["new_context_keys"] = keys(target)
                done.append(_item(result, "encrypted_data", audit, batched))
            return Outcome(tuple(done), batched)

        return Call(len(items), run)

    # -- sign --------------------------------------------------------------------------------------

    def sign(self, raw: bytes) -> Call:
        """``/sign``: each signature by the secret inside its ciphertext; only signatures leave."""
        items, batched = self._items("sign", raw, SignRequest, SignBatch)
        jobs = [self._job(item) for item in items]

        async def run() -> Outcome:
            found = await _found(batched, self.vault.sign_many, self.vault.sign, jobs)
            done = []
            for job, result in zip(jobs, found, strict=True):
                audit = _fp(job.ciphertext)
                audit["algorithm"] = job.algorithm
                audit["msg_fp"] = fingerprint(job.message)
                done.append(_item(result, "signature", _with_context(audit, job.context), batched))
            return Outcome(tuple(done), batched)

        return Call(len(items), run)

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


def _fp(ciphertext: str) -> Audit:
    return {"ct_fp": fingerprint(ciphertext)}


async def _found(
    batched: bool,
    many: Callable[[list[Any]], Awaitable[list[str | CitadelError]]],
    one: Callable[[Any], Awaitable[str]],
    args: list[Any],
) -> list[str | CitadelError]:
    """The vault's results: ``many`` for a batch; for the single form ``one``, its error kept.

    The single form's error is returned, not raised, so its audit line still
    has the fields known before it (the ciphertext's fingerprint).
    """
    if batched:
        return await many(args)
    try:
        return [await one(args[0])]
    except CitadelError as err:
        return [err]


def _item(result: str | CitadelError, field: str, audit: Audit, batch: bool) -> Item:
    """An item from a vault result; in a batch, an error no item causes (a 503) fails it whole."""
    if isinstance(result, str):
        return Item({field: result}, None, audit)
    if batch and not isinstance(result, ITEM_ERRORS):
        raise result
    return Item(None, result, audit)
