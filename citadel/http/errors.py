"""The one place where Citadel's errors become HTTP responses.

Bodies are ``{"detail", "code"}`` and built only from the error's fixed text,
so no value from the request can appear in them. FastAPI's default 422 handler
echoes the input (a plaintext, say); it is replaced here, as are its 404 and
405 bodies.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from citadel.errors import CitadelError, InvalidRequest, MethodNotAllowed

_STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}


def post_only() -> MethodNotAllowed:
    """The 405 of an operation's path: the operations take POST only."""
    return MethodNotAllowed(headers=(("Allow", "POST"),))


def error_parts(err: CitadelError) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, body and the headers particular to ``err`` (Retry-After, Allow)."""
    body = orjson.dumps({"detail": err.detail, "code": err.code})
    headers = []
    if err.retry_after is not None:
        headers.append((b"retry-after", str(max(0, int(err.retry_after))).encode()))
    headers.extend((name.lower().encode(), value.encode()) for name, value in err.headers)
    return err.status, body, headers


def error_response(err: CitadelError) -> Response:
    """``err`` as a Starlette response, for the paths FastAPI serves."""
    status, body, headers = error_parts(err)
    response = Response(content=body, status_code=status, media_type="application/json")
    response.raw_headers.extend([(b"cache-control", b"no-store"), *headers])
    return response


def install_error_handlers(app: FastAPI) -> None:
    """Contract-shaped bodies for what FastAPI answers itself (404, 405, bad bodies)."""

    async def on_citadel_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CitadelError)
        return error_response(exc)

    async def on_validation_error(_request: Request, _exc: Exception) -> Response:
        return error_response(InvalidRequest())

    async def on_http_exception(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        body = orjson.dumps({"detail": _plain_detail(exc.status_code), "code": code})
        headers = dict(exc.headers or {})
        return Response(body, exc.status_code, headers=headers, media_type="application/json")

    app.add_exception_handler(CitadelError, on_citadel_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)


def _plain_detail(status: int) -> str:
    try:
        return HTTPStatus(status).phrase + "."
    except ValueError:
        return "Error."
