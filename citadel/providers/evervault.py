"""The production provider: the Evervault SDK, with Citadel's own guard rails.

What the SDK does, and what this wrapper adds (details in docs/evervault.md):

- Encryption is local. The SDK fetches the app's public key once
  (``GET cages/key``), then derives an AES key by ECDH with an ephemeral key
  pair it regenerates every 15 seconds. It keeps the derived key and the
  ephemeral public key in two attributes of its crypto client and writes them
  at different moments, so two threads encrypting across a re-derivation can
  pair one call's key with the other's header: a ciphertext nobody can ever
  decrypt. Every call into the SDK's ``encrypt`` therefore holds one lock. The
  work is microseconds of CPU, so it runs inline, and the key is fetched in the
  background at start-up, so ``encrypt`` never touches the network.
- Decryption is a call to Evervault, run in a bounded thread pool (the SDK is
  synchronous) with an HTTP pool of the same size, the SDK's retries off, and
  every answer classified here rather than from the SDK's single exception
  type, so that the circuit breaker counts only real upstream failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import structlog
from evervault import Client
from requests.adapters import HTTPAdapter

from citadel.breaker import BreakerOpen, BreakerState, CircuitBreaker
from citadel.config import Settings
from citadel.context import Context, bind, unbind
from citadel.errors import CitadelError, InvalidCiphertext, ProviderUnavailable
from citadel.metrics import Metrics

log = structlog.get_logger("citadel")

# ev:<version>[:<type>]:<iv>:<ephemeral public key>:<ciphertext>:$ (base64, padding stripped)
EV_SHAPE = re.compile(
    r"^ev:(?:RFVC|Tk9D|S0lS|QkTC)(?::(?:number|boolean))?"
    r":[A-Za-z0-9+/]{16}:[A-Za-z0-9+/]{43,88}:[A-Za-z0-9+/]{22,}:\$$"
)
KEY_FETCH_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class _UpstreamFailure(Exception):
    """5xx, malformed answers: counts against the breaker."""


class _UpstreamRejected(Exception):
    """4xx other than 401/403/429: the data cannot be decrypted; the caller's fault."""


class _UpstreamRateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("rate limited")
        self.retry_after = retry_after


class _UpstreamUnauthorized(Exception):
    """Evervault refused Citadel's own credentials."""


def classify(resp: requests.Response, body: Any = None) -> None:
    """The SDK's ``error_handler``: raise by status, never with response text."""
    status = resp.status_code
    if 200 <= status < 300:
        if not isinstance(body, dict):
            raise _UpstreamFailure(f"unparseable {status} answer")
        return
    if status == 429:
        raise _UpstreamRateLimited(_retry_after(resp.headers.get("Retry-After")))
    if status in (401, 403):
        raise _UpstreamUnauthorized()
    if 400 <= status < 500:
        raise _UpstreamRejected()
    raise _UpstreamFailure(f"status {status}")


