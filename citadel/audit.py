"""Logging: structlog set-up, the audit log, redaction and pseudonyms.

Two streams share one renderer (orjson, one JSON object a line):

- operational logs, through structlog's global configuration, with uvicorn's
  own records routed through the same processors;
- the audit log, an :class:`AuditLog` that writes one line per encrypt or
  decrypt request and raises :class:`~citadel.errors.AuditUnavailable` when the
  line cannot be written, so that the request fails instead of going on
  unaudited (fail-closed, like Vault's audit devices).

Neither touches the stdlib ``logging`` machinery on the request path.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import IO, Any, BinaryIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from citadel.config import SettingError, Settings
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
        return path.read_bytes().strip()
    except OSError:
        raise SettingError(
            "CITADEL_AUDIT_PSEUDONYM_KEY", f"is unset and {path} is unreadable"
        ) from None


def fingerprint(ciphertext: str) -> str:
    """``ct_fp``: the first 16 hex digits of the ciphertext's SHA-256."""
    return hashlib.sha256(ciphertext.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class AuditLog:
    """Writes audit events as JSON lines to a binary stream, fail-closed.

    An event is built from a fixed set of fields (see :meth:`write`), each a
    name, code, pseudonym, number or fingerprint, never a free-form value from
    the request: an allow-list, stronger than the redaction applied to
    operational logs, and cheaper on the request path.
    """

    def __init__(self, sink: IO[bytes]) -> None:
        self._sink = sink
        self._lock = threading.Lock()

    def write(
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
    ) -> None:
        """Write one event; raise ``AuditUnavailable`` if it cannot be written whole."""
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
        line = orjson.dumps(event) + b"\n"
        try:
            with self._lock:
                self._sink.write(line)
                self._sink.flush()
        except (OSError, ValueError):
            raise AuditUnavailable() from None


def configure_logging(settings: Settings, stream: BinaryIO | None = None) -> None:
    """Configure structlog and route uvicorn's stdlib records through the same renderer."""
    out: Any = stream if stream is not None else _CurrentStdout()
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
        factory: Any = structlog.BytesLoggerFactory(out)
        std_renderer: Processor = structlog.processors.JSONRenderer(serializer=_orjson_dumps_str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        factory = structlog.WriteLoggerFactory(sys.stdout)
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
    handler = _StdoutHandler()
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


class _CurrentStdout:
    """Standard output as it is at each write, so a redirected stdout is followed."""

    def write(self, data: bytes) -> int:
        return sys.stdout.buffer.write(data)

    def flush(self) -> None:
        sys.stdout.buffer.flush()


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stdlib handler that, likewise, writes to the current standard output."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _drop_exception_locals(
    _logger: WrappedLogger, _method: str, event_dict: EventDict
) -> EventDict:
    # A traceback's text names code lines, never locals; exception messages can
    # still hold data, so keep only the exception's type and the frames.
    exc = event_dict.pop("exc_info", None)
    if exc:
        event_dict["exception"] = _safe_exception_text(exc)
    return event_dict


def _safe_exception_text(exc_info: Any) -> str:
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
