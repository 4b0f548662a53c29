"""What the sync and async clients share: validation, bodies, retry budget, reading answers.

The twins (:mod:`citadel_client.sync_client`, :mod:`citadel_client.async_client`)
only send; everything that decides lives here once.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Callable, Iterator, Mapping
from typing import Final, Literal, TypeVar

import httpx

from citadel_client.config import Cert, Verify, check_base_url, ssl_context, system_context
from citadel_client.errors import (
    AuditUnavailable,
    CitadelConnectionError,
    CitadelError,
    InvalidRequest,
    ProviderUnavailable,
    error_for_code,
)

# The values of the contract's /sign table: for type checkers here, and the very
# types the server validates /sign bodies with (citadel.http.bodies). An older
# client's types may lag a newer server's; the server is the judge (422).
SignAlgorithm = Literal[
    "hmac-sha256",
    "hmac-sha384",
    "hmac-sha512",
    "ed25519",
    "rsa-pkcs1v15-sha256",
    "ecdsa-p256-sha256",
]
MessageEncoding = Literal["utf-8", "base64"]
KeyEncoding = Literal["utf-8", "base64", "hex", "pem"]
SignatureEncoding = Literal["hex", "base64", "base64url"]

RETRY_STATUSES: Final = frozenset({429, 503})
BACKOFF_CAP_S: Final = 16.0
JITTER: Final = 0.25

# The server's own patterns: a user id outside it is refused (422), a request
# id outside it is silently replaced, which would break the caller's tracing.
_USER_ID: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Transport failures that no retry can fix: the request itself cannot be sent.
_NOT_RETRIED: Final = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)

_FRAME: Final = len(b'{"batch":[]}')

T = TypeVar("T")
# How an answer is read: the value it carries, or the error it stands for (never raises).
Reader = Callable[[httpx.Response], T | CitadelError]


class Budget:
    """One call's deadline and retry policy: how long to wait before the next attempt."""

    def __init__(
        self, deadline: float, clock: Callable[[], float], rand: Callable[[], float]
    ) -> None:
        self._clock = clock
        self._rand = rand
        self._ends_at = clock() + deadline
        self._attempt = 0

    def remaining(self) -> float:
        """Seconds left of the call's whole deadline (retries included)."""
        return self._ends_at - self._clock()

    def timeout(self, configured: httpx.Timeout) -> httpx.Timeout:
        """The configured per-attempt timeout, cut to what is left of the deadline."""
        left = max(self.remaining(), 0.0)

        def cap(value: float | None) -> float:
            return left if value is None else min(value, left)

        return httpx.Timeout(
            connect=cap(configured.connect),
            read=cap(configured.read),
            write=cap(configured.write),
            pool=cap(configured.pool),
        )

    def wait_before_retry(self, err: CitadelError) -> float | None:
        """Seconds to wait before retrying after ``err``, or None to give up and raise it."""
        if err.status not in RETRY_STATUSES and not isinstance(err, CitadelConnectionError):
            return None
        if err.retry_after is not None:
            wait = float(max(0, err.retry_after))
        else:
            base = min(BACKOFF_CAP_S, 2.0**self._attempt)
            wait = base * (1.0 - JITTER + 2 * JITTER * self._rand())
        self._attempt += 1
        if wait >= self.remaining():
            return None
        return wait


