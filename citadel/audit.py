"""Logging: structlog set-up, the audit log, redaction and pseudonyms.

Two streams share one renderer (orjson, one JSON object a line):

- operational logs, through structlog's global configuration, with uvicorn's
  own records routed through the same processors;
- the audit log, an :class:`AuditLog` that writes one line per operation
  request and raises :class:`~citadel.errors.AuditUnavailable` when the
  line cannot be written, so that the request fails instead of going on
  unaudited (fail-closed, like Vault's audit devices).

Neither touches the stdlib ``logging`` machinery on the request path.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import select
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import IO, Any, BinaryIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from citadel.config import SettingError, Settings, read_secret_file
from citadel.errors import AuditUnavailable
from citadel.fileio import create_once

REDACTED = "[REDACTED]"
_SENSITIVE = re.compile(
    r"plaintext|secret|api[_-]?key|password|passwd|authorization|token|credential|private",
    re.IGNORECASE,
)


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Replace the value of any key named like a secret, at any depth.

    A second line of defence: no code path should hand a secret to a logger,
    but if one does, its key name gives it away.
    """
    return _redact_mapping(event_dict)


def _redact_mapping(data: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in data.items():
        if _SENSITIVE.search(key):
            data[key] = REDACTED
        elif isinstance(value, dict):
            data[key] = _redact_mapping(dict(value))
        elif isinstance(value, list | tuple):
            data[key] = [_redact_mapping(dict(v)) if isinstance(v, dict) else v for v in value]
    return data


def utc_timestamp() -> str:
    """ISO 8601 UTC with milliseconds and a ``Z``, as in the contract's example."""
    now = time.time()
    second = int(now)
    cached = _SECOND_CACHE
    if cached[0] != second:
        # Formatting the date part is the costly bit; it changes once a second.
        cached[0] = second
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{cached[1]}.{int((now - second) * 1000):03d}Z"


_SECOND_CACHE: list[Any] = [-1, ""]


def add_timestamp(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    event_dict["timestamp"] = utc_timestamp()
    return event_dict


def _orjson_dumps(obj: Any, **_kw: Any) -> bytes:
    return orjson.dumps(obj, default=repr)


def _orjson_dumps_str(obj: Any, **_kw: Any) -> str:
    return orjson.dumps(obj, default=repr).decode()


class Pseudonymizer:
    """``u_`` and the first 16 hex digits of HMAC-SHA256(key, user id)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "Pseudonymizer(<key>)"

    def __call__(self, user_id: str) -> str:
        mac = hmac.new(self._key, user_id.encode(), hashlib.sha256).hexdigest()
        return "u_" + mac[:16]


def pseudonym_key(settings: Settings) -> bytes:
    """The configured pseudonym key; in development, one generated beside the keyring."""
    if settings.audit_pseudonym_key is not None:
        value = settings.audit_pseudonym_key.get_secret_value()
        if len(value) < 16:
            raise SettingError("CITADEL_AUDIT_PSEUDONYM_KEY", "must be at least 16 characters")
        return value.encode()
    if settings.env == "production":
        raise SettingError("CITADEL_AUDIT_PSEUDONYM_KEY", "is required in production")
    path = settings.dev_dir / "audit-pseudonym.key"
    create_once(path, lambda: secrets.token_hex(32).encode() + b"\n")
    try:
        return read_secret_file(path, "CITADEL_AUDIT_PSEUDONYM_KEY", settings.env).strip()
    except OSError:
        raise SettingError(
            "CITADEL_AUDIT_PSEUDONYM_KEY", f"is unset and {path} is unreadable"
        ) from None


def fingerprint(data: str | bytes) -> str:
    """``ct_fp`` and ``msg_fp``: the first 16 hex digits of the SHA-256 of ``data``.

    A ``str`` (a ciphertext) is hashed as UTF-8, lone surrogates passed through,
    since a JSON string may hold one.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()[:16]


# The contract's 503 always carries Retry-After; a sink recovers when its reader
# does, so the caller is told to try again soon.
AUDIT_RETRY_AFTER_S = 1


def _unavailable() -> AuditUnavailable:
    return AuditUnavailable(retry_after=AUDIT_RETRY_AFTER_S)


class FdSink:
    """A file descriptor (standard output) written without ever blocking the event loop.

    The audit line must be written before the response, but a stalled reader
    (a log shipper that stopped reading a pipe) must not stall the process:
    every write first asks ``poll(0)`` whether the descriptor can take data
    now. Audit lines wait for room at most ``timeout_s``, then fail (the
    request gets 503); once a wait has timed out, later audit lines fail at
    once until the descriptor drains, so nothing queues behind a stalled
    sink. Operational log lines never wait: they are dropped (and counted)
    when there is no room. A line cut short by a partial write is finished
    before any other byte, so lines never interleave.

    Small writes to a pipe are atomic (``PIPE_BUF``), which also keeps the
    lines of several worker processes sharing one pipe whole.
    """

    def __init__(self, fd: int = 1, timeout_s: float = 1.0) -> None:
        self._fd = fd
        self._timeout = timeout_s
        self._poll = select.poll()
        self._poll.register(fd, select.POLLOUT)
        self._pending = b""
        self._stalled = False
        self._broken = False
        self._lock = threading.Lock()
        self._waiters: list[asyncio.Future[None]] = []
        self._watching: asyncio.AbstractEventLoop | None = None
        self.dropped = 0

    def _state(self) -> int:
        events = self._poll.poll(0)
        return events[0][1] if events else 0

    def _room(self) -> bool:
        state = self._state()
        if state & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            self._broken = True
            return False
        return bool(state & select.POLLOUT)

    def _put(self, data: bytes) -> bool:
        """Write ``data`` after any pending tail; True when all of it is out. Lock held."""
        if self._pending:
            self._pending = self._pending[os.write(self._fd, self._pending) :]
            if self._pending:
                self._pending += data
                return False
        n = os.write(self._fd, data) if data else 0
        if n < len(data):
            self._pending = data[n:]
            return False
        return True

    def try_write(self, data: bytes) -> bool:
        """Best effort, for operational logs: write now or drop; never raises, never waits."""
        with self._lock:
            try:
                if self._room() and (not self._pending or self._put(b"")):
                    self._put(data)
                    return True
            except OSError:
                self._broken = True
            self.dropped += 1
            return False

    async def write(self, data: bytes) -> None:
        """Write one whole line, waiting at most ``timeout_s``; ``AuditUnavailable`` otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        to_write = data
        while True:
            with self._lock:
                try:
                    if self._room():
                        if self._put(to_write):
                            self._stalled = self._broken = False
                            return
                        to_write = b""  # handed over; only the pending tail remains
                    elif self._broken or self._stalled:
                        raise _unavailable()
                except OSError:
                    self._broken = True
                    raise _unavailable() from None
            left = deadline - loop.time()
            if left <= 0 or not await self._wait_for_room(loop, left):
                self._stalled = True
                raise _unavailable()

    async def _wait_for_room(self, loop: asyncio.AbstractEventLoop, seconds: float) -> bool:
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if self._watching is None:
            try:
                loop.add_writer(self._fd, self._on_room)
            except (OSError, ValueError):
                return False  # cannot be watched: treat as stalled
            self._watching = loop
        try:
            await asyncio.wait_for(waiter, seconds)
            return True
        except TimeoutError:
            return False
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _on_room(self) -> None:
        if self._watching is not None:
            self._watching.remove_writer(self._fd)
            self._watching = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def healthy(self) -> bool:
        """False while the descriptor is closed or errored, or after a stalled audit write."""
        with self._lock:
            if self._stalled and self._room():
                self._stalled = False
            else:
                self._room()
            return not (self._broken or self._stalled)


class StreamSink:
    """A binary stream (tests, embedding); writes are synchronous."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._ok = True

    def try_write(self, data: bytes) -> bool:
        try:
            self._put(data)
            return True
        except (OSError, ValueError):
            return False

    async def write(self, data: bytes) -> None:
        try:
            self._put(data)
        except (OSError, ValueError):
            self._ok = False
            raise _unavailable() from None
        self._ok = True

    def _put(self, data: bytes) -> None:
        with self._lock:
            self._stream.write(data)
            self._stream.flush()

    def healthy(self) -> bool:
        return self._ok


Sink = FdSink | StreamSink
_STDOUT: list[FdSink] = []


def stdout_sink() -> FdSink:
    """The process's one sink on standard output, shared by audit and operational logs."""
    if not _STDOUT:
        _STDOUT.append(FdSink(1))
    return _STDOUT[0]


class AuditLog:
    """Writes audit events as JSON lines, fail-closed.

    An event is built from a fixed set of fields (see :meth:`write`), each a
    name, code, pseudonym, number or fingerprint, never a free-form value from
    the request: an allow-list, stronger than the redaction applied to
    operational logs, and cheaper on the request path.
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def write(
        self,
        *,
        operation: str,
        requestor: str | None,
        user_id: str | None,
        success: bool,
        code: str,
        duration_ms: float,
        request_id: str,
        ct_fp: str | None,
        extra: dict[str, str] | None = None,
    ) -> None:
        """Write one event; raise ``AuditUnavailable`` if it cannot be written whole in time."""
        event = {
            "timestamp": utc_timestamp(),
            "event": "audit",
            "operation": operation,
            "requestor": requestor,
            "user_id": user_id,
            "success": success,
            "code": code,
            "duration_ms": duration_ms,
            "request_id": request_id,
            "ct_fp": ct_fp,
        }
        if extra:
            event.update(extra)
        await self.sink.write(orjson.dumps(event) + b"\n")

    def healthy(self) -> bool:
        return self.sink.healthy()


def configure_logging(settings: Settings, stream: BinaryIO | None = None) -> None:
    """Configure structlog and route uvicorn's stdlib records through the same renderer."""
    sink: Sink = StreamSink(stream) if stream is not None else stdout_sink()
    out = _BestEffort(sink)
    level = logging.getLevelNamesMapping()[settings.log_level.upper()]
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_timestamp,
        redact,
    ]
    renderer: Processor
    if settings.log_format == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        factory: Any = structlog.BytesLoggerFactory(out)  # type: ignore[arg-type]
        std_renderer: Processor = structlog.processors.JSONRenderer(serializer=_orjson_dumps_str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.WriteLoggerFactory(_BestEffortText(sink))  # type: ignore[arg-type]
        std_renderer = renderer
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_exception_locals,
            std_renderer,
        ],
    )
    handler = _SinkHandler(sink)
    handler.setFormatter(formatter)
    for name in ("uvicorn", "uvicorn.error", "citadel"):
        std = logging.getLogger(name)
        std.handlers = [handler]
        std.setLevel(level)
        std.propagate = False
    # Access lines would repeat paths and client addresses the audit log already
    # records, and cost a stdlib round trip per request.
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False
    access.disabled = True


