"""The one place where Citadel's errors become HTTP responses.

Bodies are ``{"detail", "code"}`` and built only from the error's fixed text,
so no value from the request can appear in them. FastAPI's default 422 handler
echoes the input (a plaintext, say); it is replaced here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from citadel.errors import CitadelError, InvalidRequest

if TYPE_CHECKING:
    from citadel.middleware import RequestContext

log = structlog.get_logger("citadel")

_STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}


def error_parts(err: CitadelError) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, body and headers for ``err``; shared by the middleware and the handlers."""
    body = orjson.dumps({"detail": err.detail, "code": err.code})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if err.retry_after is not None:
        headers.append((b"retry-after", str(max(0, int(err.retry_after))).encode()))
    headers.extend((name.lower().encode(), value.encode()) for name, value in err.headers)
    return err.status, body, headers


def error_response(err: CitadelError, request: Request) -> Response:
    ctx: RequestContext | None = request.scope.get("citadel")
    if ctx is not None:
        ctx.code = err.code
    status, body, headers = error_parts(err)
    response = Response(content=body, status_code=status)
    response.raw_headers = headers
    return response


def _describe_validation(exc: RequestValidationError) -> str:
    # Locations and error types only: pydantic's messages and ``input`` can
    # repeat what the client sent.
    where = []
    for error in exc.errors()[:5]:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        where.append(f"{loc} ({error.get('type', 'invalid')})")
    return "The request does not fit the schema: " + ", ".join(where) + "."


def install_error_handlers(app: FastAPI) -> None:
    async def on_citadel_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CitadelError)
        return error_response(exc, request)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(InvalidRequest(_describe_validation(exc)), request)

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            # FastAPI's wording for a body it could not read; same meaning as a 422.
            return error_response(InvalidRequest(), request)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        ctx: RequestContext | None = request.scope.get("citadel")
        if ctx is not None:
            ctx.code = code
        body = orjson.dumps({"detail": _plain_detail(exc.status_code), "code": code})
        headers = dict(exc.headers or {})
        return Response(body, exc.status_code, headers=headers, media_type="application/json")

    app.add_exception_handler(CitadelError, on_citadel_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)


def _plain_detail(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase + "."
    except ValueError:
        return "Error."
