"""Routes: a few lines each; the work happens in :class:`citadel.service.Vault`."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.responses import Response

from citadel.audit import fingerprint
from citadel.metrics import CONTENT_TYPE_LATEST
from citadel.middleware import RequestContext
from citadel.service import Vault
from citadel.status import StatusReport


class EncryptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plaintext: Annotated[StrictStr, Field(min_length=1)]


class DecryptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encrypted_data: Annotated[StrictStr, Field(min_length=1)]


class EncryptResponse(BaseModel):
    encrypted_data: str


class DecryptResponse(BaseModel):
    plaintext: str


class ErrorBody(BaseModel):
    detail: str
    code: str


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 413, 422, 429, 503)
}


def add_routes(router: APIRouter | FastAPI, vault: Vault, status: StatusReport) -> None:
    """Add the routes to ``router``, bound to this app's vault and status.

    The parts are closed over rather than injected with ``Depends``: FastAPI
    resolves dependencies on every request, which measurably costs throughput
    here, and the parts never change after start-up. The per-request context
    comes from the middleware through the ASGI scope. They are added to the
    app itself, not through ``include_router``, which adds a second routing pass.
    """

    @router.post("/encrypt", response_model=EncryptResponse, responses=_ERRORS)
    async def encrypt(body: EncryptRequest, request: Request) -> Response:
        """Encrypt one plaintext for the calling service (ACL: ``encrypt``)."""
        ctx: RequestContext = request.scope["citadel"]
        assert ctx.caller is not None  # the middleware answered 401 otherwise
        ciphertext = await vault.encrypt(ctx.caller, body.plaintext)
        ctx.ct_fp = fingerprint(ciphertext)
        return _json({"encrypted_data": ciphertext})

    @router.post("/decrypt", response_model=DecryptResponse, responses=_ERRORS)
    async def decrypt(body: DecryptRequest, request: Request) -> Response:
        """Decrypt one ciphertext for the calling service (ACL: ``decrypt``); never cached."""
        ctx: RequestContext = request.scope["citadel"]
        assert ctx.caller is not None
        ctx.ct_fp = fingerprint(body.encrypted_data)
        plaintext = await vault.decrypt(ctx.caller, body.encrypted_data)
        return _json({"plaintext": plaintext})

    @router.get("/health")
    async def health() -> Response:
        """Liveness and state; no authentication, no setting's value."""
        return _json(status.body())

    @router.get("/ready")
    async def ready() -> Response:
        """200 when the provider can serve, else 503; same body as ``/health``."""
        return _json(status.body(), 200 if status.ready() else 503)

    @router.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        status.refresh_gauges()
        return Response(status.metrics.render(), media_type=CONTENT_TYPE_LATEST)