def _json(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


def error_of(response: httpx.Response, body: object) -> CitadelError:
    """The error a non-200 answer stands for (a proxy's HTML page: the base class)."""
    request_id = response.headers.get("x-request-id")
    retry_after = _seconds(response.headers.get("retry-after"))
    if not isinstance(body, dict):
        return unexpected(response.status_code, request_id, retry_after)
    code, detail = body.get("code"), body.get("detail")
    cls = error_for_code(code) if isinstance(code, str) else CitadelError
    if cls is CitadelError:
        return unexpected(response.status_code, request_id, retry_after)
    if cls is ProviderUnavailable and detail == AuditUnavailable.default_detail:
        # One contract code for both 503s; the audit one is told apart by its fixed
        # detail (one definition, in errors.py), so an operator sees which it was.
        cls = AuditUnavailable
    # The contract's details are fixed text that never repeats the request.
    return cls(
        detail if isinstance(detail, str) else None,
        request_id=request_id,
        retry_after=retry_after,
    )


def field_reader(field: str) -> Reader[str]:
    """Reads the single form's answer: ``field`` of a 200, or the error."""

    def read(response: httpx.Response) -> str | CitadelError:
        body = _json(response)
        if response.status_code != 200:
            return error_of(response, body)
        value = body.get(field) if isinstance(body, dict) else None
        if isinstance(value, str):
            return value
        return unexpected(response.status_code, response.headers.get("x-request-id"))

    return read


def unexpected(status: int, request_id: str | None, retry_after: int | None = None) -> CitadelError:
    """The error for an answer that is not Citadel's contract (a proxy's page, an unknown code)."""
    err = CitadelError(
        f"Unexpected answer from Citadel (HTTP {status}).",
        request_id=request_id,
        retry_after=retry_after,
    )
    err.status = status  # type: ignore[misc]  # the base class has no status of its own
    return err


def _seconds(value: str | None) -> int | None:
    """``Retry-After`` as whole seconds; the HTTP-date form is ignored (backoff applies)."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def failure(exc: httpx.HTTPError) -> CitadelError:
    """The error for an httpx failure, naming only its type: its message can name the request."""
    if isinstance(exc, httpx.TransportError) and not isinstance(exc, _NOT_RETRIED):
        return CitadelConnectionError(f"Citadel could not be reached ({type(exc).__name__}).")
    return CitadelError(f"The call to Citadel failed ({type(exc).__name__}).")


def default_headers(api_key: str) -> dict[str, str]:
    """Headers of every request, set once on the pool; the key's value is never echoed."""
    if not isinstance(api_key, str) or not api_key.isascii() or not api_key.isprintable():
        raise ValueError("api_key must be non-empty printable ASCII")
    if not api_key:
        raise ValueError("api_key must be non-empty printable ASCII")
    return {"X-Internal-API-Key": api_key, "Content-Type": "application/json"}


def keep_no_cookies(http: httpx.Client | httpx.AsyncClient) -> None:
    """Never store or replay cookies: Citadel sets none, and one set by something in
    between (a proxy) must not ride along on later calls. It also saves httpx's
    per-response cookie parsing, a large share of a call's CPU for a bulk job."""
    setattr(http.cookies, "extract_cookies", _ignore_cookies)  # noqa: B010


def _ignore_cookies(_response: httpx.Response) -> None:
    return None


def check_user_id(user_id: str) -> None:
    """Refuse, before sending, an X-User-ID the server would refuse (422)."""
    if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id):
        raise InvalidRequest("user_id must be 1 to 128 of A-Za-z0-9_.:@-.")


def check_request_id(request_id: str) -> None:
    """Refuse, before sending, an X-Request-ID the server would replace."""
    if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
        raise InvalidRequest("request_id must be 1 to 128 of A-Za-z0-9._:-.")


def sign_payload(
    encrypted_data: str,
    message: str,
    algorithm: str,
    message_encoding: str,
    key_encoding: str | None,
    signature_encoding: str,
) -> dict[str, object]:
    """The /sign body; ``key_encoding`` None leaves the field out (the algorithm's default)."""
    payload: dict[str, object] = {
        "encrypted_data": encrypted_data,
        "algorithm": algorithm,
        "message": message,
        "message_encoding": message_encoding,
    }
    if key_encoding is not None:
        payload["key_encoding"] = key_encoding
    payload["signature_encoding"] = signature_encoding
    return payload


