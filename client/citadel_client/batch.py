"""Batches: many items in one request (``{"batch": [...]}``), and the per-item results.

``encrypt_many``, ``decrypt_many``, ``sign_many`` and ``rewrap_many`` (on both
clients) take a list, send it in requests of at most ``max_batch_items`` items
(default 100, the server's ``CITADEL_MAX_BATCH_ITEMS``) and ``max_batch_bytes``
of body (default 8 MiB, ``CITADEL_MAX_BATCH_BYTES``), one request after the
other, and return one :class:`ItemResult` per item, in order::

    results = citadel.decrypt_many([ct1, {"encrypted_data": ct2, "context": ctx}])
    for result in results:
        if result.ok:
            use(result.value)               # a Plaintext, for decrypt_many
        else:
            log(result.error.code)          # e.g. invalid_ciphertext, for this item alone

Only what an item's data causes is a per-item error (``invalid_ciphertext``,
``key_retired``, ``invalid_key``). Anything that refuses a request whole (401,
403, 413, 422, 429 past the deadline, 503 past the deadline) is raised, as for
a single call: the server does nothing for a refused request, but the requests
sent before it were done (a retried encrypt or rewrap only makes another
ciphertext, so sending the list again is safe).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Generic, NotRequired, Required, TypedDict, TypeVar

import httpx

from citadel_client._base import error_of, unexpected
from citadel_client.errors import CitadelError, error_for_code

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_BATCH_ITEMS",
    "Context",
    "DecryptItem",
    "EncryptItem",
    "ItemResult",
    "RewrapItem",
    "SignItem",
]

T = TypeVar("T")
Context = Mapping[str, str]

DEFAULT_MAX_BATCH_ITEMS: Final = 100
DEFAULT_MAX_BATCH_BYTES: Final = 8 * 1024 * 1024


class EncryptItem(TypedDict):
    """One item of ``encrypt_many``: the single form's body."""

    plaintext: Required[str]
    context: NotRequired[Context]


class DecryptItem(TypedDict):
    """One item of ``decrypt_many``: the ciphertext and the context it was bound to."""

    encrypted_data: Required[str]
    context: NotRequired[Context]


class RewrapItem(TypedDict):
    """One item of ``rewrap_many``; ``new_context`` binds the new ciphertext to another one."""

    encrypted_data: Required[str]
    context: NotRequired[Context]
    new_context: NotRequired[Context]


class SignItem(TypedDict):
    """One item of ``sign_many``: the single form's body, with its own algorithm."""

    encrypted_data: Required[str]
    message: Required[str]
    algorithm: NotRequired[str]
    message_encoding: NotRequired[str]
    key_encoding: NotRequired[str]
    signature_encoding: NotRequired[str]
    context: NotRequired[Context]


@dataclass(frozen=True, slots=True)
class ItemResult(Generic[T]):
    """One item's outcome: its ``value``, or the ``error`` Citadel gave for that item alone.

    ``request_id`` and ``batch_index`` are the ones its audit line carries, so an
    item leads to its event. The error never holds anything the item sent.
    """

    value: T | None
    error: CitadelError | None
    request_id: str | None
    batch_index: int

    @property
    def ok(self) -> bool:
        """Whether the item succeeded."""
        return self.error is None

    def unwrap(self) -> T:
        """The value; raises the item's error when it failed."""
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


def context_payload(context: Context | None, name: str = "context") -> dict[str, str] | None:
    """A context as JSON wants it; the server checks its rules (422 for a bad one)."""
    if context is None:
        return None
    if not isinstance(context, Mapping):
        raise TypeError(f"{name} must be a mapping of strings to strings")
    return dict(context)


def items_of(
    items: Iterable[str | Mapping[str, object]], field: str, defaults: Mapping[str, object]
) -> list[dict[str, object]]:
    """Each item as the single form's body: a string is ``{field: it}``; ``defaults`` fill
    the keys an item leaves out (a shared context, a shared algorithm)."""
    out: list[dict[str, object]] = []
    for item in items:
        body: dict[str, object] = {field: item} if isinstance(item, str) else dict(item)
        for key, value in defaults.items():
            if value is not None and key not in body:
                body[key] = value
        for key in ("context", "new_context"):
            if key in body and isinstance(body[key], Mapping):
                body[key] = dict(body[key])  # type: ignore[call-overload]
        out.append(body)
    return out


# A chunk's answer: its request id and, per item, the value or the item's error.
Answer = tuple[str | None, list[str | CitadelError]]


def batch_reader(count: int, field: str) -> Callable[[httpx.Response], Answer | CitadelError]:
    """Reads a batch answer: per item the ``field`` of its result, or the item's error."""

    def read(response: httpx.Response) -> Answer | CitadelError:
        try:
            body = response.json()
        except ValueError:
            body = None
        request_id = response.headers.get("x-request-id")
        if response.status_code != 200:
            return error_of(response, body)
        results = body.get("batch") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) != count:
            return unexpected(response.status_code, request_id)
        out: list[str | CitadelError] = []
        for result in results:
            value = result.get(field) if isinstance(result, dict) else None
            error = result.get("error") if isinstance(result, dict) else None
            if isinstance(value, str):
                out.append(value)
            elif isinstance(error, dict) and isinstance(error.get("code"), str):
                cls = error_for_code(error["code"])
                detail = error.get("detail")
                if cls is CitadelError:
                    out.append(unexpected(response.status_code, request_id))
                else:
                    out.append(
                        cls(detail if isinstance(detail, str) else None, request_id=request_id)
                    )
            else:
                return unexpected(response.status_code, request_id)
        return request_id, out

    return read


def results_of(answer: Answer, wrap: Callable[[str], T]) -> list[ItemResult[T]]:
    """One chunk's answer as typed results (``wrap``: ``Plaintext`` for decrypt_many)."""
    request_id, values = answer
    return [
        ItemResult(None, value, request_id, index)
        if isinstance(value, CitadelError)
        else ItemResult(wrap(value), None, request_id, index)
        for index, value in enumerate(values)
    ]
