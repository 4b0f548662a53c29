"""One description of each operation: what /docs shows is what the server validates and sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel
from support import Served, headers, make_settings, serve_citadel

from citadel import signing
from citadel.http.answers import (
    EncryptedData,
    ErrorBody,
    PlaintextResponse,
    SignatureResponse,
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

REQUESTS: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "encrypt": (EncryptRequest, EncryptBatch),
    "decrypt": (DecryptRequest, DecryptBatch),
    "sign": (SignRequest, SignBatch),
    "rewrap": (RewrapRequest, RewrapBatch),
}
ANSWERS: dict[str, type[BaseModel]] = {
    "encrypt": EncryptedData,
    "decrypt": PlaintextResponse,
    "sign": SignatureResponse,
    "rewrap": EncryptedData,
}
ACL = {"sentinel": ["encrypt"], "conductor": ["decrypt", "sign", "rewrap"]}


@pytest.fixture
def served(tmp_path: Path) -> Any:
    with serve_citadel(make_settings(tmp_path, acl=ACL)) as s:
        yield s


def _schema_of(
    document: dict[str, Any], operation: str, part: str, form: int = 0
) -> dict[str, Any]:
    """The documented schema of an operation's single form (0) or batch form (1)."""
    post = document["paths"][f"/{operation}"]["post"]
    if part == "request":
        content = post["requestBody"]["content"]
    else:
        content = post["responses"]["200"]["content"]
    ref: str = content["application/json"]["schema"]["oneOf"][form]["$ref"]
    schema: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return schema


@pytest.mark.parametrize("form", [0, 1], ids=["single", "batch"])
@pytest.mark.parametrize("operation", sorted(REQUESTS))
def test_the_documented_request_schema_is_the_validating_models(
    served: Served, operation: str, form: int
) -> None:
    with served.client() as c:
        document = c.get("/openapi.json").json()
    model = REQUESTS[operation][form]
    expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
    expected.pop("$defs", None)
    assert _schema_of(document, operation, "request", form) == expected


@pytest.mark.parametrize("operation", sorted(ANSWERS))
def test_a_live_answer_has_exactly_the_documented_fields(served: Served, operation: str) -> None:
    with served.client() as c:
        r = c.post("/encrypt", json={"plaintext": "hmac-secret"}, headers=headers("sentinel"))
        ct = r.json()["encrypted_data"]
        bodies = {
            "encrypt": {"plaintext": "x"},
            "decrypt": {"encrypted_data": ct},
            "rewrap": {"encrypted_data": ct},
            "sign": {"encrypted_data": ct, "algorithm": "hmac-sha256", "message": "m"},
        }
        caller = "sentinel" if operation == "encrypt" else "conductor"
        r = c.post(f"/{operation}", json=bodies[operation], headers=headers(caller))
        document = c.get("/openapi.json").json()
    assert r.status_code == 200
    documented = _schema_of(document, operation, "response")
    assert set(r.json()) == set(documented["properties"])
    ANSWERS[operation].model_validate(r.json(), strict=True)


def test_an_error_answer_has_exactly_the_documented_fields(served: Served) -> None:
    with served.client() as c:
        r = c.post("/encrypt", json={"plaintext": ""}, headers=headers("sentinel"))
    assert r.status_code == 422
    assert set(r.json()) == set(ErrorBody.model_fields)


@pytest.mark.parametrize(
    ("field", "allowed"),
    [
        ("algorithm", tuple(signing.ALGORITHMS)),
        ("message_encoding", signing.MESSAGE_ENCODINGS),
        ("signature_encoding", signing.SIGNATURE_ENCODINGS),
    ],
)
def test_the_sign_models_choices_are_the_signing_modules(
    field: str, allowed: tuple[str, ...]
) -> None:
    # The model spells its choices out as Literal types (pydantic checks them
    # without a Python call); they must be exactly what signing.py implements.
    assert get_args(SignRequest.model_fields[field].annotation) == allowed
    schema = SignRequest.model_json_schema()["properties"][field]
    assert tuple(schema["enum"]) == allowed
