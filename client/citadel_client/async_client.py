"""The async client, :class:`AsyncCitadelClient` (the rules: :mod:`citadel_client.client`)."""

from __future__ import annotations

import random as _random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Self, TypeVar

import anyio
import httpx

from citadel_client._base import (
    Base,
    Budget,
    KeyEncoding,
    MessageEncoding,
    Reader,
    SignAlgorithm,
    SignatureEncoding,
    default_headers,
    encode,
    failure,
    field_reader,
    keep_no_cookies,
    sign_payload,
)
from citadel_client.config import Cert, Verify, read_env
from citadel_client.errors import CitadelError
from citadel_client.plaintext import Plaintext

__all__ = ["AsyncCitadelClient"]

T = TypeVar("T")

_ENCRYPTED = field_reader("encrypted_data")
_PLAINTEXT = field_reader("plaintext")
_SIGNATURE = field_reader("signature")


class AsyncCitadelClient(Base):
    """The async twin of :class:`~citadel_client.CitadelClient` (asyncio, or trio through anyio).

    The same options; ``sleep`` is awaited (``anyio.sleep`` by default), and
    ``transport`` is an async one (such as
    :class:`~citadel_client.transport.AsyncKeepAliveTransport`).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = 5.0,
        user_id: str | None = None,
        deadline: float = 30.0,
        verify: Verify = True,
        cert: Cert | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        on_retry: Callable[[CitadelError, float], None] | None = None,
    ) -> None:
        super().__init__(base_url, timeout, user_id, deadline, clock, random, on_retry)
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=default_headers(api_key),
            timeout=self._timeout,
            verify=self._tls(verify, cert),
            transport=transport,
            # Only the caller's arguments count: no proxy from HTTP(S)_PROXY, which
            # would see every API key and plaintext (pass a transport for a proxy).
            trust_env=False,
        )
        keep_no_cookies(self._http)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> Self:
        """A client configured as the contract's variables say (``CITADEL_URL``,
        ``CITADEL_API_KEY`` or ``CITADEL_API_KEY_FILE``, ``CITADEL_CA_FILE``,
        ``CITADEL_CLIENT_CERT_FILE``, ``CITADEL_CLIENT_KEY_FILE``), as hvac and boto3 do.

        ``options`` are the constructor's other keywords (``timeout``, ``user_id``,
        ...); ``verify`` or ``cert`` given here win over the environment's.
        Raises :class:`~citadel_client.config.ConfigError` naming the variable,
        never its value.
        """
        env = read_env(environ)
        options.setdefault("verify", env.verify)
        options.setdefault("cert", env.cert)
        return cls(env.base_url, env.api_key, **options)

    async def encrypt(
        self, plaintext: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> str:
        """Encrypt ``plaintext``; returns the ciphertext to store."""
        payload = {"plaintext": plaintext}
        return await self._call("/encrypt", payload, _ENCRYPTED, user_id, request_id)

    async def decrypt(
        self, ciphertext: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> Plaintext:
        """Decrypt ``ciphertext``; the secret comes wrapped in a :class:`Plaintext`."""
        payload = {"encrypted_data": ciphertext}
        return Plaintext(await self._call("/decrypt", payload, _PLAINTEXT, user_id, request_id))

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
        payload = sign_payload(
            encrypted_data, message, algorithm, message_encoding, key_encoding, signature_encoding
        )
        return await self._call("/sign", payload, _SIGNATURE, user_id, request_id)

    async def rewrap(
        self, encrypted_data: str, *, user_id: str | None = None, request_id: str | None = None
    ) -> str:
        """Encrypt the same plaintext again under the active key; returns the new ciphertext."""
        return await self._call(
            "/rewrap", {"encrypted_data": encrypted_data}, _ENCRYPTED, user_id, request_id
        )

    async def _call(
        self,
        path: str,
        payload: Mapping[str, object],
        read: Reader[T],
        user_id: str | None,
        request_id: str | None,
    ) -> T:
        headers = self._headers(user_id, request_id)
        return await self._send(path, encode(payload), headers, read, self._budget())

    async def _send(
        self, path: str, content: bytes, headers: dict[str, str], read: Reader[T], budget: Budget
    ) -> T:
        """One call with its retries: the value, or the last error raised."""
        while True:
            outcome = await self._attempt(path, content, headers, budget, read)
            if not isinstance(outcome, CitadelError):
                return outcome
            wait = budget.wait_before_retry(outcome)
            if wait is None:
                raise outcome from None
            if self._on_retry is not None:
                self._on_retry(outcome, wait)
            await self._sleep(wait)

    async def _attempt(
        self,
        path: str,
        content: bytes,
        headers: dict[str, str],
        budget: Budget,
        read: Reader[T],
    ) -> T | CitadelError:
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
                return read(response)
        except httpx.HTTPError as exc:
            return failure(exc)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
