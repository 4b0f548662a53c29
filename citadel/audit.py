"""The audit log: one JSON line per operation request, written before the response.

An :class:`AuditLog` raises :class:`~citadel.errors.AuditUnavailable` when the
line cannot be written, so that the request fails instead of going on
unaudited (fail-closed, like Vault's audit devices). It shares its sink
(:mod:`citadel.sinks`) and its timestamp format (:mod:`citadel.logs`) with the
operational logs, and never touches the stdlib ``logging`` machinery.
"""

from __future__ import annotations

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
        """Whether audit lines can be written now: ``/ready`` fails when they cannot."""
        return self.sink.healthy()
