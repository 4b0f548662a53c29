"""Routes: a few lines each; the work happens in :class:`citadel.service.Vault`."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.responses import Response

from citadel.audit import fingerprint
from citadel.metrics import CONTENT_TYPE_LATEST
from citadel.middleware import RequestContext
from citadel.service import Vault
from citadel.status import StatusReport

router = APIRouter()


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


def _context(request: Request) -> RequestContext:
    ctx: RequestContext = request.scope["citadel"]
    return ctx


def _vault(request: Request) -> Vault:
    vault: Vault = request.app.state.vault
    return vault


def _status(request: Request) -> StatusReport:
    report: StatusReport = request.app.state.status
    return report


Context = Annotated[RequestContext, Depends(_context)]
VaultDep = Annotated[Vault, Depends(_vault)]
Status = Annotated[StatusReport, Depends(_status)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 413, 422, 429, 503)
}


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


@router.post("/encrypt", response_model=EncryptResponse, responses=_ERRORS)
async def encrypt(body: EncryptRequest, ctx: Context, vault: VaultDep) -> Response:
    """Encrypt one plaintext for the calling service (ACL: ``encrypt``)."""
    assert ctx.caller is not None  # the middleware answered 401 otherwise
    ciphertext = await vault.encrypt(ctx.caller, body.plaintext)
    ctx.ct_fp = fingerprint(ciphertext)
    return _json({"encrypted_data": ciphertext})


@router.post("/decrypt", response_model=DecryptResponse, responses=_ERRORS)
async def decrypt(body: DecryptRequest, ctx: Context, vault: VaultDep) -> Response:
    """Decrypt one ciphertext for the calling service (ACL: ``decrypt``); never cached."""
    assert ctx.caller is not None
    ctx.ct_fp = fingerprint(body.encrypted_data)
    plaintext = await vault.decrypt(ctx.caller, body.encrypted_data)
    return _json({"plaintext": plaintext})


@router.get("/health")
async def health(status: Status) -> Response:
    """Liveness and state; no authentication, no setting's value."""
    return _json(status.body())


@router.get("/ready")
async def ready(status: Status) -> Response:
    """200 when the provider can serve, else 503; same body as ``/health``."""
    return _json(status.body(), 200 if status.ready() else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    status: StatusReport = request.app.state.status
    status.refresh_gauges()
    return Response(status.metrics.render(), media_type=CONTENT_TYPE_LATEST)
