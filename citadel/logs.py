"""Operational logs: structlog set-up, the stdlib bridge and redaction.

Operational logs go through structlog's global configuration, with uvicorn's
own stdlib records routed through the same processors and renderer (orjson,
one JSON object a line, or the console renderer). Every line is written
best-effort to the process's sink (:mod:`citadel.sinks`): logging never fails
or stalls a request; the audit log (:mod:`citadel.audit`) is what fails closed.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any, BinaryIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from citadel.config import Settings
from citadel.sinks import Sink, StreamSink, stdout_sink

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
    """Stamp operational lines in the audit log's format, so both streams sort together."""
    event_dict["timestamp"] = utc_timestamp()
    return event_dict


def _orjson_dumps(obj: Any, **_kw: Any) -> bytes:
    return orjson.dumps(obj, default=repr)


def _orjson_dumps_str(obj: Any, **_kw: Any) -> str:
    return orjson.dumps(obj, default=repr).decode()


def configure_logging(settings: Settings, stream: BinaryIO | None = None) -> None:
    """Configure structlog and route uvicorn's stdlib records through the same renderer.

    Called once at start-up (and by tests with ``stream``), so that every
    operational line, Citadel's or uvicorn's, is redacted and rendered alike.
    """
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
