"""Python clients for Citadel: :class:`CitadelClient` (sync) and :class:`AsyncCitadelClient`.

Sentinel::

    with CitadelClient("http://citadel:8004", api_key=SENTINEL_KEY) as citadel:
        ciphertext = citadel.encrypt(exchange_secret, user_id=user.id)

Conductor::

    async with AsyncCitadelClient("http://citadel:8004", api_key=CONDUCTOR_KEY) as citadel:
        with await citadel.decrypt(ciphertext, user_id=user.id) as secret:
            sign(order, secret.reveal())
        # here the Plaintext holds nothing any more

Conductor, once granted ``sign`` (the secret then never leaves Citadel)::

    signature = await citadel.sign(ciphertext, query_string, algorithm="hmac-sha256")

A migration job (``citadel rewrap`` does this in bulk)::

    new_ciphertext = citadel.rewrap(old_ciphertext)

Errors are the classes of :mod:`citadel_client.errors`, one per contract code,
plus :class:`CitadelConnectionError` when Citadel could not be reached. An
answer without a known code (a proxy's HTML page, say) is a plain
:class:`~citadel_client.errors.CitadelError` whose ``status`` is the HTTP status.
No error carries the plaintext, the ciphertext or the API key, and none is
chained to the httpx exception behind it (whose request holds all three).

Retries happen only where they are safe and useful: on 503 and 429 answers
and on connection errors and timeouts. Attempt *n* (from 0) is followed by a
wait of ``min(16, 2**n)`` seconds, scaled by a random factor in
[0.75, 1.25) so that many clients do not retry in step: about 1, 2, 4, 8, 16,
16 … s. When the answer has ``Retry-After``, the wait is exactly that many
seconds instead. A wait that would reach the call's ``deadline`` is not
started: the last error is raised. Each attempt's timeout is also cut to
what is left of the deadline, so a call never runs much past it. Encrypting
again is safe (it makes a new ciphertext and changes nothing), decrypting and
signing are idempotent, and rewrapping again only makes another ciphertext of
the same plaintext (the caller stores whichever answer it got).

The clients keep no plaintext: a request body lives for one call, a response
for one attempt (it is closed before the next), and the API key is set once,
in the connection pool's default headers. They log nothing.
"""

from __future__ import annotations

import hmac
import json
import random as _random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final, Literal, NoReturn, Self

import anyio
import httpx

from citadel_client.errors import (
    CitadelConnectionError,
    CitadelError,
    InvalidRequest,
    error_for_code,
)

__all__ = [
    "AsyncCitadelClient",
    "CitadelClient",
    "CitadelConnectionError",
    "KeyEncoding",
    "MessageEncoding",
    "Plaintext",
    "SignAlgorithm",
    "SignatureEncoding",
]

# The values of the contract's /sign table, for type checkers; the server is the
# judge at run time (422 invalid_request), so a newer server's values still pass.
SignAlgorithm = Literal[
    "hmac-sha256", "hmac-sha512", "ed25519", "rsa-pkcs1v15-sha256", "ecdsa-p256-sha256"
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


class Plaintext:
    """A decrypted secret that does not show itself.

    ``repr``, ``str`` and formatting give ``Plaintext('**********')``, pickling
    and copying raise ``TypeError``, and ``==`` compares in constant time.
    Call :meth:`reveal` where the value is needed. Used as a context manager it
    drops its reference to the value on exit (Python strings cannot be wiped,
    but nothing of Citadel's keeps the value alive after that)::

        with client.decrypt(ciphertext) as secret:
            sign(order, secret.reveal())
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value: str | None = value

    def reveal(self) -> str:
        """The secret; raises ``ValueError`` once it was cleared."""
        if self._value is None:
            raise ValueError("plaintext was cleared")
        return self._value

    def get_secret_value(self) -> str:
        """The same as :meth:`reveal`, under the name pydantic's ``SecretStr`` uses."""
        return self.reveal()

    def clear(self) -> None:
        """Drop the reference to the value; :meth:`reveal` raises from now on."""
        self._value = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()

    def __repr__(self) -> str:
        return "Plaintext('**********')"

    def __str__(self) -> str:
        return repr(self)

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plaintext) or self._value is None or other._value is None:
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    __hash__ = None  # type: ignore[assignment]  # a hash would be an oracle for the value

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Plaintext cannot be pickled or copied")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a Plaintext cannot be pickled or copied")


