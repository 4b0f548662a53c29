"""The audit log: one JSON line per operation request, written before the response.

An :class:`AuditLog` raises :class:`~citadel.errors.AuditUnavailable` when the
line cannot be written, so that the request fails instead of going on
unaudited (fail-closed, like Vault's audit devices). It shares its sink
(:mod:`citadel.sinks`) and its timestamp format (:mod:`citadel.logs`) with the
operational logs, and never touches the stdlib ``logging`` machinery.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from select import PIPE_BUF
from typing import Any

import orjson

from citadel.logs import utc_timestamp
from citadel.sinks import Sink


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
        common: Mapping[str, Any],
        *,
        success: bool,
        code: str,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Write one event; raise ``AuditUnavailable`` if it cannot be written whole in time.

        ``common`` holds the fields every event of a request has: ``operation``,
        ``requestor``, ``user_id``, ``duration_ms`` and ``request_id``.
        """
        event = _event(utc_timestamp(), common, code, extra or {})
        event["success"] = success  # the caller's word: the pipeline's is "status below 400"
        await self.sink.write(orjson.dumps(event) + b"\n")

    async def write_batch(
        self, common: Mapping[str, Any], items: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> None:
        """One event per item of a batch (its code and fields), with ``batch_index`` and size.

        Lines go out in writes of whole lines of at most ``PIPE_BUF`` bytes, each
        atomic on a pipe, so the lines of several workers never interleave.
        """
        timestamp = utc_timestamp()
        size = len(items)
        chunk: list[bytes] = []
        length = 0
        for index, (code, fields) in enumerate(items):
            event = _event(timestamp, common, code, fields)
            event["batch_index"] = index
            event["batch_size"] = size
            line = orjson.dumps(event) + b"\n"
            if chunk and length + len(line) > PIPE_BUF:
                await self.sink.write(b"".join(chunk))
                chunk, length = [], 0
            chunk.append(line)
            length += len(line)
        if chunk:
            await self.sink.write(b"".join(chunk))

    def healthy(self) -> bool:
        """Whether audit lines can be written now: ``/ready`` fails when they cannot."""
        return self.sink.healthy()


def _event(
    timestamp: str, common: Mapping[str, Any], code: str, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """One audit event: the contract's fields in their order, then the operation's own."""
    event: dict[str, Any] = {
        "timestamp": timestamp,
        "event": "audit",
        "operation": common["operation"],
        "requestor": common["requestor"],
        "user_id": common["user_id"],
        "success": code == "ok",
        "code": code,
        "duration_ms": common["duration_ms"],
        "request_id": common["request_id"],
        "ct_fp": None,
    }
    event.update(fields)
    return event
