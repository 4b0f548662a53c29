"""The header fields of an operation's request that the pipeline acts on, read in one pass.

Header names arrive lower-cased from the parser; values keep their bytes
until a step needs them. Surrounding whitespace is ignored (RFC 9110), and
repeats are remembered rather than resolved: a repeated key, user id or
request id is the pipeline's to refuse, with the status the contract gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from citadel.errors import InvalidRequest, PayloadTooLarge

USER_ID = re.compile(rb"^[A-Za-z0-9_.:@-]{1,128}$")
_OWS = b" \t"


@dataclass(slots=True)
class RequestHead:
    """What one request's headers say, before anything is believed."""

    api_key: bytes | None = None
    user_id: bytes | None = None
    request_ids: tuple[bytes, ...] = ()
    content_length: bytes | None = None
    forwarded_for: bytes | None = None
    repeated_key: bool = False
    repeated_user: bool = False

    @classmethod
    def read(cls, headers: list[tuple[bytes, bytes]]) -> RequestHead:
        """One pass over the fields; the last value of a repeated field is kept, and flagged."""
        head = cls()
        request_ids: list[bytes] = []
        for name, value in headers:
            if name == b"x-internal-api-key":
                head.repeated_key = head.api_key is not None
                head.api_key = value.strip(_OWS)
            elif name == b"x-user-id":
                head.repeated_user = head.repeated_user or head.user_id is not None
                head.user_id = value
            elif name == b"x-request-id":
                request_ids.append(value)
            elif name == b"content-length":
                head.content_length = value if head.content_length is None else b"repeated"
            elif name == b"x-forwarded-for":
                previous = head.forwarded_for
                head.forwarded_for = value if previous is None else previous + b"," + value
        head.request_ids = tuple(request_ids)
        return head

    def check_repeats(self) -> None:
        """``X-User-ID`` and ``X-Request-ID`` may each be sent once (422 otherwise)."""
        if self.repeated_user or len(self.request_ids) > 1:
            raise InvalidRequest("X-User-ID and X-Request-ID may each be sent once.")

    def end_user(self) -> str | None:
        """The end user named by ``X-User-ID``, checked against the contract's alphabet."""
        if self.user_id is None:
            return None
        user = self.user_id.strip(_OWS)
        if not USER_ID.match(user):
            raise InvalidRequest("X-User-ID must be 1 to 128 of A-Za-z0-9_.:@-.")
        return user.decode()

    def check_length(self, limit: int) -> None:
        """``Content-Length`` against ``limit`` before the body is read; digits only."""
        if self.content_length is None:
            return
        length = self.content_length.strip(_OWS)
        if not length.isdigit():
            raise InvalidRequest("Content-Length is not one decimal number.")
        digits = length.lstrip(b"0")
        # Compare lengths first: int() of thousands of digits is slow, then refused.
        if len(digits) > len(str(limit)) or int(digits or b"0") > limit:
            raise PayloadTooLarge()
