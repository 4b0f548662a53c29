"""The answers the protocol sends itself, before or beside the application.

A refusal is complete HTTP/1.1 bytes (JSON with a code, ``Connection:
close``) except for its ``X-Request-ID``, added when it is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

# Set in a request's scope when the protocol refuses its body while the
# pipeline is still reading it, so the audit line names the code the client got.
SCOPE_KEY = "citadel.refused"


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refusal: its code, its head (less the request id and blank line), its body."""

    code: str
    head: bytes
    body: bytes

    @classmethod
    def build(cls, status: int, reason: bytes, code: str, detail: str) -> Refusal:
        """The refusal with this status line, code and fixed detail (never a request's value)."""
        body = orjson.dumps({"detail": detail, "code": code})
        head = b"".join(
            [
                b"HTTP/1.1 %d %s\r\n" % (status, reason),
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"cache-control: no-store\r\n",
                b"connection: close\r\n",
            ]
        )
        return cls(code, head, body)

    def bytes_with(self, request_id: bytes) -> bytes:
        """The whole answer, carrying ``request_id``."""
        return b"%sx-request-id: %s\r\n\r\n%s" % (self.head, request_id, self.body)


HEADERS_TOO_LARGE = Refusal.build(
    431,
    b"Request Header Fields Too Large",
    "headers_too_large",
    "The request headers are over 64 KiB.",
)
BAD_REQUEST = Refusal.build(
    400, b"Bad Request", "bad_request", "The request is not valid HTTP/1.1."
)
HEAD_TIMEOUT = Refusal.build(
    408, b"Request Timeout", "request_timeout", "The request headers did not arrive in time."
)