class _BestEffort:
    """Operational log lines: written when the sink has room, dropped otherwise.

    Logging must never fail or stall a request: the audit log, not this, is
    what fails closed.
    """

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._sink.try_write(data)
        return len(data)

    def flush(self) -> None:
        pass


class _BestEffortText(_BestEffort):
    def write(self, data: str) -> int:  # type: ignore[override]
        self._sink.try_write(data.encode("utf-8", "replace"))
        return len(data)


class _SinkHandler(logging.Handler):
    """uvicorn's stdlib records, rendered by structlog and written best-effort."""

    def __init__(self, sink: Sink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a record that cannot be formatted is dropped, never raised
            return
        self._sink.try_write(line.encode("utf-8", "replace") + b"\n")


def _drop_exception_locals(
    _logger: WrappedLogger, _method: str, event_dict: EventDict
) -> EventDict:
    # A traceback's text names code lines, never locals; exception messages can
    # still hold data, so keep only the exception's type and the frames.
    exc = event_dict.pop("exc_info", None)
    if exc:
        event_dict["exception"] = safe_exception_text(exc)
    return event_dict


def safe_exception_text(exc_info: Any) -> str:
    """A traceback's frames and the exception's type; its message (which can hold data) withheld."""
    import traceback

    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or exc_info[0] is None:
        return ""
    etype, _value, tb = exc_info
    frames = "".join(traceback.format_tb(tb))
    return f"Traceback (most recent call last):\n{frames}{etype.__name__}: <message withheld>"
