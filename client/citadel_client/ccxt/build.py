"""Building the exchange objects: ``exchange()`` and ``async_exchange()``."""

from __future__ import annotations

import importlib
import inspect
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any, Final

from citadel_client.ccxt.errors import NotCovered
from citadel_client.ccxt.forms import FORMS, learn_form, learn_form_async
from citadel_client.ccxt.primitives import _ENCODERS, _install
from citadel_client.ccxt.signer import (
    _BATCHERS,
    _MAX_ROUNDS,
    _TAPED,
    _Batcher,
    _Round,
    _Signer,
)
from citadel_client.client import AsyncCitadelClient, CitadelClient

# -- building the objects --------------------------------------------------------------------------

_CREDENTIALS: Final = ("secret", "privateKey")
# The encodings ccxt puts credentials through to send them (HTTP Basic and such).
_PRIMITIVES: Final = ("hmac", "rsa", "eddsa", "ecdsa", "hash", "jwt", *_ENCODERS)
_UNRESOLVED: Final = "citadel-unresolved-"


def _split_config(
    config: Mapping[str, Any],
) -> tuple[
    dict[str, Any],
    dict[str, str],
    Mapping[str, str] | None,
    set[object],
    dict[str, str],
    bool,
]:
    conf = dict(config)
    context = conf.pop("citadel_context", None)
    batch = bool(conf.pop("citadel_batch", False))
    given = conf.pop("citadel_form", None)
    forms: dict[str, str] = {"secret": given} if isinstance(given, str) else dict(given or {})
    for name, form in forms.items():
        if name not in _CREDENTIALS or form not in FORMS:
            raise ValueError(f"citadel_form: {name!r} must be one of {', '.join(FORMS)}")
    secrets = {
        name: conf[name] for name in _CREDENTIALS if isinstance(conf.get(name), str) and conf[name]
    }
    plain: set[object] = set()
    for name, value in conf.items():
        if name not in _CREDENTIALS and isinstance(value, str) and value:
            plain.update((value, value.encode("utf-8")))
    for name in secrets:
        conf[name] = _UNRESOLVED + name
    return conf, secrets, context, plain, forms, batch


def _resolve_class(module: Any, exchange_id: str | type) -> Any:
    if isinstance(exchange_id, type):
        return exchange_id
    cls = getattr(module, exchange_id, None)
    if not isinstance(cls, type) or exchange_id not in getattr(module, "exchanges", ()):
        raise ValueError(f"ccxt has no exchange {exchange_id!r}")
    return cls


def _check_context_support(client: object, context: object) -> None:
    sign = getattr(client, "sign", None)
    if context is not None and "context" not in inspect.signature(sign).parameters:  # type: ignore[arg-type]
        raise NotCovered("This citadel-client cannot send an encryption context (citadel_context).")


def _texts(value: Any) -> Iterator[str]:
    """The strings of a request part: itself, a dict's keys and values, bytes decoded."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes | bytearray):
        yield bytes(value).decode("utf-8", "replace")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _texts(key)
            yield from _texts(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item)


def _refuse_secret_in_request(signer: _Signer, request: Mapping[str, Any]) -> None:
    """NotCovered when the request carries a credential's stand-in (ccxt sends it as it is)."""
    texts = list(_texts([request.get("url"), request.get("headers"), request.get("body")]))
    for cred in signer.credentials.values():
        forms = {
            cred.stand_in,
            urllib.parse.quote(cred.stand_in, safe=""),
            urllib.parse.quote_plus(cred.stand_in),
        }
        if any(form in text for form in forms for text in texts):
            raise NotCovered(
                f"{signer.ex.id} sends its {cred.name} itself, which Citadel never gives out."
            )


def _taped_methods(base: Any) -> dict[str, Any]:
    """Subclass methods recording ccxt's clock and ids for an async request's second run."""

    def make(name: str) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            produce = getattr(super(cls_holder[0], self), name)
            signer = self.__dict__.get("_citadel")  # absent while ccxt's __init__ runs
            if signer is None:
                return produce(*args, **kwargs)
            return signer.taped(name, lambda: produce(*args, **kwargs))

        method.__name__ = name
        return method

    cls_holder: list[Any] = []
    methods = {name: make(name) for name in _TAPED if hasattr(base, name)}
    methods["_citadel_holder"] = cls_holder
    return methods


def _new(
    base: Any,
    namespace: dict[str, Any],
    client: Any,
    asynchronous: bool,
    config: Mapping[str, Any],
) -> Any:
    conf, secrets, context, plain, forms, batch = _split_config(config)
    _check_context_support(client, context)
    originals = {name: getattr(base, name) for name in _PRIMITIVES}
    namespace = {**namespace, "__module__": __name__}
    cls = type(base.__name__, (base,), namespace)
    holder = namespace.get("_citadel_holder")
    if isinstance(holder, list):
        holder.append(cls)
    ex = cls(conf)
    ex._citadel = _Signer(ex, client, asynchronous, secrets, context, originals, plain)
    for name, form in forms.items():
        if name in secrets:
            ex._citadel.adopt(name, form)  # recorded at onboarding: no trial /sign calls
    if batch and asynchronous:
        # One batcher per client: every exchange object sharing it shares its batches.
        ex._citadel.batcher = _BATCHERS.get(client)
        if ex._citadel.batcher is None:
            ex._citadel.batcher = _BATCHERS[client] = _Batcher(client)
    _install(ex, ex._citadel)
    return ex


