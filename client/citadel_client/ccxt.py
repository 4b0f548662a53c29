"""ccxt exchanges that sign through Citadel: the exchange secret is only ever a ciphertext.

``exchange(id, client, config)`` and ``async_exchange(id, client, config)``
return an instance of ccxt's own class for ``id`` (a per-instance subclass of
it), built from ccxt's own ``config`` except that ``secret`` and
``privateKey`` hold the ciphertexts ``/encrypt`` returned for them. ccxt builds
every request as it always does; where it would compute a signature with the
secret, the adapter asks Citadel's ``/sign`` for it instead.

How (``docs/ccxt.md`` has the long form):

- ccxt decides how to sign from the secret's *form* (a PEM or not, its
  length, whether it is base64), so the object's ``secret`` is a *stand-in*:
  a string of the same form as the real secret, holding nothing of it. The
  form is learned once per ciphertext from Citadel itself, by trial
  ``/sign`` calls on a fixed message under the ``sign`` operation (which of
  a few algorithm and key-encoding pairs the secret parses as), never from
  the secret's value.
- ccxt's signing primitives (``hmac``, ``rsa``, ``eddsa``, ``ecdsa``,
  ``jwt``, ``hash``) are replaced on the instance, never on a ccxt class.
  A call whose key is the stand-in (or a form of it ccxt made: its bytes,
  its base64 or hex decoding, the 32-byte seed of a 64-byte Ed25519 key)
  becomes one ``/sign`` request; a key that is one of ccxt's own constants
  (a broker id in its options) or another config value (a passphrase) is
  left to ccxt; any other key (one derived from the secret), a scheme
  ``/sign`` lacks, or the secret hashed, encoded or sent as it is raises
  :class:`NotCovered` before anything is sent.
- Sync: the primitive blocks on Citadel, as ccxt blocks on the exchange.
  Async: ccxt's ``sign()`` is synchronous, so it runs once with placeholder
  signatures, recording the messages and ccxt's clock and random ids; the
  request's ``fetch`` awaits Citadel for the messages, then runs ``sign()``
  again with the recorded clock and ids played back and the real
  signatures, and ccxt's own ``fetch`` sends that request. The event loop
  never waits on Citadel, and ccxt's throttling, retries (each retry signs
  again) and several keyed calls in one request (KuCoin's passphrase) are
  ccxt's own. ``citadel_batch`` sends concurrent requests' signatures in
  shared ``sign_many`` batches.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import importlib
import inspect
import json
import os
import re
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from citadel_client.client import AsyncCitadelClient, CitadelClient
from citadel_client.errors import CitadelError, InvalidKey

__all__ = ["FORMS", "NotCovered", "async_exchange", "exchange", "learn_form", "secret_form"]


class NotCovered(CitadelError):
    """ccxt would sign this request in a way ``/sign`` cannot do; nothing was sent.

    Raised before the request leaves the process: the adapter never signs
    with anything but Citadel, and never sends a request ccxt would have
    signed differently.
    """

    code = "not_covered"
    status = 0
    default_detail = "This request is signed in a way Citadel's /sign does not cover."


# -- the secret's form, learned from Citadel -------------------------------------------------------

# The fixed message of the trial signatures. Its signatures say nothing about the
# secret beyond whether it parses as each kind of key (anyone holding `sign` could
# ask for signatures of any message anyway).
PROBE_MESSAGE: Final = "citadel-client ccxt form probe"
# (form, algorithm, key_encoding), the most specific form first.
_PROBES: Final = (
    ("rsa-pem", "rsa-pkcs1v15-sha256", "pem"),
    ("ed25519-pem", "ed25519", "pem"),
    ("ec-pem", "ecdsa-p256-sha256", "pem"),
    ("ed25519-base64", "ed25519", "base64"),
    ("ed25519-hex", "ed25519", "hex"),
    ("hex", "hmac-sha256", "hex"),
    ("base64", "hmac-sha256", "base64"),
)
FORMS: Final = (*(form for form, _, _ in _PROBES), "text")

_FORM_CACHE: weakref.WeakKeyDictionary[object, dict[tuple[str, str], str]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_LOCK = threading.Lock()


def _cache_key(ciphertext: str, context: Mapping[str, str] | None) -> tuple[str, str]:
    return ciphertext, json.dumps(dict(context or {}), sort_keys=True)


def _form_of(answers: dict[str, bool]) -> str:
    """The form of a secret from which probes it passed (``text``: none but utf-8 HMAC)."""
    for form, _, _ in _PROBES:
        if answers.get(form):
            return form
    return "text"


def _sign_kwargs(context: Mapping[str, str] | None) -> dict[str, Any]:
    return {} if context is None else {"context": dict(context)}


def learn_form(
    client: CitadelClient, ciphertext: str, context: Mapping[str, str] | None = None
) -> str:
    """The form of the secret in ``ciphertext`` (one of :data:`FORMS`), by trial ``/sign`` calls.

    What it reveals to this process: which of the probed kinds of key the secret
    parses as (an RSA, Ed25519 or P-256 PEM, an Ed25519 key in base64 or hex, a
    hex or base64 string, or other text), nothing of its value or length.
    Cached per client and ciphertext.
    """
    key = _cache_key(ciphertext, context)
    with _CACHE_LOCK:
        cached = _FORM_CACHE.setdefault(client, {}).get(key)
    if cached is not None:
        return cached
    answers: dict[str, bool] = {}
    for form, algorithm, key_encoding in _PROBES:
        try:
            client.sign(
                ciphertext,
                PROBE_MESSAGE,
                algorithm=algorithm,  # type: ignore[arg-type]
                key_encoding=key_encoding,  # type: ignore[arg-type]
                **_sign_kwargs(context),
            )
        except InvalidKey:
            answers[form] = False
        else:
            answers[form] = True
            if form.endswith("-pem"):
                break  # the PEM forms exclude each other and every other form
    form = _form_of(answers)
    with _CACHE_LOCK:
        _FORM_CACHE.setdefault(client, {})[key] = form
    return form


async def learn_form_async(
    client: AsyncCitadelClient, ciphertext: str, context: Mapping[str, str] | None = None
) -> str:
    """:func:`learn_form` with the async client (the probes run concurrently).

    Concurrent first requests for one ciphertext share one set of probes.
    """
    key = _cache_key(ciphertext, context)
    cached = _FORM_CACHE.setdefault(client, {}).get(key)
    if cached is not None:
        return cached
    inflight = _LEARNING.setdefault(client, {})
    task = inflight.get(key)
    if task is None:
        task = inflight[key] = asyncio.ensure_future(_probe_all(client, ciphertext, context))
        task.add_done_callback(lambda _: inflight.pop(key, None))
    form = await asyncio.shield(task)
    _FORM_CACHE.setdefault(client, {})[key] = form
    return form


_LEARNING: weakref.WeakKeyDictionary[object, dict[tuple[str, str], asyncio.Future[str]]] = (
    weakref.WeakKeyDictionary()
)


async def _probe_all(
    client: AsyncCitadelClient, ciphertext: str, context: Mapping[str, str] | None
) -> str:
    async def probe(algorithm: str, key_encoding: str) -> bool:
        try:
            await client.sign(
                ciphertext,
                PROBE_MESSAGE,
                algorithm=algorithm,  # type: ignore[arg-type]
                key_encoding=key_encoding,  # type: ignore[arg-type]
                **_sign_kwargs(context),
            )
        except InvalidKey:
            return False
        return True

    results = await asyncio.gather(*(probe(a, e) for _, a, e in _PROBES))
    return _form_of({f: ok for (f, _, _), ok in zip(_PROBES, results, strict=True)})


_HEX_PAIRS: Final = re.compile(r"(?:[0-9A-Fa-f]{2})+")


def _canonical_b64(text: str) -> bytes | None:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, ValueError):
        return None
    return raw if raw and base64.b64encode(raw) == text.encode("ascii") else None


def _ed25519_raw_ok(raw: bytes) -> bool:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if len(raw) == 32:
        return True
    if len(raw) != 64:
        return False
    public = Ed25519PrivateKey.from_private_bytes(raw[:32]).public_key()
    return public.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw) == raw[32:]


def secret_form(secret: str) -> str:
    """The form of a plaintext secret, as :func:`learn_form` would learn it from Citadel.

    For Sentinel at onboarding, which holds the plaintext then: stored beside
    the ciphertext and passed as ``citadel_form``, it spares Conductor the
    trial ``/sign`` calls (and their ``invalid_key`` audit lines). Needs
    cryptography, which the ``ccxt`` extra brings.
    """
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if "-----BEGIN" in secret:
        try:
            key = load_pem_private_key(
                secret.encode("utf-8", "replace"), None, unsafe_skip_rsa_key_validation=True
            )
        except (TypeError, ValueError, Exception):
            return "text"
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size in (2048, 3072, 4096):
            return "rsa-pem"
        if isinstance(key, Ed25519PrivateKey):
            return "ed25519-pem"
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            return "ec-pem"
        return "text"
    raw64 = _canonical_b64(secret)
    is_hex = _HEX_PAIRS.fullmatch(secret) is not None
    if raw64 is not None and _ed25519_raw_ok(raw64):
        return "ed25519-base64"
    if is_hex and _ed25519_raw_ok(bytes.fromhex(secret)):
        return "ed25519-hex"
    if is_hex:
        return "hex"
    if raw64 is not None:
        return "base64"
    return "text"


def _stand_in(form: str) -> str:
    """A string of ``form`` that holds nothing of any secret (random, fresh per object).

    Its shape follows what ccxt tests: PEMs carry their label and a length on
    the right side of Binance's 120-character line between Ed25519 and RSA;
    an Ed25519 key in base64 is 88 characters (Coinbase's test); a base64 HMAC
    secret has no padding (so Coinbase does not take it for an Ed25519 key).
    The PEM bodies are not base64 DER, so nothing can ever load them as a key.
    """
    token = os.urandom(16).hex()
    if form == "rsa-pem":
        body = "\n".join(["CITADELSTANDIN" + token] * 26)
        return f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"
    if form == "ed25519-pem":
        return (
            f"-----BEGIN PRIVATE KEY-----\nCITADELSTANDIN{token[:32]}\n-----END PRIVATE KEY-----\n"
        )
    if form == "ec-pem":
        body = "\n".join(["CITADELSTANDIN" + token] * 4)
        return f"-----BEGIN EC PRIVATE KEY-----\n{body}\n-----END EC PRIVATE KEY-----\n"
    if form == "ed25519-base64":
        return base64.b64encode(os.urandom(64)).decode("ascii")
    if form == "ed25519-hex":
        return os.urandom(64).hex()
    if form == "hex":
        # 33 bytes: 66 hex digits, not a multiple of 4, so not base64 as well.
        return os.urandom(33).hex()
    if form == "base64":
        return base64.b64encode(os.urandom(30)).decode("ascii")
    return "citadel-stand-in-" + token


# -- the keys ccxt may use, and what Citadel signs with for each --------------------------------


@dataclass(frozen=True, slots=True)
class _Key:
    """A value ccxt may pass as a key: which ciphertext and how Citadel reads the secret."""

    ciphertext: str
    form: str
    key_encoding: str  # for HMAC; asymmetric forms use their own


@dataclass
class _Credential:
    name: str
    ciphertext: str
    form: str
    stand_in: str
    keys: dict[object, _Key] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.stand_in
        self.keys[s] = _Key(self.ciphertext, self.form, "utf-8")
        self.keys[s.encode("utf-8")] = _Key(self.ciphertext, self.form, "utf-8")
        if self.form in ("base64", "ed25519-base64"):
            raw = base64.b64decode(s)
            self.keys[raw] = _Key(self.ciphertext, self.form, "base64")
            if self.form == "ed25519-base64":
                self.keys[raw[:32]] = _Key(self.ciphertext, self.form, "base64")
        if self.form in ("hex", "ed25519-hex"):
            raw = bytes.fromhex(s)
            self.keys[raw] = _Key(self.ciphertext, self.form, "hex")
            if self.form == "ed25519-hex":
                self.keys[raw[:32]] = _Key(self.ciphertext, self.form, "hex")

    def touches(self, value: object) -> bool:
        """Whether ``value`` holds or is part of the stand-in in any form (a derived key)."""
        if isinstance(value, bytearray):
            value = bytes(value)
        for known in self.keys:
            if type(known) is not type(value) or not isinstance(value, str | bytes):
                continue
            if len(value) >= 8 and (value in known or known in value):  # type: ignore[operator]
                return True
        return False


@dataclass(frozen=True, slots=True)
class _Call:
    """One signature to ask Citadel for."""

    key: _Key
    algorithm: str
    message: bytes
    key_encoding: str
    signature_encoding: str  # hex, base64, base64url
    out: str  # what ccxt's primitive returned: "hex", "base64", "base64url", "binary"


_HMAC_ALGORITHMS: Final = {
    hashlib.sha256: "hmac-sha256",
    hashlib.sha384: "hmac-sha384",
    hashlib.sha512: "hmac-sha512",
}
_JWT_HMAC: Final = {"sha256": "hmac-sha256", "sha384": "hmac-sha384", "sha512": "hmac-sha512"}
_SIGNATURE_BYTES: Final = {
    "hmac-sha256": 32,
    "hmac-sha384": 48,
    "hmac-sha512": 64,
    "ed25519": 64,
    "ecdsa-p256-sha256": 64,
    "rsa-pkcs1v15-sha256": 256,
}


def _message_fields(message: bytes) -> tuple[str, str]:
    try:
        return message.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(message).decode("ascii"), "base64"


def _to_out(signature: str, call: _Call) -> str | bytes:
    """Citadel's signature in the shape ccxt's primitive returns."""
    if call.out == "binary":
        return bytes.fromhex(signature)
    return signature


def _ccxt_constants(value: object, found: set[object]) -> None:
    """Every string in ccxt's own options (broker ids and keys that ccxt ships)."""
    if isinstance(value, str) and len(value) >= 8:
        found.add(value)
        found.add(value.encode("utf-8"))
    elif isinstance(value, Mapping):
        for item in value.values():
            _ccxt_constants(item, found)
    elif isinstance(value, list | tuple):
        for item in value:
            _ccxt_constants(item, found)


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
            batch, self.pending = self.pending[: self.max_items], self.pending[self.max_items :]
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


# -- the primitives, per instance ------------------------------------------------------------------


def _install(ex: Any, signer: _Signer) -> None:
    """Replace ccxt's signing primitives on ``ex`` alone; its class and other objects keep them."""
    orig = signer.originals

    def hmac_(
        request: Any, secret: Any, algorithm: Any = hashlib.sha256, digest: str = "hex"
    ) -> Any:
        key = signer.key_for(secret)
        if key is None:
            signer.refuse_tainted("sign a message holding", request)
            return orig["hmac"](request, secret, algorithm, digest)
        name = _HMAC_ALGORITHMS.get(algorithm)
        if name is None:
            raise NotCovered(f"{ex.id} signs with an HMAC hash that /sign does not offer.")
        if key.form.endswith("-pem"):
            raise NotCovered(f"{ex.id} uses a PEM key as an HMAC secret.")
        encoding = {"hex": "hex", "base64": "base64"}.get(digest, "hex")
        call = _Call(
            key,
            name,
            bytes(request),
            key.key_encoding,
            encoding,
            digest if digest in ("hex", "base64") else "binary",
        )
        return signer.signature(call)

    def rsa_(request: Any, secret: Any, alg: str = "sha256", padding_mode: str = "pkcs1") -> Any:
        key = signer.key_for(secret)
        if key is None:
            return orig["rsa"](request, secret, alg, padding_mode)
        if key.form != "rsa-pem" or alg != "sha256" or padding_mode != "pkcs1":
            raise NotCovered(f"{ex.id} signs with an RSA scheme other than PKCS#1 v1.5 SHA-256.")
        msg = request.encode("utf-8") if isinstance(request, str) else bytes(request)
        return signer.signature(_Call(key, "rsa-pkcs1v15-sha256", msg, "pem", "base64", "base64"))

    def eddsa_(request: Any, secret: Any, curve: str = "ed25519", url_encode: bool = False) -> Any:
        key = signer.key_for(secret)
        if key is None:
            return orig["eddsa"](request, secret, curve, url_encode)
        if curve != "ed25519" or key.form not in ("ed25519-pem", "ed25519-base64", "ed25519-hex"):
            raise NotCovered(f"{ex.id} signs with an EdDSA key /sign cannot read.")
        encoding = {"ed25519-pem": "pem", "ed25519-base64": "base64", "ed25519-hex": "hex"}[
            key.form
        ]
        out = "base64url" if url_encode else "base64"
        msg = request.encode("utf-8") if isinstance(request, str) else bytes(request)
        return signer.signature(_Call(key, "ed25519", msg, encoding, out, out))

    def ecdsa_(
        request: Any,
        secret: Any,
        algorithm: str = "p256",
        hash: Any = None,
        fixed_length: bool = False,
    ) -> Any:
        key = signer.key_for(secret)
        if key is None:
            return orig["ecdsa"](request, secret, algorithm, hash, fixed_length)
        # ccxt's ecdsa returns a recovery id too, which needs the public key; and
        # secp256k1 over a caller's digest would make Citadel a blind signer.
        raise NotCovered(
            f"{ex.id} signs with ECDSA ({algorithm}) outside a JWT, which /sign does not cover."
        )

    def hash_(request: Any, algorithm: str = "md5", digest: str = "hex") -> Any:
        signer.refuse_tainted("hash a value holding", request)
        return orig["hash"](request, algorithm, digest)

    def jwt_(
        request: Any, secret: Any, algorithm: str = "sha256", is_rsa: bool = False, opts: Any = None
    ) -> Any:
        opts = opts or {}
        key = signer.key_for(secret)
        if key is None:
            return orig["jwt"](request, secret, algorithm, is_rsa, opts)
        alg = ("RS" if is_rsa else "HS") + algorithm[3:]
        if opts.get("alg") is not None:
            alg = opts["alg"]
        header_opts = {"alg": alg, "typ": "JWT"}
        if opts.get("kid") is not None:
            header_opts["kid"] = opts["kid"]
        if opts.get("nonce") is not None:
            header_opts["nonce"] = opts["nonce"]
        header = ex.urlencode_base64(ex.encode(ex.json(header_opts)))
        data = ex.urlencode_base64(ex.encode(ex.json(request)))
        token = header + "." + data
        kind = alg[0:2]
        msg = token.encode("utf-8")
        if is_rsa or kind == "RS":
            if key.form != "rsa-pem" or algorithm != "sha256":
                raise NotCovered(f"{ex.id} signs a JWT with an RSA scheme /sign does not offer.")
            call = _Call(key, "rsa-pkcs1v15-sha256", msg, "pem", "base64url", "base64url")
        elif kind == "ES":
            if key.form != "ec-pem" or algorithm != "sha256":
                raise NotCovered(f"{ex.id} signs a JWT with an ECDSA scheme /sign does not offer.")
            call = _Call(key, "ecdsa-p256-sha256", msg, "pem", "base64url", "base64url")
        elif kind == "Ed":
            encoding = {"ed25519-pem": "pem", "ed25519-base64": "base64", "ed25519-hex": "hex"}.get(
                key.form
            )
            if encoding is None:
                raise NotCovered(f"{ex.id} signs an EdDSA JWT with a key /sign cannot read.")
            call = _Call(key, "ed25519", msg, encoding, "base64url", "base64url")
        else:
            name = _JWT_HMAC.get(algorithm)
            if name is None or key.form.endswith("-pem"):
                raise NotCovered(f"{ex.id} signs a JWT with an HMAC scheme /sign does not offer.")
            call = _Call(key, name, msg, key.key_encoding, "base64url", "base64url")
        return token + "." + _text(signer.signature(call))

    def encoder(name: str) -> Callable[..., Any]:
        original = orig[name]

        def encode_(value: Any, *args: Any) -> Any:
            signer.refuse_tainted("encode (to send) a value holding", value)
            return original(value, *args)

        return encode_

    for name in _ENCODERS:
        setattr(ex, name, encoder(name))
    for name, fn in (
        ("hmac", hmac_),
        ("rsa", rsa_),
        ("eddsa", eddsa_),
        ("ecdsa", ecdsa_),
        ("hash", hash_),
        ("jwt", jwt_),
    ):
        setattr(ex, name, fn)


# -- building the objects --------------------------------------------------------------------------

_CREDENTIALS: Final = ("secret", "privateKey")
# The encodings ccxt puts credentials through to send them (HTTP Basic and such).
_ENCODERS: Final = ("string_to_base64", "binary_to_base64", "urlencode_base64", "binary_to_base16")
_PRIMITIVES: Final = ("hmac", "rsa", "eddsa", "ecdsa", "hash", "jwt", *_ENCODERS)
_UNRESOLVED: Final = "citadel-unresolved-"


def _split_config(
    config: Mapping[str, Any],
) -> tuple[
    dict[str, Any], dict[str, str], Mapping[str, str] | None, set[object], dict[str, str], bool
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
    base: Any, namespace: dict[str, Any], client: Any, asynchronous: bool, config: Mapping[str, Any]
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
        self: Any, path: str, api: Any = "public", method: str = "GET", params: Any = None
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
        self: Any, path: str, api: Any = "public", method: str = "GET", params: Any = None
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
