"""The HTTPS listener: each accepted connection's TLS, its handshake deadline, and refusals.

uvicorn builds its own context from file names and gives asyncio's
``create_server`` neither a handshake deadline (asyncio's default is 60 s)
nor any word of a refused handshake (asyncio drops it silently). So Citadel
hands uvicorn a plain listener and does TLS in the protocol factory instead:
:class:`TlsListener` is given to uvicorn as its ``http`` protocol; for each
accepted connection it wraps the HTTP protocol in the event loop's own TLS
protocol (uvloop's or asyncio's, the one ``create_server(ssl=...)`` would
use) with

- the context in force (:class:`citadel.tls.ContextReloader`), so a
  certificate replaced on disk is what the next connection gets;
- a handshake deadline of ``CITADEL_READ_TIMEOUT_S``: a client that never
  completes its handshake is closed then, so a slow-handshake flood cannot
  hold file descriptors (the head deadline starts once the handshake is done);
- a shutdown deadline of the same length: after a close the peer's
  ``close_notify`` is not awaited longer (RFC 8446 6.1 does not require it);
- ``tls_handshake_refused`` logged with the peer's address and the reason,
  at most once a second per address (:class:`RefusalLog`, bounded memory).

A :class:`TlsListener` pickles to its settings, so that ``citadel serve
--workers N`` hands it to each worker process, which loads its own context.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import structlog

from citadel.config import Settings
from citadel.tls import ContextReloader, TlsFiles

log = structlog.get_logger("citadel")

# X509_V_ERR_CERT_HAS_EXPIRED, X509_V_ERR_CERT_NOT_YET_VALID
_EXPIRED = {10: "client_certificate_expired", 9: "client_certificate_not_yet_valid"}
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "CERTIFICATE_VERIFY_FAILED": "client_certificate_not_trusted",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "WRONG_VERSION_NUMBER": "protocol_version",
    "HTTP_REQUEST": "plain_http",
    "HTTPS_PROXY_REQUEST": "plain_http",
    "TLSV1_ALERT_UNKNOWN_CA": "client_refused_server_certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "client_refused_server_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "client_refused_server_certificate",
}


def refusal_reason(exc: BaseException) -> str | None:
    """A stable word for why a handshake failed, or None for a peer that merely went away."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _EXPIRED.get(exc.verify_code, "client_certificate_not_trusted")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or "tls_error"
        return _REASONS.get(reason, reason.lower())
    if isinstance(exc, ConnectionAbortedError):
        return "handshake_timeout"
    return None


class RefusalLog:
    """``tls_handshake_refused``, at most once a second per peer address.

    The addresses last seen are kept in an LRU of ``capacity`` entries, so a
    flood from many addresses costs bounded memory; the line after a quiet
    second says how many refusals of that address were not logged.
    """

    def __init__(self, capacity: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._clock = clock
        # address -> (time of its last line, refusals since that line)
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def refused(self, address: str, reason: str) -> bool:
        """Note a refused handshake; True when it was logged."""
        now = self._clock()
        last = self._seen.get(address)
        if last is not None and now - last[0] < 1.0:
            self._seen[address] = (last[0], last[1] + 1)
            self._seen.move_to_end(address)
            return False
        self._seen[address] = (now, 0)
        self._seen.move_to_end(address)
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        log.warning(
            "tls_handshake_refused",
            peer=address,
            reason=reason,
            not_logged_since_last=last[1] if last is not None else 0,
        )
        return True


def _tls_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol ``loop.create_server(ssl=...)`` itself would use, noting the peer."""
    base: Any = asyncio.sslproto.SSLProtocol
    try:
        import uvloop
        from uvloop.loop import SSLProtocol as UvloopSSLProtocol  # type: ignore[attr-defined]

        if isinstance(loop, uvloop.Loop):
            base = UvloopSSLProtocol
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    if base not in _WITH_PEER:
        _WITH_PEER[base] = _noting_peer(base)
    return _WITH_PEER[base]


_WITH_PEER: dict[Any, Any] = {}


def _noting_peer(base: Any) -> Any:
    """``base`` with the peer's address noted as the connection is made.

    A subclass rather than a wrapper: uvloop's transport then still talks to
    its own TLS protocol directly, at no cost per read.
    """

    class NotingPeer(base):  # type: ignore[misc]
        citadel_peer = "unknown"

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.citadel_peer = _address(transport)
            super().connection_made(transport)

    return NotingPeer


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"


class TlsListener:
    """uvicorn's ``http`` protocol factory for HTTPS: TLS in force, then the HTTP protocol."""

    def __init__(
        self,
        files: TlsFiles,
        header_timeout_s: float,
        *,
        reloader: ContextReloader | None = None,
        http_protocol: Callable[..., asyncio.Protocol] | None = None,
    ) -> None:
        self.files = files
        self.header_timeout_s = header_timeout_s
        self.reloader = reloader or ContextReloader.load(files)
        self.refusals = RefusalLog()
        self._http = http_protocol or _guarded_protocol()
        self._tls_class: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # The HTTP protocol is a class, pickled by its name; the context is not pickled.
        return {"files": self.files, "header_timeout_s": self.header_timeout_s, "http": self._http}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # In a worker process: its own context, loaded from the files now.
        self.__init__(  # type: ignore[misc]
            state["files"], state["header_timeout_s"], http_protocol=state["http"]
        )

    def __call__(self, **kwargs: Any) -> asyncio.BaseProtocol:
        """One accepted connection: the HTTP protocol behind the TLS in force now."""
        loop = asyncio.get_running_loop()
        if self._tls_class is None:
            self._tls_class = _tls_protocol_class(loop)
        self.reloader.ensure_polling(loop)
        app_protocol = self._http(**kwargs)
        handshake: asyncio.Future[None] = loop.create_future()
        tls = self._tls_class(
            loop,
            app_protocol,
            self.reloader.current,
            handshake,
            server_side=True,
            ssl_handshake_timeout=self.header_timeout_s,
            ssl_shutdown_timeout=self.header_timeout_s,
        )
        handshake.add_done_callback(lambda done: self._handshake_done(done, tls))
        return tls  # type: ignore[no-any-return]

    def _handshake_done(self, done: asyncio.Future[None], tls: Any) -> None:
        if done.cancelled():
            return
        exc = done.exception()  # retrieved here, so asyncio never reports it
        if exc is None:
            return
        reason = refusal_reason(exc)
        if reason is not None:
            self.refusals.refused(tls.citadel_peer, reason)


def _guarded_protocol() -> Callable[..., asyncio.Protocol]:
    """Citadel's HTTP protocol (head limit and deadline), as every server runs it."""
    from citadel.http.serving import uvicorn_options

    protocol: Callable[..., asyncio.Protocol] = uvicorn_options()["http"]
    return protocol


def https_options(settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    """uvicorn's ``options`` for ``settings``: its HTTP protocol behind TLS when TLS is set.

    :class:`SettingError` naming the setting when the files cannot serve, so
    that start-up stops before anything listens.
    """
    files = TlsFiles.from_settings(settings)
    if files is None:
        return options
    return {
        **options,
        "http": TlsListener(files, settings.read_timeout_s, http_protocol=options["http"]),
    }
