"""The OpenAPI 3.1 document, generated from the models that validate the operations' bodies.

The operations are not FastAPI routes (:mod:`citadel.http.pipeline` says
why), so FastAPI cannot write their part of the document; it is built here
from the same pydantic models :mod:`citadel.http.bodies` validates with, so
``/docs`` shows exactly what is checked. The three status routes are
documented here too, with the rest.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from citadel.http.answers import (
    EncryptedBatch,
    EncryptedData,
    ErrorBody,
    PlaintextBatch,
    PlaintextResponse,
    SignatureBatch,
    SignatureResponse,
    StatusBody,
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
)
from citadel.http.head import USER_ID
from citadel.http.request_ids import VALID_REQUEST_ID

Forms = tuple[type[BaseModel], type[BaseModel]]  # the single form's model, the batch's
_OPERATION_DOCS: dict[str, tuple[str, Forms, Forms, str]] = {
    "/encrypt": (
        "encrypt",
        (EncryptRequest, EncryptBatch),
        (EncryptedData, EncryptedBatch),
        "Encrypt one plaintext, or a batch.",
    ),
    "/decrypt": (
        "decrypt",
        (DecryptRequest, DecryptBatch),
        (PlaintextResponse, PlaintextBatch),
        "Decrypt one ciphertext, or a batch.",
    ),
    "/sign": (
        "sign",
        (SignRequest, SignBatch),
        (SignatureResponse, SignatureBatch),
        "Sign a message with a stored secret, or a batch.",
    ),
    "/rewrap": (
        "rewrap",
        (RewrapRequest, RewrapBatch),
        (EncryptedData, EncryptedBatch),
        "Re-encrypt under the active key, or a batch.",
    ),
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
        "schema": {"type": "string", "pattern": USER_ID.pattern.decode()},
    },
    {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": VALID_REQUEST_ID.pattern.decode()},
    },
]


def openapi_document(version: str) -> dict[str, Any]:
    """The whole document for this ``version`` (built once, at start-up)."""
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def either(forms: Forms) -> dict[str, Any]:
        return {"oneOf": [ref(forms[0]), ref(forms[1])]}

    error = {"application/json": {"schema": ref(ErrorBody)}}
    paths: dict[str, Any] = {}
    for path, (operation, request, response, summary) in _OPERATION_DOCS.items():
        responses: dict[str, Any] = {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": either(response)}},
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
                    "content": {"application/json": {"schema": either(request)}},
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
