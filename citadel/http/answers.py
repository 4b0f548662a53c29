"""The operations' answers, as the OpenAPI document describes them.

The handlers write answers with orjson (the models would cost a validation
per answer); ``tests/test_openapi.py`` holds live answers against these
models, so the two cannot drift apart.
"""

from __future__ import annotations

from pydantic import BaseModel


class EncryptedData(BaseModel):
    """The answer of ``/encrypt`` and ``/rewrap``."""

    encrypted_data: str


class PlaintextResponse(BaseModel):
    """The answer of ``/decrypt`` (sent with ``Cache-Control: no-store``)."""

    plaintext: str


class SignatureResponse(BaseModel):
    """The answer of ``/sign``: the signature only."""

    signature: str


class ItemError(BaseModel):
    """A batch item's error: the code and detail the single form would have answered."""

    code: str
    detail: str


class ItemFailed(BaseModel):
    """A batch result for an item that failed (only for what its data caused)."""

    error: ItemError


class EncryptedBatch(BaseModel):
    """The answer of a batch ``/encrypt`` or ``/rewrap``, in the order of the items."""

    batch: list[EncryptedData | ItemFailed]


class PlaintextBatch(BaseModel):
    """The answer of a batch ``/decrypt``, in the order of the items."""

    batch: list[PlaintextResponse | ItemFailed]


class SignatureBatch(BaseModel):
    """The answer of a batch ``/sign``, in the order of the items."""

    batch: list[SignatureResponse | ItemFailed]


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
