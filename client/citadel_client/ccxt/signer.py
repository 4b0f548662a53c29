"""Per exchange object: the calls ccxt makes to its primitives, turned into ``/sign`` requests."""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final

from citadel_client.ccxt.errors import NotCovered
from citadel_client.ccxt.forms import _sign_kwargs, _stand_in
from citadel_client.ccxt.keys import (
    _SIGNATURE_BYTES,
    _Call,
    _ccxt_constants,
    _Credential,
    _Key,
    _message_fields,
    _to_out,
)

# -- the per-instance machinery --------------------------------------------------------------------

# ccxt's sources of time and randomness: recorded at an async request's first sign()
# and played back at the next, so that both runs build the same messages.
_TAPED: Final = (
    "milliseconds",
    "seconds",
    "microseconds",
    "nonce",
    "incrementing_nonce",
    "uuid",
    "uuid16",
    "uuid22",
    "uuidv1",
    "random_bytes",
    "rand_number",
)
_MAX_ROUNDS: Final = 4  # sign() runs per async request: one more per chained signature


def _call_key(call: _Call) -> tuple[str, str, bytes, str, str]:
    return (
        call.key.ciphertext,
        call.algorithm,
        call.message,
        call.key_encoding,
        call.signature_encoding,
    )


class _Round:
    """One async request's runs of sign(): the tape, the signatures known, the ones missing."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Copies: ccxt's sign() may add to the params it is given (OKX adds clOrdId),
        # and the second run must start from what the first one saw.
        self.args = copy.deepcopy(args)
        self.kwargs = copy.deepcopy(kwargs)
        self.tape: list[tuple[str, Any]] = []
        self.replaying = False
        self.position = 0
        self.depth = 0
        self.known: dict[tuple[str, str, bytes, str, str], str | bytes] = {}
        self.missing: list[_Call] = []
        self.first: tuple[str, str] = ("", "")  # the first run's URL and method


class _Signer:
    """What an adapted exchange object holds: its credentials, and how it reaches Citadel."""

    def __init__(
        self,
        ex: Any,
        client: Any,
        asynchronous: bool,
        secrets: dict[str, str],
        context: Mapping[str, str] | None,
        originals: dict[str, Callable[..., Any]],
        plain_values: set[object],
    ) -> None:
        self.ex = ex
        self.client = client
        self.asynchronous = asynchronous
        self.secrets = secrets  # credential name -> ciphertext
        self.context = context
        self.originals = originals
        self.credentials: dict[str, _Credential] = {}
        # Keys ccxt may sign with itself: its own constants (broker ids in its options)
        # and the config's other values (the passphrase, the uid), which are no secret
        # of Citadel's.
        self.constants: set[object] = set(plain_values)
        _ccxt_constants(getattr(ex, "options", {}), self.constants)
        self.round: _Round | None = None
        self.last_round: _Round | None = None
        self.batcher: _Batcher | None = None

    @property
    def ready(self) -> bool:
        return len(self.credentials) == len(self.secrets)

    def adopt(self, name: str, form: str) -> None:
        stand_in = _stand_in(form)
        self.credentials[name] = _Credential(name, self.secrets[name], form, stand_in)
        setattr(self.ex, name, stand_in)

    # -- recognising keys --

    def key_for(self, value: object) -> _Key | None:
        """The credential ``value`` is a form of; None for the keys ccxt may use itself.

        Any other key (one derived from the secret, say, or the secret not yet
        resolved) is :class:`NotCovered`: the adapter never lets ccxt sign
        with something it cannot vouch for.
        """
        if isinstance(value, bytearray | memoryview):
            value = bytes(value)
        if isinstance(value, str | bytes):
            for cred in self.credentials.values():
                known = cred.keys.get(value)
                if known is not None:
                    return known
            if value in self.constants:
                return None
        for cred in self.credentials.values():
            if cred.touches(value):
                raise NotCovered(
                    f"{self.ex.id} derives a key from its {cred.name}, which /sign cannot do."
                )
        raise NotCovered(
            f"{self.ex.id} signs with a key that is neither a Citadel ciphertext's "
            "nor one of ccxt's own constants."
        )

    def refuse_tainted(self, what: str, value: object) -> None:
        """NotCovered when ``value`` holds a credential's stand-in: ccxt would {what} it."""
        for cred in self.credentials.values():
            if cred.touches(value):
                raise NotCovered(
                    f"{self.ex.id} would {what} its {cred.name}, which /sign cannot do."
                )

    # -- the clock and random ids of an async request --

    def taped(self, name: str, produce: Callable[[], Any]) -> Any:
        run = self.round
        if run is None or run.depth:
            return produce()
        if run.replaying:
            if run.position >= len(run.tape) or run.tape[run.position][0] != name:
                raise NotCovered(f"{self.ex.id} signs differently on a second run of sign().")
            value = run.tape[run.position][1]
            run.position += 1
            return value
        run.depth += 1
        try:
            value = produce()
        finally:
            run.depth -= 1
        run.tape.append((name, value))
        return value

    # -- signing --

    def signature(self, call: _Call) -> str | bytes:
        """Sync: Citadel's signature now. Async: one a previous run fetched, or a placeholder."""
        run = self.round
        if run is not None:
            known = run.known.get(_call_key(call))
            if known is not None:
                return known
            run.missing.append(call)
            return _placeholder(call)
        if self.asynchronous:
            raise NotCovered(
                f"{self.ex.id} signs outside a REST request (e.g. a websocket authenticate), "
                "which the async adapter cannot route to Citadel."
            )
        return _to_out(self._sign_sync(call), call)

    def _sign_args(self, call: _Call) -> tuple[tuple[Any, ...], dict[str, Any]]:
        message, message_encoding = _message_fields(call.message)
        kwargs: dict[str, Any] = {
            "algorithm": call.algorithm,
            "message_encoding": message_encoding,
            "key_encoding": call.key_encoding,
            "signature_encoding": call.signature_encoding,
            **_sign_kwargs(self.context),
        }
        return (call.key.ciphertext, message), kwargs

    def _sign_sync(self, call: _Call) -> str:
        args, kwargs = self._sign_args(call)
        signature: str = self.client.sign(*args, **kwargs)
        return signature

    async def fetch_missing(self, run: _Round) -> None:
        """Citadel's signatures for the calls the last run of sign() missed, concurrently."""
        client = self.client
        calls = list({_call_key(c): c for c in run.missing}.values())
        run.missing = []

        batcher = self.batcher

        async def one(call: _Call) -> str:
            args, kwargs = self._sign_args(call)
            if batcher is not None:
                return await batcher.sign(args, kwargs)
            signature: str = await client.sign(*args, **kwargs)
            return signature

        signatures = await asyncio.gather(*(one(call) for call in calls))
        for call, signature in zip(calls, signatures, strict=True):
            run.known[_call_key(call)] = _to_out(signature, call)


