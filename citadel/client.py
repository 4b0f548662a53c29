"""Python clients for Citadel: :class:`CitadelClient` (sync) and :class:`AsyncCitadelClient`.

Sentinel::

    with CitadelClient("http://citadel:8004", api_key=SENTINEL_KEY) as citadel:
        ciphertext = citadel.encrypt(exchange_secret, user_id=user.id)

Conductor::

    async with AsyncCitadelClient("http://citadel:8004", api_key=CONDUCTOR_KEY) as citadel:
        with await citadel.decrypt(ciphertext, user_id=user.id) as secret:
            sign(order, secret.reveal())
        # here the Plaintext holds nothing any more

Errors are the classes of :mod:`citadel.errors`, one per contract code, plus
:class:`CitadelConnectionError` when Citadel could not be reached. Retries
happen only where they are safe and useful: on 503 and 429 answers and on
connection errors, with exponential backoff (1, 2, 4, 8, 16, 16 … s, each
scaled by a random factor between 0.75 and 1.25), or after exactly
``Retry-After`` seconds when Citadel says so, until the call's ``deadline``
would be passed; then the last error is raised. Encrypting again is safe (it
makes a new ciphertext and changes nothing), and decrypting is idempotent.
"""

from __future__ import annotations

import hmac
import json
import random as _random
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import anyio
import httpx

from citadel.errors import CitadelError, error_for_code

__all__ = ["AsyncCitadelClient", "CitadelClient", "CitadelConnectionError", "Plaintext"]

RETRY_STATUSES = frozenset({429, 503})
BACKOFF_CAP_S = 16.0


class CitadelConnectionError(CitadelError):
    """Citadel could not be reached or did not answer in time (after retries)."""

    code = "connection_error"
    status = 0
    default_detail = "Citadel could not be reached."