def chunks(
    bodies: list[dict[str, object]], max_items: int, max_bytes: int
) -> Iterator[tuple[int, int, bytes]]:
    """``(start, count, body)`` of each request: at most ``max_items`` items and, where an
    item alone is not larger, ``max_bytes`` of body. Each item is encoded once."""
    if max_items < 1 or max_bytes < 1:
        raise ValueError("max_batch_items and max_batch_bytes must be positive")
    start, size = 0, _FRAME
    parts: list[bytes] = []
    for index, body in enumerate(bodies):
        # UTF-8, not \u escapes: the server's body limit is in bytes.
        part = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        grown = size + len(part) + (1 if parts else 0)
        if parts and (len(parts) >= max_items or grown > max_bytes):
            yield start, len(parts), _frame(parts)
            start, size, parts = index, _FRAME, []
            grown = size + len(part)
        parts.append(part)
        size = grown
    if parts:
        yield start, len(parts), _frame(parts)


def _frame(parts: list[bytes]) -> bytes:
    return b'{"batch":[' + b",".join(parts) + b"]}"


def encode(payload: Mapping[str, object]) -> bytes:
    # UTF-8, not \u escapes: the server's body limit is in bytes.
    """A request body as compact UTF-8 JSON (the server's limits are in bytes)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


class Base:
    """What the sync and async clients share: settings, validation, the request to send."""

    def __init__(
        self,
        base_url: str | httpx.URL,
        timeout: float | httpx.Timeout,
        user_id: str | None,
        deadline: float,
        clock: Callable[[], float],
        random: Callable[[], float],
        on_retry: Callable[[CitadelError, float], None] | None,
    ) -> None:
        check_base_url(base_url)
        if not deadline > 0:
            raise ValueError("deadline must be positive")
        if user_id is not None:
            check_user_id(user_id)
        self._default_user = user_id
        self._timeout = httpx.Timeout(timeout)
        self._deadline = deadline
        self._clock = clock
        self._random = random
        self._on_retry = on_retry
        self._urls: dict[str, httpx.URL] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<api key hidden>)"

    @staticmethod
    def _tls(verify: Verify, cert: Cert | None) -> ssl.SSLContext:
        """httpx's ``verify``: one SSL context for both arguments (see citadel_client.config)."""
        if verify is True and cert is None:
            return system_context()
        return ssl_context(verify, cert)

    def _url(self, http: httpx.Client | httpx.AsyncClient, path: str) -> httpx.URL:
        """The absolute URL of ``path``, merged with the base URL once, not on every call.

        httpx parses a relative URL and merges it with the base URL for every
        request: the largest share of a call's CPU for a job making many.
        """
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = http.build_request("POST", path).url
        return url

    def _headers(self, user_id: str | None, request_id: str | None) -> dict[str, str]:
        """Per-call headers; invalid ids fail before anything is sent."""
        headers = {}
        user = user_id if user_id is not None else self._default_user
        if user is not None:
            check_user_id(user)
            headers["X-User-ID"] = user
        if request_id is not None:
            check_request_id(request_id)
            headers["X-Request-ID"] = request_id
        return headers

    def _budget(self) -> Budget:
        return Budget(self._deadline, self._clock, self._random)

    def _plan(
        self,
        bodies: list[dict[str, object]],
        user_id: str | None,
        request_id: str | None,
        max_items: int,
        max_bytes: int,
    ) -> list[tuple[bytes, int, dict[str, str]]]:
        """Each request of a ``*_many`` call: body, item count, headers; all checked first.

        With more than one request, ``request_id`` gets ``.0``, ``.1``, ... so that
        each audit line's ``request_id`` and ``batch_index`` name one item.
        """
        planned = list(chunks(bodies, max_items, max_bytes))
        out = []
        for number, (_start, count, content) in enumerate(planned):
            rid = request_id
            if request_id is not None and len(planned) > 1:
                rid = f"{request_id}.{number}"
            out.append((content, count, self._headers(user_id, rid)))
        return out
