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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from citadel import signing
from citadel.errors import InvalidCiphertext, InvalidRequest

Body = TypeVar("Body", bound=BaseModel)
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


def parse(raw: bytes, model: type[Body]) -> Body:
    """``raw`` as an instance of ``model``; else ``InvalidRequest`` (422), fixed text only."""
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
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        if first["type"] == "string_unicode" and first["loc"][-1:] == ("encrypted_data",):
            # Valid JSON, but not text (a lone surrogate): no ciphertext looks like
            # that, so it is a malformed ciphertext (400), as any other.
            raise InvalidCiphertext() from None
        raise InvalidRequest(_detail(exc)) from None


def _detail(exc: ValidationError) -> str:
    """Fixed text for the first error: Citadel's field names, never the client's, never input."""
    error = exc.errors(include_url=False, include_input=False, include_context=True)[0]
    kind = error["type"]
    if kind == "extra_forbidden":
        # Its location is the client's own field name: never repeated.
        return "The body has a field this operation does not define."
    field = ".".join(str(part) for part in error["loc"] if isinstance(part, str))
    if kind == "missing":
        return f"The field {field} is required."
    if kind in ("string_type", "string_too_short"):
        return f"The field {field} must be a non-empty string."
    if kind == "choice":  # raised below, with Citadel's own text
        return str(error["msg"])
    return f"The field {field} has a wrong type or value."


def _choice(field: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise PydanticCustomError(
            "choice", "The field {field} must be one of: {allowed}.", _ctx(field, allowed)
        )
    return value


def _ctx(field: str, allowed: tuple[str, ...]) -> dict[str, str]:
    return {"field": field, "allowed": ", ".join(allowed)}


class EncryptRequest(BaseModel):
    """``POST /encrypt``: one plaintext (its UTF-8 size is checked by the vault)."""

    model_config = _STRICT
    plaintext: NonEmpty


class CiphertextRequest(BaseModel):
    """``POST /decrypt`` and ``POST /rewrap``: one ciphertext."""

    model_config = _STRICT
    encrypted_data: NonEmpty


_KEY_ENCODINGS: list[Any] = sorted({e for encs in signing.ALGORITHMS.values() for e in encs})


def _key_encoding_schema(schema: dict[str, Any]) -> None:
    schema.pop("default", None)
    schema["enum"] = _KEY_ENCODINGS


class SignRequest(BaseModel):
    """``POST /sign``: a ciphertext of a secret, what to sign, and how (see the contract)."""

    model_config = _STRICT
    encrypted_data: NonEmpty
    algorithm: str = Field(json_schema_extra={"enum": list(signing.ALGORITHMS)})
    message: NonEmpty
    message_encoding: str = Field(
        signing.MESSAGE_ENCODINGS[0], json_schema_extra={"enum": list(signing.MESSAGE_ENCODINGS)}
    )
    # Optional but never null: null is refused (422), so the document offers
    # neither null nor a default (the default depends on the algorithm).
    key_encoding: str = Field(
        "",
        description="Default: the first encoding the algorithm takes.",
        json_schema_extra=_key_encoding_schema,
    )
    signature_encoding: str = Field(
        signing.SIGNATURE_ENCODINGS[0],
        json_schema_extra={"enum": list(signing.SIGNATURE_ENCODINGS)},
    )

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        return _choice("algorithm", value, tuple(signing.ALGORITHMS))

    @field_validator("message_encoding")
    @classmethod
    def _known_message_encoding(cls, value: str) -> str:
        return _choice("message_encoding", value, signing.MESSAGE_ENCODINGS)

    @field_validator("signature_encoding")
    @classmethod
    def _known_signature_encoding(cls, value: str) -> str:
        return _choice("signature_encoding", value, signing.SIGNATURE_ENCODINGS)

    @model_validator(mode="after")
    def _key_encoding_for_algorithm(self) -> SignRequest:
        allowed = signing.ALGORITHMS[self.algorithm]
        if "key_encoding" not in self.model_fields_set:
            object.__setattr__(self, "key_encoding", allowed[0])
        else:
            _choice("key_encoding", self.key_encoding, allowed)
        return self


class EncryptedData(BaseModel):
    """The answer of ``/encrypt`` and ``/rewrap``."""

    encrypted_data: str


class PlaintextResponse(BaseModel):
    """The answer of ``/decrypt`` (sent with ``Cache-Control: no-store``)."""

    plaintext: str


class SignatureResponse(BaseModel):
    """The answer of ``/sign``: the signature only."""

    signature: str


class ErrorBody(BaseModel):
    """Every error's body: fixed text for a person and the contract's stable code."""

    detail: str
    code: str


class StatusBody(BaseModel):
    """The body of ``/health`` and ``/ready``."""

    status: str
    service: str
    version: str
    provider: str
    breaker: str
    decrypt_providers: list[str]
