"""The operations' request bodies: strict JSON, then the pydantic models ``/docs`` shows.

The models here are the only description of what an operation takes: the
pipeline validates every body with them, and the OpenAPI document
(:mod:`citadel.http.openapi`) is generated from them. Before pydantic sees a
body, :func:`parse` applies the contract's rules that pydantic does not:

- UTF-8 only (Python's ``json`` would also take UTF-16 and UTF-32);
- no duplicated key (an ambiguous body is a bad body; ``json`` and pydantic
  silently keep the last);
- errors that never name or repeat anything the client sent: pydantic's own
  messages name an unexpected field and carry the input, so each error is
  mapped to fixed text naming Citadel's fields only (:func:`_detail`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from citadel import signing
from citadel.errors import InvalidCiphertext, InvalidRequest
from citadel_client import MessageEncoding, SignAlgorithm, SignatureEncoding

Body = TypeVar("Body", bound=BaseModel)
Batch = TypeVar("Batch", bound=BaseModel)
# The fields a 422 may name: Citadel's own. A location part that is not one of
# them (a context's key, an unexpected field) is the client's and is never shown.
_OWN_FIELDS = frozenset(
    {
        "plaintext",
        "encrypted_data",
        "algorithm",
        "message",
        "message_encoding",
        "key_encoding",
        "signature_encoding",
        "context",
        "new_context",
        "batch",
    }
)
CONTEXT_RULE = (
    "an object of 1 to 16 pairs, keys of 1 to 64 of A-Za-z0-9_.- and values of 1 to 256 UTF-8 bytes"
)
NonEmpty = Annotated[str, Field(min_length=1)]
_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class _DuplicateKey(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey()
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_object)


def parse(
    raw: bytes, model: type[Body], batch: type[Batch] | None = None, max_items: int = 1
) -> Body | Batch:
    """``raw`` as an instance of ``model`` (or ``batch``); else 422 with fixed text only.

    A batch may hold at most ``max_items`` items, counted before any item is
    validated: a body of half a million tiny items must cost no more than one
    of a hundred.
    """
    if len(raw) > _SCAN_FROM and not _plausible(raw, max_items):
        raise InvalidRequest("The body does not fit the schema.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The body is not UTF-8.") from None
    try:
        doc = _DECODER.decode(text)
    except _DuplicateKey:
        raise InvalidRequest("The body has a duplicated key.") from None
    except (ValueError, RecursionError):
        raise InvalidRequest("The body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("The body must be a JSON object.")
    is_batch = batch is not None and "batch" in doc
    if is_batch and isinstance(doc["batch"], list) and len(doc["batch"]) > max_items:
        raise InvalidRequest(f"The batch has more than {max_items} items.")
    chosen: type[BaseModel] = batch if is_batch and batch is not None else model
    try:
        # The model's own validator: model_validate only wraps it, at a third of the cost.
        return chosen.__pydantic_validator__.validate_python(doc)  # type: ignore[no-any-return]
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        if first["type"] == "string_unicode" and first["loc"] == ("encrypted_data",):
            # Valid JSON, but not text (a lone surrogate): no ciphertext looks like
            # that, so it is a malformed ciphertext (400), as any other. In a
            # batch the item cannot even be held: the batch does not fit (422).
            raise InvalidCiphertext() from None
        raise InvalidRequest(_detail(exc)) from None


# Bodies up to this size are parsed whatever they hold: their parse is cheap.
_SCAN_FROM = 64 * 1024
# Per item, more than any valid item holds: 6 fields and a context of 16 pairs
# are at most 45 strings (90 quotes), 23 colons and 23 commas.
_QUOTES_PER_ITEM = 100
_PUNCTUATION_PER_ITEM = 50


def _plausible(raw: bytes, max_items: int) -> bool:
    """Whether a large body's structure could be a valid request, without parsing it.

    Parsing is what a hostile body makes expensive: millions of tiny objects,
    arrays or numbers cost a second of the event loop in any JSON parser,
    however few items they claim to be. A valid body has a small, bounded
    structure (one array, two objects per item, a few dozen strings), so it is
    counted first, outside strings (escaped backslashes and quotes removed,
    then split at the remaining quotes, at most as many times as a valid body
    could need), at the speed of a byte copy.
    """
    items = max_items + 1
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    parts = text.split(b'"', _QUOTES_PER_ITEM * items)
    if len(parts) > _QUOTES_PER_ITEM * items:
        return False
    outside = b"".join(parts[::2])
    punctuation = outside.count(b",") + outside.count(b":")
    return (
        outside.count(b"[") <= 1
        and outside.count(b"{") <= 2 * items
        and punctuation <= _PUNCTUATION_PER_ITEM * items
    )


def _detail(exc: ValidationError) -> str:
    """Fixed text for the first error: Citadel's field names, never the client's, never input."""
    error = exc.errors(include_url=False, include_input=False, include_context=True)[0]
    kind = error["type"]
    if kind == "extra_forbidden" and len(error["loc"]) <= 3:
        # Its location is the client's own field name: never repeated.
        return "The body has a field this operation does not define."
    parts: list[str] = []
    for part in error["loc"]:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part in _OWN_FIELDS:
            parts.append(f".{part}" if parts else part)
        else:
            break
    field = "".join(parts)
    if field.endswith("context"):
        return f"The field {field} must be {CONTEXT_RULE}."
    if kind == "missing":
        return f"The field {field} is required."
    if kind in ("string_type", "string_too_short"):
        return f"The field {field} must be a non-empty string."
    if kind == "too_short" and field.endswith("batch"):
        return "The field batch must hold at least one item."
    if kind == "choice":  # raised below, with Citadel's own text
        return str(error["msg"])
    choices = _CHOICES.get(field.rsplit(".", 1)[-1])
    if kind == "literal_error" and choices is not None:
        return f"The field {field} must be one of: {', '.join(choices)}."
    return f"The field {field} has a wrong type or value."


def _choice(field: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise PydanticCustomError(
            "choice", "The field {field} must be one of: {allowed}.", _ctx(field, allowed)
        )
    return value


def _ctx(field: str, allowed: tuple[str, ...]) -> dict[str, str]:
    return {"field": field, "allowed": ", ".join(allowed)}


def _within_256_bytes(value: str) -> str:
    if len(value.encode()) > 256:
        raise PydanticCustomError("context_value", "too long")
    return value


ContextKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
ContextValue = Annotated[str, Field(min_length=1), AfterValidator(_within_256_bytes)]
EncryptionContext = Annotated[
    dict[ContextKey, ContextValue],
    Field(
        min_length=1,
        max_length=16,
        description="The pairs the ciphertext is bound to: " + CONTEXT_RULE + ".",
    ),
]


def _not_null(value: Any) -> Any:
    # Optional, never null: an explicit null is refused like any wrong type.
    if value is None:
        raise PydanticCustomError("null", "null")
    return value


NotNull = BeforeValidator(_not_null)
OptionalContext = Annotated[EncryptionContext | None, NotNull]


class EncryptRequest(BaseModel):
    """``POST /encrypt``: one plaintext (its limits are checked by the vault), maybe a context."""

    model_config = _STRICT
    plaintext: NonEmpty
    context: OptionalContext = None


class DecryptRequest(BaseModel):
    """``POST /decrypt``: one ciphertext, with the context it was made with (if any)."""

    model_config = _STRICT
    encrypted_data: NonEmpty
    context: OptionalContext = None


class RewrapRequest(BaseModel):
    """``POST /rewrap``: one ciphertext and its context; ``new_context`` replaces the context."""

    model_config = _STRICT
    encrypted_data: NonEmpty
    context: OptionalContext = None
    new_context: OptionalContext = Field(
        None, description="Bind the new ciphertext to this context instead of `context`."
    )


_KEY_ENCODINGS: list[Any] = sorted({e for encs in signing.ALGORITHMS.values() for e in encs})


def _key_encoding_schema(schema: dict[str, Any]) -> None:
    schema.pop("default", None)
    schema["enum"] = _KEY_ENCODINGS


# The choices pydantic checks itself (in Rust: a Python validator per field cost
# more than the rest of the body's validation), as the client's types spell
# them; tests/test_openapi.py keeps them equal to citadel.signing's tables.
_CHOICES = {
    "algorithm": tuple(signing.ALGORITHMS),
    "message_encoding": signing.MESSAGE_ENCODINGS,
    "signature_encoding": signing.SIGNATURE_ENCODINGS,
}


class SignRequest(BaseModel):
    """``POST /sign``: a ciphertext of a secret, what to sign, and how (see the contract)."""

    model_config = _STRICT
    encrypted_data: NonEmpty
    algorithm: SignAlgorithm
    message: NonEmpty
    message_encoding: MessageEncoding = "utf-8"
    # Optional but never null: null is refused (422), so the document offers
    # neither null nor a default (the default depends on the algorithm).
    key_encoding: str = Field(
        "",
        description="Default: the first encoding the algorithm takes.",
        json_schema_extra=_key_encoding_schema,
    )
    signature_encoding: SignatureEncoding = "hex"
    context: OptionalContext = None

    @model_validator(mode="after")
    def _key_encoding_for_algorithm(self) -> SignRequest:
        allowed = signing.ALGORITHMS[self.algorithm]
        if "key_encoding" not in self.model_fields_set:
            object.__setattr__(self, "key_encoding", allowed[0])
        else:
            _choice("key_encoding", self.key_encoding, allowed)
        return self


Items = Field(min_length=1, description="1 to CITADEL_MAX_BATCH_ITEMS items (default 100).")


class EncryptBatch(BaseModel):
    """``POST /encrypt`` with many items: each one the body of the single form."""

    model_config = _STRICT
    batch: list[EncryptRequest] = Items


class DecryptBatch(BaseModel):
    """``POST /decrypt`` with many items."""

    model_config = _STRICT
    batch: list[DecryptRequest] = Items


class SignBatch(BaseModel):
    """``POST /sign`` with many items, each with its own algorithm and encodings."""

    model_config = _STRICT
    batch: list[SignRequest] = Items


class RewrapBatch(BaseModel):
    """``POST /rewrap`` with many items."""

    model_config = _STRICT
    batch: list[RewrapRequest] = Items