def _as_text(value: Any) -> str:
    """A decrypted value as the string Citadel encrypted (the SDK types numbers and booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str | int | float):
        raise _UpstreamFailure("answer without data")
    return str(value)


def _retry_after(value: str | None) -> int:
    try:
        return max(1, min(3600, round(float(value or 1))))
    except ValueError:
        return 1


class EvervaultProvider:
    """Local encryption through the SDK, decryption through Evervault behind a breaker.

    Wraps the SDK rather than using it bare, for the reasons in the module docstring.
    """

    name = "evervault"
    prefix = "ev:"
    has_breaker = True

    def __init__(
        self,
        client: Client,
        *,
        breaker: CircuitBreaker,
        metrics: Metrics,
        concurrency: int,
    ) -> None:
        self._client = client
        self.breaker = breaker
        self._metrics = metrics
        self._encrypt_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="evervault")
        self._ready = False
        self._fetch_task: asyncio.Task[None] | None = None
        self._calls: dict[tuple[str, str], Any] = {}
        self._size_pool(concurrency)
        breaker.add_listener(self._on_transition)
        metrics.breaker_state.labels(self.name).set(breaker.state.gauge)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> EvervaultProvider:
        """The SDK client and breaker from settings; the SDK's retries off (the breaker decides)."""
        # Settings refuse an evervault provider without both credentials.
        assert settings.evervault_app_id and settings.evervault_api_key is not None
        client = Client(
            app_uuid=settings.evervault_app_id,
            api_key=settings.evervault_api_key.get_secret_value(),
            request_timeout=settings.evervault_timeout_s,
            base_url=settings.evervault_api_url,
            retry=False,
            curve=settings.evervault_curve,
        )
        breaker = CircuitBreaker(
            fail_max=settings.breaker_fail_max,
            reset_s=settings.breaker_reset_s,
            reset_max_s=settings.breaker_reset_max_s,
        )
        return cls(
            client, breaker=breaker, metrics=metrics, concurrency=settings.decrypt_concurrency
        )

    def __repr__(self) -> str:
        return f"EvervaultProvider(ready={self._ready}, breaker={self.breaker.state.value})"

    def _size_pool(self, concurrency: int) -> None:
        # requests keeps 10 connections per host by default; more threads than
        # that would open and close a connection per call.
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=concurrency, max_retries=0)
        session: requests.Session = self._client.request_handler.request.http_session
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        # With trust_env, requests re-reads proxy variables and ~/.netrc on every
        # call, a large share of a decrypt's CPU here. Resolve the proxies for
        # Evervault's URL once instead; they do not change while Citadel runs.
        session.proxies.update(requests.utils.get_environ_proxies(self._client.base_url))
        session.trust_env = False

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Fetch the app's public key in the background, so start-up never waits on Evervault."""
        self._fetch_task = asyncio.create_task(self._fetch_key_until_ready())

    async def aclose(self) -> None:
        """Stop the key fetch and the decrypt threads."""
        if self._fetch_task is not None:
            self._fetch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetch_task
        self._executor.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> bool:
        """True once the public key is loaded: until then ``encrypt`` refuses."""
        return self._ready

    def breaker_state(self) -> BreakerState:
        """The decrypt breaker's state (encryption is local and has none)."""
        return self.breaker.state

    async def _fetch_key_until_ready(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            problem = await loop.run_in_executor(self._executor, self._warm_up)
            if problem is None:
                self._ready = True
                log.info("evervault_ready", attempts=attempt + 1)
                return
            delay = KEY_FETCH_BACKOFF[min(attempt, len(KEY_FETCH_BACKOFF) - 1)]
            log.warning("evervault_key_fetch_failed", problem=problem, retry_in_s=delay)
            attempt += 1
            await asyncio.sleep(delay)

    def probe(self) -> str | None:
        """One attempt to fetch the app's public key (for ``citadel check``); a problem, or None."""
        return self._warm_up()

    def _warm_up(self) -> str | None:
        """Fetch the app's public key (one encryption does it); a problem's name, or None."""
        try:
            with self._encrypt_lock:
                self._client.encrypt("warm-up", None)
            return None
        except requests.Timeout:
            return "timeout reaching EVERVAULT_API_URL"
        except requests.RequestException:
            return "cannot connect to EVERVAULT_API_URL"
        except Exception as exc:  # the SDK raises EvervaultError with fixed texts
            text = str(exc)
            if text in {"Unauthorized", "Forbidden"}:
                return "EVERVAULT_APP_ID / EVERVAULT_API_KEY rejected by Evervault"
            if text == "Resource not found":
                return "EVERVAULT_API_URL has no cages/key endpoint"
            return f"unexpected answer ({type(exc).__name__})"

    # -- operations ----------------------------------------------------------

    async def encrypt(self, plaintext: str, context: Context | None = None) -> str:
        """Encrypt locally; ``ProviderUnavailable`` until the public key is loaded.

        With a context, the SDK encrypts the bound form (:func:`citadel.context.bind`):
        the SDK has no associated data (docs/formats.md).
        """
        if not self._ready:
            self._count("encrypt", "rejected")
            raise ProviderUnavailable("The Evervault public key is not loaded yet.", retry_after=1)
        ciphertext = self.encrypt_sync(bind(plaintext, context))
        self._count("encrypt", "ok")
        return ciphertext

    def encrypt_sync(self, plaintext: str) -> str:
        """The SDK's local encryption, serialised (see the module docstring)."""
        with self._encrypt_lock:
            ciphertext: str = self._client.encrypt(plaintext, None)
        return ciphertext

    async def decrypt(self, ciphertext: str, context: Context | None = None) -> str:
        """One call to Evervault; the answer must carry ``context``, else InvalidCiphertext."""
        if not EV_SHAPE.match(ciphertext):
            self._count("decrypt", "invalid")
            raise InvalidCiphertext()
        plain = await self._call(ciphertext)
        assert isinstance(plain, str)
        found = unbind(plain, context)
        if found is None:
            raise InvalidCiphertext()
        return found

    async def decrypt_many(
        self, items: Sequence[tuple[str, Context | None]]
    ) -> list[str | CitadelError]:
        """One call to Evervault for the whole batch when every item decrypts.

        Evervault refuses a call whose data holds one undecryptable item, so a
        refused call is split in halves and each half asked again, down to the
        bad items: k bad items among n cost about 2k log2(n) calls more, and
        never fail the good ones. Malformed items are refused without a call.
        """
        results: list[str | CitadelError | None] = [None] * len(items)
        todo = []
        for index, (ciphertext, _context) in enumerate(items):
            if EV_SHAPE.match(ciphertext):
                todo.append(index)
            else:
                self._count("decrypt", "invalid")
                results[index] = InvalidCiphertext()
        await self._decrypt_indices(items, todo, results)
        return [r if r is not None else InvalidCiphertext() for r in results]

    async def _decrypt_indices(
        self,
        items: Sequence[tuple[str, Context | None]],
        todo: list[int],
        results: list[str | CitadelError | None],
    ) -> None:
        if not todo:
            return
        try:
            plains = await self._call([items[i][0] for i in todo])
        except InvalidCiphertext as err:
            if len(todo) == 1:
                results[todo[0]] = err
                return
            middle = len(todo) // 2
            await self._decrypt_indices(items, todo[:middle], results)
            await self._decrypt_indices(items, todo[middle:], results)
            return
        assert isinstance(plains, list)
        for index, plain in zip(todo, plains, strict=True):
            found = unbind(plain, items[index][1])
            results[index] = InvalidCiphertext() if found is None else found

    async def _call(self, data: str | list[str]) -> str | list[str]:
        """Ask Evervault in the thread pool, through the breaker; only upstream failures count.

        Answers the caller is at fault for (rejected, rate-limited) count as
        successes for the breaker.
        """
        try:
            permit = self.breaker.acquire()
        except BreakerOpen as exc:
            self._count("decrypt", "rejected")
            raise ProviderUnavailable(retry_after=max(1, round(exc.retry_after))) from None
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self._decrypt_sync, data)
        except _UpstreamRejected:
            self.breaker.success(permit)
            self._count("decrypt", "invalid")
            raise InvalidCiphertext() from None
        except _UpstreamRateLimited as exc:
            self.breaker.success(permit)
            self._count("decrypt", "rate_limited")
            raise ProviderUnavailable(retry_after=exc.retry_after) from None
        except _UpstreamUnauthorized:
            self.breaker.success(permit)
            self._count("decrypt", "unauthorized")
            log.error("evervault_credentials_rejected", operation="decrypt")
            raise ProviderUnavailable(retry_after=30) from None
        except asyncio.CancelledError:
            self.breaker.release(permit)
            raise
        except Exception as exc:
            # 5xx, timeouts, refused or broken connections, and whatever else
            # the SDK raises on an answer it cannot read (a non-JSON body makes
            # it call a module as a function: TypeError).
            self.breaker.failure(permit)
            self._count("decrypt", "failure")
            log.warning("evervault_call_failed", operation="decrypt", error=type(exc).__name__)
            raise ProviderUnavailable(retry_after=max(1, round(self.breaker.open_period))) from None
        self.breaker.success(permit)
        self._count("decrypt", "ok")
        return result

    def _decrypt_sync(self, data: str | list[str]) -> str | list[str]:
        body = self._client.post(
            "decrypt",
            {"data": data},
            {"Content-Type": "application/json"},
            error_handler=classify,
        )
        answer = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, str):
            return _as_text(answer)
        if not isinstance(answer, list) or len(answer) != len(data):
            raise _UpstreamFailure("answer without the batch's data")
        return [_as_text(item) for item in answer]

    # -- observation -----------------------------------------------------------

    def _count(self, operation: str, outcome: str) -> None:
        key = (operation, outcome)
        child = self._calls.get(key)
        if child is None:
            child = self._calls[key] = self._metrics.provider_calls.labels(
                self.name, operation, outcome
            )
        child.inc()

    def _on_transition(self, old: BreakerState, new: BreakerState, period: float) -> None:
        self._metrics.breaker_state.labels(self.name).set(new.gauge)
        log.warning(
            "breaker_transition", provider=self.name, old=old.value, new=new.value, open_s=period
        )


Factory = Callable[[Settings, Metrics], EvervaultProvider]
