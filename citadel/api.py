"""The HTTP API: the four operations' bodies, the status routes, the OpenAPI document.

The operations (``/encrypt``, ``/decrypt``, ``/sign``, ``/rewrap``) are
called by the request path (:mod:`citadel.middleware`) with the raw body,
already authenticated, rate-limited, authorised by the ACL and read within
its size and time limits.
Their bodies are parsed here, not by FastAPI, for three reasons:

- The contract's body rules: UTF-8 JSON only (Python's ``json`` would also
  take UTF-16 and UTF-32), no duplicated keys (an ambiguous body is a bad
  body; ``json`` and pydantic silently keep the last), and errors that never
  name or repeat anything the client sent (pydantic names an unexpected field).
- One validation pass over a handful of string fields, instead of FastAPI's
  per-request dependency solving, which was the largest share of a request.
- The same checks for every operation, in one place.

The pydantic models below describe the bodies for the OpenAPI document only.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from citadel import signing
from citadel.errors import InvalidRequest, PayloadTooLarge
from citadel.metrics import CONTENT_TYPE_LATEST
from citadel.middleware import OPERATIONS, RequestContext
from citadel.pseudonyms import fingerprint
from citadel.service import Vault
from citadel.status import StatusReport

Handler = Callable[[RequestContext, bytes], Awaitable[bytes]]


class _DuplicateKey(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey()
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_object)


def parse_body(raw: bytes, fields: frozenset[str]) -> dict[str, Any]:
    """The body as a JSON object holding only ``fields``; ``InvalidRequest`` otherwise."""
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
    if not fields.issuperset(doc):
        raise InvalidRequest("The body has a field this operation does not define.")
    return doc


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if value is None:
        raise InvalidRequest(f"The field {name} is required.")
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"The field {name} must be a non-empty string.")
    return value


def _choice(doc: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    """One of ``allowed``; the first is the default when the field is absent."""
    value = doc.get(name, allowed[0])
    if value not in allowed:
        raise InvalidRequest(f"The field {name} must be one of: {', '.join(allowed)}.")
    return str(value)


class Operations:
    """The operation handlers: body in, response body out; errors are raised."""

    def __init__(self, vault: Vault, max_sign_message_bytes: int) -> None:
        self.vault = vault
        self._max_message = max_sign_message_bytes
        self.handlers: dict[str, Handler] = {
            "encrypt": self.encrypt,
            "decrypt": self.decrypt,
            "sign": self.sign,
            "rewrap": self.rewrap,
        }
        assert set(self.handlers) == set(OPERATIONS.values())

    _ENCRYPT = frozenset({"plaintext"})
    _CIPHERTEXT = frozenset({"encrypted_data"})
    _SIGN = frozenset(
        {
            "encrypted_data",
            "algorithm",
            "message",
            "message_encoding",
            "key_encoding",
            "signature_encoding",
        }
    )

    async def encrypt(self, ctx: RequestContext, raw: bytes) -> bytes:
        plaintext = _text(parse_body(raw, self._ENCRYPT), "plaintext")
        ciphertext = await self.vault.encrypt(plaintext)
        ctx.ct_fp = fingerprint(ciphertext)
        return orjson.dumps({"encrypted_data": ciphertext})

    async def decrypt(self, ctx: RequestContext, raw: bytes) -> bytes:
        ciphertext = _text(parse_body(raw, self._CIPHERTEXT), "encrypted_data")
        ctx.ct_fp = fingerprint(ciphertext)
        return orjson.dumps({"plaintext": await self.vault.decrypt(ciphertext)})

    async def rewrap(self, ctx: RequestContext, raw: bytes) -> bytes:
        ciphertext = _text(parse_body(raw, self._CIPHERTEXT), "encrypted_data")
        ctx.ct_fp = fingerprint(ciphertext)
        new = await self.vault.rewrap(ciphertext)
        ctx.extra = {"ct_fp_new": fingerprint(new)}
        return orjson.dumps({"encrypted_data": new})

    async def sign(self, ctx: RequestContext, raw: bytes) -> bytes:
        doc = parse_body(raw, self._SIGN)
        ciphertext = _text(doc, "encrypted_data")
        algorithm = _text(doc, "algorithm")
        key_encodings = signing.ALGORITHMS.get(algorithm)
        if key_encodings is None:
            raise InvalidRequest(
                f"The field algorithm must be one of: {', '.join(signing.ALGORITHMS)}."
            )
        text = _text(doc, "message")
        message_encoding = _choice(doc, "message_encoding", signing.MESSAGE_ENCODINGS)
        key_encoding = _choice(doc, "key_encoding", key_encodings)
        signature_encoding = _choice(doc, "signature_encoding", signing.SIGNATURE_ENCODINGS)
        message = signing.decode_message(text, message_encoding)
        if len(message) > self._max_message:
            raise PayloadTooLarge(f"The message is over {self._max_message} bytes.")
        if not message:
            raise InvalidRequest("The field message must not decode to nothing.")
        ctx.ct_fp = fingerprint(ciphertext)
        ctx.extra = {"algorithm": algorithm, "msg_fp": fingerprint(message)}
        signature = await self.vault.sign(
            ciphertext,
            algorithm=algorithm,
            message=message,
            key_encoding=key_encoding,
            signature_encoding=signature_encoding,
        )
        return orjson.dumps({"signature": signature})


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


def add_status_routes(app: FastAPI, status: StatusReport) -> None:
    """``/health``, ``/ready`` and ``/metrics``: no authentication, no audit."""

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        return _json(status.body())

    @app.get("/ready", include_in_schema=False)
    async def ready() -> Response:
        return _json(status.body(), 200 if status.ready() else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        status.refresh_gauges()
        return Response(status.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# -- the OpenAPI document -------------------------------------------------------

NonEmpty = Annotated[str, Field(min_length=1)]
_KEY_ENCODINGS: list[Any] = sorted({e for encs in signing.ALGORITHMS.values() for e in encs})


def _key_encoding_schema(schema: dict[str, Any]) -> None:
    schema.pop("default", None)
    schema["enum"] = _KEY_ENCODINGS


class EncryptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plaintext: NonEmpty


class CiphertextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encrypted_data: NonEmpty


class SignRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encrypted_data: NonEmpty
    algorithm: str = Field(json_schema_extra={"enum": list(signing.ALGORITHMS)})
    message: NonEmpty
    message_encoding: str = Field(
        "utf-8", json_schema_extra={"enum": list(signing.MESSAGE_ENCODINGS)}
    )
    # Optional but never null: the server refuses null (422), so the document
    # must not offer it, nor a null default.
    key_encoding: str = Field(
        "",  # the model only describes the body; the default depends on the algorithm
        description="Default: the first encoding the algorithm takes.",
        json_schema_extra=_key_encoding_schema,
    )
    signature_encoding: str = Field(
        "hex", json_schema_extra={"enum": list(signing.SIGNATURE_ENCODINGS)}
    )


class EncryptedData(BaseModel):
    encrypted_data: str


class PlaintextResponse(BaseModel):
    plaintext: str


class SignatureResponse(BaseModel):
    signature: str


class ErrorBody(BaseModel):
    detail: str
    code: str


class StatusBody(BaseModel):
    status: str
    service: str
    version: str
    provider: str
    breaker: str
    decrypt_providers: list[str]


_OPERATION_DOCS: dict[str, tuple[str, type[BaseModel], type[BaseModel], str]] = {
    "/encrypt": ("encrypt", EncryptRequest, EncryptedData, "Encrypt one plaintext."),
    "/decrypt": ("decrypt", CiphertextRequest, PlaintextResponse, "Decrypt one ciphertext."),
    "/sign": ("sign", SignRequest, SignatureResponse, "Sign a message with a stored secret."),
    "/rewrap": ("rewrap", CiphertextRequest, EncryptedData, "Re-encrypt under the active key."),
}
_ERROR_STATUSES = {
    "400": "invalid_ciphertext, key_retired or invalid_key",
    "401": "unauthenticated",
    "403": "forbidden",
    "404": "not_found",
    "405": "method_not_allowed",
    "408": "request_timeout",
    "413": "payload_too_large",
    "422": "invalid_request",
    "429": "rate_limited (Retry-After)",
    "431": "request headers over 64 KiB",
    "503": "provider_unavailable (Retry-After)",
}
_HEADERS = [
    {
        "name": "X-Internal-API-Key",
        "in": "header",
        "required": True,
        "schema": {"type": "string"},
    },
    {
        "name": "X-User-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:@-]{1,128}$"},
    },
    {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
    },
]


def openapi_document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document, written here because the operations are not FastAPI routes."""
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"application/json": {"schema": ref(ErrorBody)}}
    paths: dict[str, Any] = {}
    for path, (operation, request, response, summary) in _OPERATION_DOCS.items():
        responses: dict[str, Any] = {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": ref(response)}},
            }
        }
        for code, meaning in _ERROR_STATUSES.items():
            responses[code] = {"description": meaning, "content": error}
        paths[path] = {
            "post": {
                "operationId": operation,
                "summary": summary,
                "description": f"ACL operation: `{operation}`.",
                "parameters": _HEADERS,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref(request)}},
                },
                "responses": responses,
            }
        }
    status_json = {"application/json": {"schema": ref(StatusBody)}}
    paths["/health"] = {
        "get": {
            "operationId": "health",
            "responses": {"200": {"description": "Alive", "content": status_json}},
        }
    }
    paths["/ready"] = {
        "get": {
            "operationId": "ready",
            "responses": {
                "200": {"description": "Ready", "content": status_json},
                "503": {"description": "Not ready", "content": status_json},
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "responses": {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Citadel", "version": version},
        "paths": paths,
        "components": {"schemas": schemas},
    }
