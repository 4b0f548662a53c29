"""The synchronous client, :class:`CitadelClient` (the rules: :mod:`citadel_client.client`)."""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self, TypeVar

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
from citadel_client.batch import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_ITEMS,
    Context,
    DecryptItem,
    EncryptItem,
    ItemResult,
    RewrapItem,
    SignItem,
    batch_reader,
    context_payload,
    items_of,
    results_of,
)
from citadel_client.config import Cert, Verify, read_env
from citadel_client.errors import CitadelError
from citadel_client.plaintext import Plaintext

__all__ = ["CitadelClient"]

T = TypeVar("T")

_ENCRYPTED = field_reader("encrypted_data")
_PLAINTEXT = field_reader("plaintext")
_SIGNATURE = field_reader("signature")


def _same(value: str) -> str:
    return value


def _with_context(payload: dict[str, object], context: Context | None) -> dict[str, object]:
    if context is not None:
        payload["context"] = context_payload(context)
    return payload


class CitadelClient(Base):
    """A synchronous client; one instance shares a connection pool between calls and threads.

    ``timeout`` applies to each attempt, ``deadline`` to a whole call with its
    retries. ``user_id`` is the default ``X-User-ID``. ``verify`` is the CA
    bundle that signed Citadel's certificate (``True``: the system's store) and
    ``cert`` the client certificate for mutual TLS: a PEM file holding the
    certificate and its key, or a ``(certificate, key)`` pair. ``on_retry(error,
    seconds)`` is called before each wait between attempts (a progress display
    says what it waits for). ``transport``, ``sleep``, ``clock`` and ``random``
    (a source of floats in [0, 1) for the jitter) are there for tests.
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
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        on_retry: Callable[[CitadelError, float], None] | None = None,
    ) -> None:
        super().__init__(base_url, timeout, user_id, deadline, clock, random, on_retry)
        self._sleep = sleep
        self._http = httpx.Client(
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

    def encrypt(
        self,
        plaintext: str,
        *,
        context: Context | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Encrypt ``plaintext``; returns the ciphertext to store.

        With ``context`` (1 to 16 string pairs, e.g. ``{"user_id": "8413"}``) the
        ciphertext is bound to it: every later decrypt, sign or rewrap must send
        the same context.
        """
        payload = _with_context({"plaintext": plaintext}, context)
        return self._call("/encrypt", payload, _ENCRYPTED, user_id, request_id)

    def decrypt(
        self,
        ciphertext: str,
        *,
        context: Context | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
    ) -> Plaintext:
        """Decrypt ``ciphertext`` (sent with the ``context`` it was bound to, if any);
        the secret comes wrapped in a :class:`Plaintext`."""
        payload = _with_context({"encrypted_data": ciphertext}, context)
        return Plaintext(self._call("/decrypt", payload, _PLAINTEXT, user_id, request_id))

    def sign(
        self,
        encrypted_data: str,
        message: str,
        *,
        algorithm: SignAlgorithm,
        message_encoding: MessageEncoding = "utf-8",
        key_encoding: KeyEncoding | None = None,
        signature_encoding: SignatureEncoding = "hex",
        context: Context | None = None,
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
        return self._call("/sign", _with_context(payload, context), _SIGNATURE, user_id, request_id)

    def rewrap(
        self,
        encrypted_data: str,
        *,
        context: Context | None = None,
        new_context: Context | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Encrypt the same plaintext again under the active key; returns the new ciphertext.

        ``context`` is the one ``encrypted_data`` is bound to; the new ciphertext
        keeps it, or is bound to ``new_context`` instead (how stored ciphertexts
        get bound to their users without being exposed).
        """
        payload = _with_context({"encrypted_data": encrypted_data}, context)
        if new_context is not None:
            payload["new_context"] = context_payload(new_context, "new_context")
        return self._call("/rewrap", payload, _ENCRYPTED, user_id, request_id)

    def encrypt_many(
        self,
        items: Iterable[str | EncryptItem],
        *,
        context: Context | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> list[ItemResult[str]]:
        """Encrypt each item (a plaintext, or ``{"plaintext", "context"}``), in batches.

        ``context`` is used for the items that name none. Returns one result per
        item, in order (see :mod:`citadel_client.batch`).
        """
        bodies = items_of(items, "plaintext", {"context": context_payload(context)})
        return self._many(
            "/encrypt",
            "encrypted_data",
            bodies,
            _same,
            user_id,
            request_id,
            max_batch_items,
            max_batch_bytes,
        )

    def decrypt_many(
        self,
        items: Iterable[str | DecryptItem],
        *,
        context: Context | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> list[ItemResult[Plaintext]]:
        """Decrypt each item (a ciphertext, or ``{"encrypted_data", "context"}``), in batches;
        each value is a :class:`Plaintext`."""
        bodies = items_of(items, "encrypted_data", {"context": context_payload(context)})
        return self._many(
            "/decrypt",
            "plaintext",
            bodies,
            Plaintext,
            user_id,
            request_id,
            max_batch_items,
            max_batch_bytes,
        )

    def sign_many(
        self,
        items: Iterable[SignItem],
        *,
        algorithm: SignAlgorithm | None = None,
        message_encoding: MessageEncoding | None = None,
        key_encoding: KeyEncoding | None = None,
        signature_encoding: SignatureEncoding | None = None,
        context: Context | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> list[ItemResult[str]]:
        """Sign each item (``{"encrypted_data", "message", ...}``), in batches.

        The keywords fill what an item leaves out (its own ``algorithm`` wins);
        an encoding left out everywhere is the server's default.
        """
        defaults: dict[str, object] = {
            "algorithm": algorithm,
            "message_encoding": message_encoding,
            "key_encoding": key_encoding,
            "signature_encoding": signature_encoding,
            "context": context_payload(context),
        }
        bodies = items_of(items, "encrypted_data", defaults)
        return self._many(
            "/sign",
            "signature",
            bodies,
            _same,
            user_id,
            request_id,
            max_batch_items,
            max_batch_bytes,
        )

    def rewrap_many(
        self,
        items: Iterable[str | RewrapItem],
        *,
        context: Context | None = None,
        new_context: Context | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> list[ItemResult[str]]:
        """Rewrap each item (a ciphertext, or ``{"encrypted_data", "context", "new_context"}``),
        in batches; the keywords fill what an item leaves out."""
        defaults = {
            "context": context_payload(context),
            "new_context": context_payload(new_context, "new_context"),
        }
        bodies = items_of(items, "encrypted_data", defaults)
        return self._many(
            "/rewrap",
            "encrypted_data",
            bodies,
            _same,
            user_id,
            request_id,
            max_batch_items,
            max_batch_bytes,
        )

    def _many(
        self,
        path: str,
        field: str,
        bodies: list[dict[str, object]],
        wrap: Callable[[str], T],
        user_id: str | None,
        request_id: str | None,
        max_items: int,
        max_bytes: int,
    ) -> list[ItemResult[T]]:
        """The requests of a ``*_many`` call, one after the other, each with its retries."""
        results: list[ItemResult[T]] = []
        for content, count, headers in self._plan(
            bodies, user_id, request_id, max_items, max_bytes
        ):
            answer = self._send(path, content, headers, batch_reader(count, field), self._budget())
            # The id this request was sent with, should the answer not echo it.
            request_id_sent, values = answer
            answer = (request_id_sent or headers.get("X-Request-ID"), values)
            results.extend(results_of(answer, wrap))
        return results

    def _call(
        self,
        path: str,
        payload: Mapping[str, object],
        read: Reader[T],
        user_id: str | None,
        request_id: str | None,
    ) -> T:
        headers = self._headers(user_id, request_id)
        return self._send(path, encode(payload), headers, read, self._budget())

    def _send(
        self, path: str, content: bytes, headers: dict[str, str], read: Reader[T], budget: Budget
    ) -> T:
        """One call with its retries: the value, or the last error raised."""
        while True:
            outcome = self._attempt(path, content, headers, budget, read)
            if not isinstance(outcome, CitadelError):
                return outcome
            wait = budget.wait_before_retry(outcome)
            if wait is None:
                raise outcome from None
            if self._on_retry is not None:
                self._on_retry(outcome, wait)
            self._sleep(wait)

    def _attempt(
        self,
        path: str,
        content: bytes,
        headers: dict[str, str],
        budget: Budget,
        read: Reader[T],
    ) -> T | CitadelError:
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
                return read(response)
        except httpx.HTTPError as exc:
            return failure(exc)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