class _Budget:
    """One call's deadline and retry policy: how long to wait before the next attempt."""

    def __init__(
        self, deadline: float, clock: Callable[[], float], rand: Callable[[], float]
    ) -> None:
        self._clock = clock
        self._rand = rand
        self._ends_at = clock() + deadline
        self._attempt = 0

    def remaining(self) -> float:
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


def _outcome(response: httpx.Response, field: str) -> str | CitadelError:
    """The ``field`` of a success, or the error an answer stands for; never raises."""
    try:
        body = response.json()
    except ValueError:
        body = None
    request_id = response.headers.get("x-request-id")
    if response.status_code == 200:
        value = body.get(field) if isinstance(body, dict) else None
        if isinstance(value, str):
            return value
        return _unexpected(response.status_code, request_id)
    retry_after = _seconds(response.headers.get("retry-after"))
    if not isinstance(body, dict):
        return _unexpected(response.status_code, request_id, retry_after)
    code, detail = body.get("code"), body.get("detail")
    cls = error_for_code(code) if isinstance(code, str) else CitadelError
    if cls is CitadelError:
        return _unexpected(response.status_code, request_id, retry_after)
    # The contract's details are fixed text that never repeats the request.
    return cls(
        detail if isinstance(detail, str) else None,
        request_id=request_id,
        retry_after=retry_after,
    )


def _unexpected(
    status: int, request_id: str | None, retry_after: int | None = None
) -> CitadelError:
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


def _failure(exc: httpx.HTTPError) -> CitadelError:
    """The error for an httpx failure, naming only its type: its message can name the request."""
    if isinstance(exc, httpx.TransportError) and not isinstance(exc, _NOT_RETRIED):
        return CitadelConnectionError(f"Citadel could not be reached ({type(exc).__name__}).")
    return CitadelError(f"The call to Citadel failed ({type(exc).__name__}).")


def _default_headers(api_key: str) -> dict[str, str]:
    """Headers of every request, set once on the pool; the key's value is never echoed."""
    if not api_key or not api_key.isascii() or not api_key.isprintable():
        raise ValueError("api_key must be non-empty printable ASCII")
    return {"X-Internal-API-Key": api_key, "Content-Type": "application/json"}


def _keep_no_cookies(http: httpx.Client | httpx.AsyncClient) -> None:
    """Never store or replay cookies: Citadel sets none, and one set by something in
    between (a proxy) must not ride along on later calls. It also saves httpx's
    per-response cookie parsing, a large share of a call's CPU for a bulk job."""
    setattr(http.cookies, "extract_cookies", _ignore_cookies)  # noqa: B010


def _ignore_cookies(_response: httpx.Response) -> None:
    return None


def _check_user_id(user_id: str) -> None:
    if not _USER_ID.fullmatch(user_id):
        raise InvalidRequest("user_id must be 1 to 128 of A-Za-z0-9_.:@-.")


def _sign_payload(
    encrypted_data: str,
    message: str,
    algorithm: str,
    message_encoding: str,
    key_encoding: str | None,
    signature_encoding: str,
) -> dict[str, str]:
    """The /sign body; ``key_encoding`` None leaves the field out (the algorithm's default)."""
    payload = {
        "encrypted_data": encrypted_data,
        "algorithm": algorithm,
        "message": message,
        "message_encoding": message_encoding,
    }
    if key_encoding is not None:
        payload["key_encoding"] = key_encoding
    payload["signature_encoding"] = signature_encoding
    return payload


