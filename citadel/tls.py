"""TLS on Citadel's own listener: contexts, their reload, and the certificate as an identity.

- :func:`load_context` builds the server context from ``CITADEL_TLS_CERT_FILE``,
  ``CITADEL_TLS_KEY_FILE`` and ``CITADEL_TLS_CLIENT_CA_FILE``: TLS 1.3 at
  least, HTTP/1.1 by ALPN, a client certificate required when a client CA is
  set. Whatever is wrong raises :class:`SettingError` naming the setting,
  never its value (a path, a subject), so start-up stops with one line.
- :class:`ContextReloader` holds the context new connections get and polls
  the files once a second (as the keyring is followed): a change builds a new
  context off the event loop and swaps it in; connections in flight keep the
  one they were made with; a broken replacement keeps the context in force
  and logs ``tls_reload_failed``.
- :func:`peer_identities` reads the URI and DNS names of a connection's
  verified client certificate, and :class:`CallerBinding` says whether the
  caller an API key belongs to is the caller the certificate names
  (``CITADEL_TLS_CALLER_IDENTITIES``): a stolen key alone, or a stolen
  certificate alone, authenticates nothing.

The listener itself (the handshake, its deadline, refused handshakes) is
:mod:`citadel.tls_listener`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from citadel.config import SettingError, Settings, read_secret_file
from citadel.setting_values import canonical_identity

log = structlog.get_logger("citadel")

CERT, KEY, CLIENT_CA = "CITADEL_TLS_CERT_FILE", "CITADEL_TLS_KEY_FILE", "CITADEL_TLS_CLIENT_CA_FILE"
IDENTITIES = "CITADEL_TLS_CALLER_IDENTITIES"
# Set in a request's scope by the HTTP protocol: the identities its connection's
# client certificate carries (see peer_identities), absent without TLS.
PEER_IDENTITIES = "citadel.tls_peer"
POLL_S = 1.0

Stamp = tuple[int, int, int, int, int, int] | None


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The files of the listener's TLS, and the environment that decides their modes' rule."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    env: str = "development"

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsFiles | None:
        """The TLS files of ``settings``, or None when Citadel serves plain HTTP."""
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        return cls(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file, settings.env
        )

    def stamps(self) -> tuple[Stamp, ...]:
        """What identifies each file now (symlinks followed: a Secret mount swaps its target)."""
        return tuple(_stamp(p) for p in (self.cert, self.key, self.client_ca))


def _stamp(path: Path | None) -> Stamp:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode, st.st_uid)


@dataclass(frozen=True, slots=True)
class Loaded:
    """A built context and what an operator wants to know of it (no secret)."""

    context: ssl.SSLContext
    not_after: datetime
    mutual: bool

    @property
    def expired(self) -> bool:
        """Whether the certificate's validity has ended (clients will refuse it)."""
        return self.not_after <= datetime.now(UTC)


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingError(variable, f"cannot be read ({exc.strerror})") from None


def _no_passphrase() -> bytes:
    # OpenSSL would otherwise prompt on the terminal for an encrypted key.
    return b""