def exchange(exchange_id: str | type, client: CitadelClient, config: Mapping[str, Any]) -> Any:
    """An instance of ``ccxt.<exchange_id>`` whose secret is the ciphertext in ``config``.

    ``exchange_id`` may also be a subclass of a ccxt exchange class (your own,
    or one whose ``fetch`` a test replaces). Requests sign through ``client``
    (whose caller needs the ``sign`` operation only); the secret's form is
    learned from Citadel at the first request.
    """
    base = _resolve_class(importlib.import_module("ccxt"), exchange_id)

    def _prepare(self: Any) -> None:
        signer: _Signer = self._citadel
        for name, ciphertext in signer.secrets.items():
            if name not in signer.credentials:
                signer.adopt(name, learn_form(signer.client, ciphertext, signer.context))

    def fetch2(self: Any, *args: Any, **kwargs: Any) -> Any:
        _prepare(self)
        return base.fetch2(self, *args, **kwargs)

    def sign(self: Any, *args: Any, **kwargs: Any) -> Any:
        _prepare(self)
        request = base.sign(self, *args, **kwargs)
        _refuse_secret_in_request(self._citadel, request)
        return request

    def signed_request(
        self: Any,
        path: str,
        api: Any = "public",
        method: str = "GET",
        params: Any = None,
    ) -> Any:
        """The request ccxt would send (url, method, headers, body), signed, without sending it."""
        return self.sign(path, api, method, params or {})

    namespace = {"fetch2": fetch2, "sign": sign, "signed_request": signed_request}
    return _new(base, namespace, client, False, config)


def async_exchange(
    exchange_id: str | type, client: AsyncCitadelClient, config: Mapping[str, Any]
) -> Any:
    """An instance of ``ccxt.async_support.<exchange_id>`` whose secret is ``config``'s ciphertext.

    Never blocks its event loop on Citadel: the secret's form is learned at the
    first request (awaited); ``sign()`` runs with placeholder signatures to
    learn the messages, and ``fetch`` awaits Citadel's signatures for them and
    runs ``sign()`` again on the same recorded clock and ids, with the real
    signatures, before ccxt's own ``fetch`` sends the request.
    """
    base = _resolve_class(importlib.import_module("ccxt.async_support"), exchange_id)

    async def fetch2(self: Any, *args: Any, **kwargs: Any) -> Any:
        await _learn(self)
        return await base.fetch2(self, *args, **kwargs)

    def sign(self: Any, *args: Any, **kwargs: Any) -> Any:
        signer: _Signer = self._citadel
        if not signer.ready:
            raise NotCovered(f"{self.id}: sign() before the first request of the async adapter.")
        run = _Round(args, kwargs)
        signer.round = run
        try:
            request = base.sign(self, *args, **kwargs)
        finally:
            signer.round = None
        _refuse_secret_in_request(signer, request)
        # fetch2 awaits fetch right after sign, with nothing awaited between: the
        # fetch that follows is this request's (checked there by URL and method).
        run.first = (request.get("url", ""), request.get("method", ""))
        signer.last_round = run if run.missing else None
        return request

    async def _learn(self: Any) -> None:
        signer: _Signer = self._citadel
        for name, ciphertext in signer.secrets.items():
            if name not in signer.credentials:
                form = await learn_form_async(signer.client, ciphertext, signer.context)
                if name not in signer.credentials:
                    signer.adopt(name, form)

    async def _complete(self: Any, run: _Round) -> Any:
        """The request of ``run``, its signatures Citadel's (sign() run again, replayed)."""
        signer: _Signer = self._citadel
        for _ in range(_MAX_ROUNDS):
            await signer.fetch_missing(run)
            run.replaying, run.position = True, 0
            signer.round = run
            try:
                request = base.sign(self, *run.args, **run.kwargs)
            finally:
                signer.round = None
            if not run.missing:
                _refuse_secret_in_request(signer, request)
                return request
        raise NotCovered(f"{self.id} chains more signatures than the adapter follows.")

    async def fetch(
        self: Any, url: str, method: str = "GET", headers: Any = None, body: Any = None
    ) -> Any:
        signer: _Signer = self._citadel
        run, signer.last_round = signer.last_round, None
        if run is not None:
            if (url, method) != run.first:
                raise NotCovered(f"{self.id} sends a request other than the one it signed last.")
            request = await _complete(self, run)
            url, method = request["url"], request["method"]
            headers, body = request["headers"], request["body"]
        return await base.fetch(self, url, method, headers, body)

    async def signed_request(
        self: Any,
        path: str,
        api: Any = "public",
        method: str = "GET",
        params: Any = None,
    ) -> Any:
        """The request ccxt would send (url, method, headers, body), signed, without sending it."""
        await _learn(self)
        signer: _Signer = self._citadel
        request = self.sign(path, api, method, params or {})
        run, signer.last_round = signer.last_round, None
        return request if run is None else await _complete(self, run)

    namespace = {
        "fetch2": fetch2,
        "sign": sign,
        "fetch": fetch,
        "signed_request": signed_request,
        **_taped_methods(base),
    }
    return _new(base, namespace, client, True, config)