class _Base:
    """What the sync and async clients share: settings, validation, the request to send."""

    def __init__(
        self,
        timeout: float | httpx.Timeout,
        user_id: str | None,
        deadline: float,
        clock: Callable[[], float],
        random: Callable[[], float],
    ) -> None:
        if not deadline > 0:
            raise ValueError("deadline must be positive")
        if user_id is not None:
            _check_user_id(user_id)
        self._default_user = user_id
        self._timeout = httpx.Timeout(timeout)
        self._deadline = deadline
        self._clock = clock
        self._random = random
        self._urls: dict[str, httpx.URL] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<api key hidden>)"

    def _url(self, http: httpx.Client | httpx.AsyncClient, path: str) -> httpx.URL:
        """The absolute URL of ``path``, merged with the base URL once, not on every call.

        httpx parses a relative URL and merges it with the base URL for every
        request: the largest share of a call's CPU for a job making many.
        """
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = http.build_request("POST", path).url
        return url

    def _prepare(
        self, payload: dict[str, str], user_id: str | None, request_id: str | None
    ) -> tuple[bytes, dict[str, str], _Budget]:
        """Body, per-call headers and budget of one call; invalid ids fail before sending."""
        headers = {}
        user = user_id if user_id is not None else self._default_user
        if user is not None:
            _check_user_id(user)
            headers["X-User-ID"] = user
        if request_id is not None:
            if not _REQUEST_ID.fullmatch(request_id):
                raise InvalidRequest("request_id must be 1 to 128 of A-Za-z0-9._:-.")
            headers["X-Request-ID"] = request_id
        # UTF-8, not \u escapes: the server's body limit is in bytes.
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        return body, headers, _Budget(self._deadline, self._clock, self._random)