class Plaintext:
    """A decrypted secret that does not show itself.

    ``repr``, ``str``, formatting and pickling never reveal the value; call
    :meth:`reveal` where it is needed. Used as a context manager, it drops its
    reference to the value on exit, so nothing Citadel's client made keeps it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value: str | None = value

    def reveal(self) -> str:
        """The secret; raises ``ValueError`` once the ``with`` block has cleared it."""
        if self._value is None:
            raise ValueError("plaintext was cleared")
        return self._value

    get_secret_value = reveal  # the name pydantic's SecretStr uses

    def clear(self) -> None:
        self._value = None

    def __enter__(self) -> Plaintext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()

    def __repr__(self) -> str:
        return "Plaintext('**********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plaintext) or self._value is None or other._value is None:
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Plaintext cannot be pickled")


class _Retrying:
    """The retry policy of one call: what to wait before the next attempt, if anything."""

    def __init__(
        self, deadline_s: float, clock: Callable[[], float], rand: Callable[[], float]
    ) -> None:
        self._clock = clock
        self._rand = rand
        self._ends_at = clock() + deadline_s
        self._attempt = 0

    def wait_before_retry(self, err: CitadelError) -> float | None:
        """Seconds to wait before retrying after ``err``, or None to give up and raise it."""
        if err.status not in RETRY_STATUSES and not isinstance(err, CitadelConnectionError):
            return None
        if err.retry_after is not None:
            wait = float(max(0, err.retry_after))
        else:
            base = min(BACKOFF_CAP_S, 2.0**self._attempt)
            wait = base * (0.75 + 0.5 * self._rand())
        self._attempt += 1
        if self._clock() + wait > self._ends_at:
            return None
        return wait


def _headers(user_id: str | None, request_id: str | None) -> dict[str, str]:
    headers = {}
    if user_id is not None:
        headers["X-User-ID"] = user_id
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    return headers


def _outcome(response: httpx.Response) -> dict[str, Any] | CitadelError:
    """The JSON body of a success, or the error an answer stands for; never raises."""
    request_id = response.headers.get("x-request-id")
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict):
        return body
    retry_after = _int_or_none(response.headers.get("retry-after"))
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        cls = error_for_code(body["code"])
        detail = body.get("detail") if isinstance(body.get("detail"), str) else None
        err = cls(detail, request_id=request_id, retry_after=retry_after)
    else:
        err = CitadelError(
            f"Unexpected answer from Citadel (HTTP {response.status_code}).",
            request_id=request_id,
            retry_after=retry_after,
        )
    if type(err) is CitadelError:
        err.status = response.status_code  # type: ignore[misc]
    return err


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _connection_error(exc: httpx.TransportError) -> CitadelConnectionError:
    # Only the exception's type: httpx messages can name the request.
    return CitadelConnectionError(f"Citadel could not be reached ({type(exc).__name__}).")


class _Base:
    def __init__(
        self,
        api_key: str,
        user_id: str | None,
        deadline: float,
        clock: Callable[[], float],
        random: Callable[[], float],
    ) -> None:
        self._default_user = user_id
        self._deadline = deadline
        self._clock = clock
        self._random = random
        self._auth = {"X-Internal-API-Key": api_key}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<api key hidden>)"

    def _request(
        self, payload: dict[str, str], user_id: str | None, request_id: str | None
    ) -> tuple[bytes, dict[str, str], _Retrying]:
        body = json.dumps(payload).encode()
        headers = {
            **self._auth,
            "Content-Type": "application/json",
            **_headers(user_id or self._default_user, request_id),
        }
        return body, headers, _Retrying(self._deadline, self._clock, self._random)


class CitadelClient(_Base):
    """A synchronous client; one instance shares a connection pool between calls."""

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
        super().__init__(api_key, user_id, deadline, clock, random)
        self._sleep = sleep
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    def encrypt(
        self, plaintext: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> str:
        """Encrypt ``plaintext``; returns the ciphertext to store."""
        body = self._call("/encrypt", {"plaintext": plaintext}, user_id, request_id)
        return str(body["encrypted_data"])

    def decrypt(
        self, ciphertext: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> Plaintext:
        """Decrypt ``ciphertext``; the secret comes wrapped in a :class:`Plaintext`."""
        body = self._call("/decrypt", {"encrypted_data": ciphertext}, user_id, request_id)
        return Plaintext(str(body.pop("plaintext")))

    def _call(
        self, path: str, payload: dict[str, str], user_id: str | None, request_id: str | None
    ) -> dict[str, Any]:
        content, headers, retrying = self._request(payload, user_id, request_id)
        while True:
            try:
                with self._http.stream("POST", path, content=content, headers=headers) as r:
                    r.read()
                    outcome = _outcome(r)
            except httpx.TransportError as exc:
                outcome = _connection_error(exc)
            if not isinstance(outcome, CitadelError):
                return outcome
            wait = retrying.wait_before_retry(outcome)
            if wait is None:
                raise outcome
            self._sleep(wait)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CitadelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCitadelClient(_Base):
    """The asyncio (or trio, through anyio) twin of :class:`CitadelClient`."""

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
        super().__init__(api_key, user_id, deadline, clock, random)
        self._sleep = sleep
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)

    async def encrypt(
        self, plaintext: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> str:
        """Encrypt ``plaintext``; returns the ciphertext to store."""
        body = await self._call("/encrypt", {"plaintext": plaintext}, user_id, request_id)
        return str(body["encrypted_data"])

    async def decrypt(
        self, ciphertext: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> Plaintext:
        """Decrypt ``ciphertext``; the secret comes wrapped in a :class:`Plaintext`."""
        body = await self._call("/decrypt", {"encrypted_data": ciphertext}, user_id, request_id)
        return Plaintext(str(body.pop("plaintext")))

    async def _call(
        self, path: str, payload: dict[str, str], user_id: str | None, request_id: str | None
    ) -> dict[str, Any]:
        content, headers, retrying = self._request(payload, user_id, request_id)
        while True:
            try:
                async with self._http.stream("POST", path, content=content, headers=headers) as r:
                    await r.aread()
                    outcome = _outcome(r)
            except httpx.TransportError as exc:
                outcome = _connection_error(exc)
            if not isinstance(outcome, CitadelError):
                return outcome
            wait = retrying.wait_before_retry(outcome)
            if wait is None:
                raise outcome
            await self._sleep(wait)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncCitadelClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