class _Batcher:
    """Sends the signatures that concurrent requests wait for together, in ``sign_many`` batches.

    Self-clocking: a call goes out at once while fewer than ``max_inflight``
    batches are in flight; otherwise it waits with the others for the next
    batch, so batches grow with the load. Per-item errors go to their own
    request; an error of the whole batch (429, 503, ...) to every request in it.
    """

    def __init__(self, client: Any, max_inflight: int = 2, max_items: int = 100) -> None:
        self.client = client
        self.max_inflight = max_inflight
        self.max_items = max_items
        self.pending: list[tuple[dict[str, Any], asyncio.Future[str]]] = []
        self.inflight = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def sign(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        ciphertext, message = args
        item = {"encrypted_data": ciphertext, "message": message, **kwargs}
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        self._maybe_send()
        return await future

    def _maybe_send(self) -> None:
        while self.pending and self.inflight < self.max_inflight:
            batch, self.pending = (
                self.pending[: self.max_items],
                self.pending[self.max_items :],
            )
            self.inflight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: list[tuple[dict[str, Any], asyncio.Future[str]]]) -> None:
        try:
            if len(batch) == 1:
                ((item, future),) = batch
                body = dict(item)
                ciphertext, message = body.pop("encrypted_data"), body.pop("message")
                try:
                    future.set_result(await self.client.sign(ciphertext, message, **body))
                except Exception as exc:
                    future.set_exception(exc)
                return
            try:
                results = await self.client.sign_many([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    future.set_exception(exc)
                return
            for (_, future), result in zip(batch, results, strict=True):
                if result.error is not None:
                    future.set_exception(result.error)
                else:
                    future.set_result(result.value)
        finally:
            self.inflight -= 1
            self._maybe_send()


_BATCHERS: weakref.WeakKeyDictionary[object, _Batcher] = weakref.WeakKeyDictionary()


def _placeholder(call: _Call) -> str | bytes:
    raw = os.urandom(_SIGNATURE_BYTES[call.algorithm])
    if call.out == "binary":
        return raw
    if call.out == "hex":
        return raw.hex()
    if call.out == "base64":
        return base64.b64encode(raw).decode("ascii")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