class CitadelClient(_Base):
    """A synchronous client; one instance shares a connection pool between calls and threads.

    ``timeout`` applies to each attempt, ``deadline`` to a whole call with its
    retries. ``user_id`` is the default ``X-User-ID``. ``transport``, ``sleep``,
    ``clock`` and ``random`` (a source of floats in [0, 1) for the jitter) are
    there for tests.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = 5.0,
        user_id: str | None = None,
        deadline: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
    ) -> None:
        super().__init__(timeout, user_id, deadline, clock, random)
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=base_url,
            headers=_default_headers(api_key),
            timeout=self._timeout,
            transport=transport,
        )
        _keep_no_cookies(self._http)

    def encrypt(
        self, plaintext: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> str:
        """Encrypt ``plaintext``; returns the ciphertext to store."""
        return self._call(
            "/encrypt", {"plaintext": plaintext}, "encrypted_data", user_id, request_id
        )

    def decrypt(
        self, ciphertext: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> Plaintext:
        """Decrypt ``ciphertext``; the secret comes wrapped in a :class:`Plaintext`."""
        return Plaintext(
            self._call("/decrypt", {"encrypted_data": ciphertext}, "plaintext", user_id, request_id)
        )

    def sign(
        self,
        encrypted_data: str,
        message: str,
        *,
        algorithm: SignAlgorithm,
        message_encoding: MessageEncoding = "utf-8",
        key_encoding: KeyEncoding | None = None,
        signature_encoding: SignatureEncoding = "hex",
        user_id: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Sign ``message`` with the secret in ``encrypted_data``; returns the signature.

        The secret never leaves Citadel. ``key_encoding`` None lets the server
        take the algorithm's default (``utf-8`` for HMAC, ``pem`` otherwise).
        """
        payload = _sign_payload(
            encrypted_data, message, algorithm, message_encoding, key_encoding, signature_encoding
        )
        return self._call("/sign", payload, "signature", user_id, request_id)

    def rewrap(
        self, encrypted_data: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> str:
        """Encrypt the same plaintext again under the active key; returns the new ciphertext."""
        return self._call(
            "/rewrap", {"encrypted_data": encrypted_data}, "encrypted_data", user_id, request_id
        )

    def _call(
        self,
        path: str,
        payload: dict[str, str],
        field: str,
        user_id: str | None,
        request_id: str | None,
    ) -> str:
        content, headers, budget = self._prepare(payload, user_id, request_id)
        while True:
            outcome = self._attempt(path, content, headers, budget, field)
            if isinstance(outcome, str):
                return outcome
            wait = budget.wait_before_retry(outcome)
            if wait is None:
                raise outcome from None
            self._sleep(wait)

    def _attempt(
        self,
        path: str,
        content: bytes,
        headers: dict[str, str],
        budget: _Budget,
        field: str,
    ) -> str | CitadelError:
        """One request; its response is read, closed and dropped within this frame."""
        try:
            with self._http.stream(
                "POST",
                self._url(self._http, path),
                content=content,
                headers=headers,
                timeout=budget.timeout(self._timeout),
            ) as response:
                response.read()
                return _outcome(response, field)
        except httpx.HTTPError as exc:
            return _failure(exc)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCitadelClient(_Base):
    """The async twin of :class:`CitadelClient` (asyncio, or trio through anyio).

    The same options; ``sleep`` is awaited (``anyio.sleep`` by default).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = 5.0,
        user_id: str | None = None,
        deadline: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
    ) -> None:
        super().__init__(timeout, user_id, deadline, clock, random)
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=_default_headers(api_key),
            timeout=self._timeout,
            transport=transport,
        )
        _keep_no_cookies(self._http)

    async def encrypt(
        self, plaintext: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> str:
        """Encrypt ``plaintext``; returns the ciphertext to store."""
        return await self._call(
            "/encrypt", {"plaintext": plaintext}, "encrypted_data", user_id, request_id
        )

    async def decrypt(
        self, ciphertext: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> Plaintext:
        """Decrypt ``ciphertext``; the secret comes wrapped in a :class:`Plaintext`."""
        return Plaintext(
            await self._call(
                "/decrypt", {"encrypted_data": ciphertext}, "plaintext", user_id, request_id
            )
        )

    async def sign(
        self,
        encrypted_data: str,
        message: str,
        *,
        algorithm: SignAlgorithm,
        message_encoding: MessageEncoding = "utf-8",
        key_encoding: KeyEncoding | None = None,
        signature_encoding: SignatureEncoding = "hex",
        user_id: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Sign ``message`` with the secret in ``encrypted_data``; returns the signature.

        The secret never leaves Citadel. ``key_encoding`` None lets the server
        take the algorithm's default (``utf-8`` for HMAC, ``pem`` otherwise).
        """
        payload = _sign_payload(
            encrypted_data, message, algorithm, message_encoding, key_encoding, signature_encoding
        )
        return await self._call("/sign", payload, "signature", user_id, request_id)

    async def rewrap(
        self, encrypted_data: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> str:
        """Encrypt the same plaintext again under the active key; returns the new ciphertext."""
        return await self._call(
            "/rewrap", {"encrypted_data": encrypted_data}, "encrypted_data", user_id, request_id
        )

    async def _call(
        self,
        path: str,
        payload: dict[str, str],
        field: str,
        user_id: str | None,
        request_id: str | None,
    ) -> str:
        content, headers, budget = self._prepare(payload, user_id, request_id)
        while True:
            outcome = await self._attempt(path, content, headers, budget, field)
            if isinstance(outcome, str):
                return outcome
            wait = budget.wait_before_retry(outcome)
            if wait is None:
                raise outcome from None
            await self._sleep(wait)

    async def _attempt(
        self,
        path: str,
        content: bytes,
        headers: dict[str, str],
        budget: _Budget,
        field: str,
    ) -> str | CitadelError:
        """One request; its response is read, closed and dropped within this frame."""
        try:
            async with self._http.stream(
                "POST",
                self._url(self._http, path),
                content=content,
                headers=headers,
                timeout=budget.timeout(self._timeout),
            ) as response:
                await response.aread()
                return _outcome(response, field)
        except httpx.HTTPError as exc:
            return _failure(exc)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
