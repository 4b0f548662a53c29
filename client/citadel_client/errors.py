"""Citadel's errors: one class per stable error code of the contract.

This module is the only definition. The same tree serves the server (which
re-exports it as ``citadel.errors``, raises it from the service layer and maps
it to HTTP in one handler) and the client (raised from a response's ``code``),
so a caller catches by meaning, never by message text::

    CitadelError               500 internal_error        (the base: an unknown code or answer)
    ├── InternalError          500 internal_error        (Citadel failed on its side)
    ├── BadRequest             400 bad_request           (not HTTP/1.1 or untrustworthy framing)
    ├── Unauthenticated        401 unauthenticated
    ├── Forbidden              403 forbidden
    ├── PayloadTooLarge        413 payload_too_large
    ├── InvalidRequest         422 invalid_request
    ├── InvalidCiphertext      400 invalid_ciphertext
    ├── KeyRetired             400 key_retired
    ├── InvalidKey             400 invalid_key           (/sign: the secret is not such a key)
    ├── NotFound               404 not_found
    ├── MethodNotAllowed       405 method_not_allowed
    ├── RequestTimeout         408 request_timeout
    ├── HeadersTooLarge        431 headers_too_large
    ├── RateLimited            429 rate_limited          (retry_after)
    └── ProviderUnavailable    503 provider_unavailable  (retry_after)
    │   └── AuditUnavailable   503 provider_unavailable  (the audit log, not the provider)
    └── CitadelConnectionError 0   connection_error      (client only: no HTTP answer)

Messages are fixed text for a person. No error ever carries a value from the
request: the constructors take no such argument, so none can leak into a body,
a log line or a traceback.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuditUnavailable",
    "BadRequest",
    "CitadelConnectionError",
    "CitadelError",
    "Forbidden",
    "HeadersTooLarge",
    "InternalError",
    "InvalidCiphertext",
    "InvalidKey",
    "InvalidRequest",
    "KeyRetired",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "ProviderUnavailable",
    "RateLimited",
    "RequestTimeout",
    "Unauthenticated",
    "error_for_code",
]


class CitadelError(Exception):
    """Base of every error Citadel raises; ``code`` and ``status`` come from the contract."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    default_detail: ClassVar[str] = "Internal error."

    def __init__(
        self,
        detail: str | None = None,
        *,
        request_id: str | None = None,
        retry_after: int | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.detail = detail or self.default_detail
        self.request_id = request_id
        self.retry_after = retry_after
        self.headers = headers
        super().__init__(self.detail)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, status={self.status}, "
            f"request_id={self.request_id!r}, retry_after={self.retry_after!r})"
        )

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


class InternalError(CitadelError):
    """Citadel failed on its side (a bug or a fault, not the request); the body says no more."""

    code = "internal_error"
    status = 500
    default_detail = "Internal error."


class BadRequest(CitadelError):
    """The request was not valid HTTP/1.1, or its framing could not be trusted.

    Citadel's HTTP parser refused it and closed the connection; a client sending
    well-formed requests (this one does) should never see it.
    """

    code = "bad_request"
    status = 400
    default_detail = "The request is not valid HTTP/1.1."


class Unauthenticated(CitadelError):
    """401: the API key is missing, unknown or repeated."""

    code = "unauthenticated"
    status = 401
    default_detail = "Missing or unknown X-Internal-API-Key."


class Forbidden(CitadelError):
    """403: the caller is known but the ACL does not give it this operation."""

    code = "forbidden"
    status = 403
    default_detail = "This caller may not perform this operation."


class PayloadTooLarge(CitadelError):
    """413: the body, a plaintext or a message is over its size limit."""

    code = "payload_too_large"
    status = 413
    default_detail = "The request body is over the size limit."


class InvalidRequest(CitadelError):
    """422: the body does not fit the schema (the detail never repeats it)."""

    code = "invalid_request"
    status = 422
    default_detail = "The request does not fit the schema."


class InvalidCiphertext(CitadelError):
    """400: malformed, of another key or app, tampered with, or the wrong context."""

    code = "invalid_ciphertext"
    status = 400
    default_detail = "The ciphertext is malformed, from another key, or tampered with."


class KeyRetired(CitadelError):
    """400: the ciphertext names a retired keyring key (rewrap it, or restore the key)."""

    code = "key_retired"
    status = 400
    default_detail = (
        "The ciphertext names a retired keyring key; rewrap it under a key in force "
        "or restore the key."
    )


class InvalidKey(CitadelError):
    """400: ``/sign``: the decrypted secret is not a key of this algorithm and encoding."""

    code = "invalid_key"
    status = 400
    default_detail = "The decrypted secret is not a key of this algorithm and key_encoding."


class NotFound(CitadelError):
    """No such path (a trailing slash included: Citadel never redirects)."""

    code = "not_found"
    status = 404
    default_detail = "Not Found."


class MethodNotAllowed(CitadelError):
    """A method the path does not take (the operations take POST only)."""

    code = "method_not_allowed"
    status = 405
    default_detail = "Method Not Allowed."


class RequestTimeout(CitadelError):
    """408: the body did not arrive within the server's read timeout."""

    code = "request_timeout"
    status = 408
    default_detail = "The request body did not arrive in time."


class HeadersTooLarge(CitadelError):
    """The request headers (or a chunked body's trailers) were over 64 KiB."""

    code = "headers_too_large"
    status = 431
    default_detail = "The request headers are over 64 KiB."


class RateLimited(CitadelError):
    """429: a rate limit is exceeded; ``retry_after`` says when to try again."""

    code = "rate_limited"
    status = 429
    default_detail = "Rate limit exceeded."


class ProviderUnavailable(CitadelError):
    """503: the provider, its breaker or the audit log; ``retry_after`` is set."""

    code = "provider_unavailable"
    status = 503
    default_detail = "The encryption provider is unavailable; retry later."


class AuditUnavailable(ProviderUnavailable):
    """The audit event could not be written, so the operation was refused (fail-closed).

    The contract has one 503 code; callers retry both the same way, so this keeps
    ``provider_unavailable`` and differs only in its message and class.
    """

    default_detail = "The audit log is unavailable; the operation was not performed."


class CitadelConnectionError(CitadelError):
    """Citadel could not be reached or did not answer in time, after retries.

    Raised by the client for refused or broken connections, DNS failures and
    timeouts (an httpx ``TransportError``). Its ``status`` is 0: there was no
    HTTP answer. The detail names only the kind of failure, never the request.
    Not a contract code: the server never sends it.
    """

    code = "connection_error"
    status = 0
    default_detail = "Citadel could not be reached."


_BY_CODE: dict[str, type[CitadelError]] = {
    cls.code: cls
    for cls in (
        InternalError,
        BadRequest,
        Unauthenticated,
        Forbidden,
        PayloadTooLarge,
        InvalidRequest,
        InvalidCiphertext,
        KeyRetired,
        InvalidKey,
        NotFound,
        MethodNotAllowed,
        RequestTimeout,
        HeadersTooLarge,
        RateLimited,
        ProviderUnavailable,
    )
}


def error_for_code(code: str) -> type[CitadelError]:
    """The error class for a contract code; unknown codes map to the base class."""
    return _BY_CODE.get(code, CitadelError)