def load_context(files: TlsFiles) -> Loaded:
    """The server context for ``files``; :class:`SettingError` naming what is wrong.

    The certificate and key are checked with ``cryptography`` first, so that
    each failure says which file is at fault and how; then ``ssl`` loads them.
    """
    chain_pem = _read(files.cert, CERT)
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise SettingError(CERT, "is not a PEM certificate chain") from None
    try:
        key_pem = read_secret_file(files.key, KEY, files.env)
    except OSError as exc:
        raise SettingError(KEY, f"cannot be read ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise SettingError(
            KEY, "is encrypted; Citadel needs the key without a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SettingError(KEY, "is not a PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise SettingError(KEY, f"does not match the certificate of {CERT} (its first one)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(files.cert, files.key, password=_no_passphrase)
    except (OSError, ssl.SSLError):
        # Replaced between the checks above and this read: the next poll sees it.
        raise SettingError(CERT, "changed while it was read; it is read again") from None
    if files.client_ca is not None:
        bundle = _read(files.client_ca, CLIENT_CA)
        try:
            x509.load_pem_x509_certificates(bundle)
            context.load_verify_locations(cadata=bundle.decode("ascii"))
        except (ValueError, ssl.SSLError):
            raise SettingError(CLIENT_CA, "is not a PEM bundle of CA certificates") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return Loaded(context, chain[0].not_valid_after_utc, files.client_ca is not None)


class ContextReloader:
    """The context new connections get, following the files once a second.

    Built with the context start-up loaded (:meth:`load`); :meth:`ensure_polling` starts the
    poll on the running loop (the listener calls it at its first connection,
    in each worker process).
    """

    def __init__(self, files: TlsFiles, loaded: Loaded) -> None:
        self.files = files
        self.loaded = loaded
        self._seen = files.stamps()
        self._timer: asyncio.TimerHandle | None = None
        self._loading: asyncio.Future[Loaded] | None = None
        self.reloads = 0

    @classmethod
    def load(cls, files: TlsFiles) -> ContextReloader:
        """A reloader with the files loaded now (:class:`SettingError` when they cannot serve)."""
        stamps = files.stamps()
        loaded = load_context(files)
        reloader = cls(files, loaded)
        reloader._seen = stamps
        if loaded.expired:
            log.warning("tls_certificate_expired", setting=CERT, not_after=_iso(loaded.not_after))
        return reloader

    @property
    def current(self) -> ssl.SSLContext:
        """The context a connection accepted now is given."""
        return self.loaded.context

    def ensure_polling(self, loop: asyncio.AbstractEventLoop) -> None:
        """Poll on ``loop`` from now on; a change before the first connection is seen now."""
        if self._timer is None:
            self._timer = loop.call_later(POLL_S, self._poll, loop)
            if self.files.stamps() != self._seen:
                self._reload_now()

    def stop(self) -> None:
        """Stop polling (tests; a server's loop that closes drops the timer anyway)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = loop.call_later(POLL_S, self._poll, loop)
        if self._loading is not None:
            return
        stamps = self.files.stamps()
        if stamps == self._seen:
            return
        # Seen even if broken: a broken replacement is retried when it changes again.
        self._seen = stamps
        self._loading = loop.run_in_executor(None, load_context, self.files)
        self._loading.add_done_callback(self._loaded)

    def _loaded(self, future: asyncio.Future[Loaded]) -> None:
        self._loading = None
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self._swap(future.result())
        elif isinstance(exc, SettingError):
            log.error("tls_reload_failed", setting=exc.variable, problem=exc.problem, kept="old")
        else:  # the poll must outlive any surprise; the type only, never a message
            log.error("tls_reload_failed", error_type=type(exc).__name__, kept="old")

    def _reload_now(self) -> None:
        self._seen = self.files.stamps()
        try:
            self._swap(load_context(self.files))
        except SettingError as exc:
            log.error("tls_reload_failed", setting=exc.variable, problem=exc.problem, kept="old")

    def _swap(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.reloads += 1
        log.info("tls_reloaded", not_after=_iso(loaded.not_after), mutual=loaded.mutual)
        if loaded.expired:
            log.warning("tls_certificate_expired", setting=CERT, not_after=_iso(loaded.not_after))


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def peer_identities(transport: Any) -> frozenset[str] | None:
    """The URI and DNS names of the connection's verified client certificate, or None.

    None without TLS or without a client certificate; names compare as
    :func:`citadel.setting_values.canonical_identity` says (DNS without case).
    """
    with contextlib.suppress(AttributeError):
        cert = transport.get_extra_info("peercert")
        if cert:
            names = cert.get("subjectAltName", ())
            return frozenset(canonical_identity(v) for kind, v in names if kind in ("URI", "DNS"))
    return None


def unbound_callers(identities: dict[str, str], keys: dict[str, list[str]]) -> list[str]:
    """Callers with API keys but no certificate identity: none of their requests can pass."""
    return sorted(caller for caller in keys if caller not in identities)


class CallerBinding:
    """``CITADEL_TLS_CALLER_IDENTITIES``: which caller each client certificate names."""

    __slots__ = ("_identity_of",)

    def __init__(self, identities: dict[str, str]) -> None:
        self._identity_of = {c: canonical_identity(i) for c, i in identities.items()}

    @classmethod
    def from_settings(cls, settings: Settings) -> CallerBinding | None:
        """The binding, or None when certificates are not tied to callers."""
        if settings.tls_caller_identities is None:
            return None
        return cls(settings.tls_caller_identities)

    def __repr__(self) -> str:
        return f"CallerBinding(callers={sorted(self._identity_of)!r})"

    @property
    def callers(self) -> frozenset[str]:
        """The callers that have an identity."""
        return frozenset(self._identity_of)

    def binds(self, caller: str, peer: frozenset[str] | None) -> bool:
        """Whether the certificate names ``caller``, the caller of the request's API key.

        A certificate names a caller when it carries that caller's identity and
        no other caller's: one that names two callers names none.
        """
        if not peer:
            return False
        mine = self._identity_of.get(caller)
        if mine is None or mine not in peer:
            return False
        return not any(i in peer for c, i in self._identity_of.items() if c != caller)
