"""The run: lines streamed through ``POST /rewrap`` in order, with bounded memory and calls."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

from citadel_client.bulk.lines import (
    LineError,
    ParsedLine,
    parse_line,
    split_ending,
    target_prefix,
    terminated,
)
from citadel_client.client import AsyncCitadelClient
from citadel_client.errors import (
    CitadelConnectionError,
    CitadelError,
    Forbidden,
    InvalidCiphertext,
    InvalidRequest,
    KeyRetired,
    PayloadTooLarge,
    ProviderUnavailable,
    RateLimited,
    Unauthenticated,
)
from citadel_client.fingerprint import (
    fingerprint,  # the audit log's ct_fp: a reject ties to its event
)

DEFAULT_URL: Final = "http://127.0.0.1:8004"

EXIT_OK: Final = 0
EXIT_REJECTS: Final = 1
EXIT_ABORTED: Final = 2
EXIT_INTERRUPTED: Final = 130

# Answers that are the line's own fault: retrying or going on elsewhere cannot help it.
LINE_ERRORS: Final = (InvalidCiphertext, KeyRetired, InvalidRequest, PayloadTooLarge)

READ_HINT: Final = 1 << 16  # bytes read per batch (readlines' hint): small, bounded
# Output reaches the file every 64 KiB or every second, whichever comes first:
# what a kill can lose (and a resumed run redoes) stays small.
FLUSH_BYTES: Final = 1 << 16
FLUSH_SECONDS: Final = 1.0
WINDOW_PER_CALL: Final = 8  # lines held per allowed call: room to keep every call busy


@dataclass
class Counts:
    rewrapped: int = 0
    passed: int = 0
    rejected: int = 0
    resumed: int = 0  # complete lines kept from an interrupted run's partial output

    def summary(self) -> str:
        text = f"{self.rewrapped} rewrapped, {self.passed} passed through, {self.rejected} rejected"
        return text + (
            f" ({self.resumed} lines kept from the partial output)" if self.resumed else ""
        )


class Sink:
    """Ordered output and rejects, flushed together: rejects first, so that a reject
    record is on disk before the output line it explains (what --resume relies on)."""

    def __init__(self, out: IO[bytes], rejects: IO[bytes]) -> None:
        self._out = out
        self._rejects = rejects
        self._out_buf: list[bytes] = []
        self._rej_buf: list[bytes] = []
        self._size = 0
        self._flushed_at = time.monotonic()
        self.written = 0  # lines written by this run

    def write(self, line: bytes, reject: dict[str, Any] | None) -> None:
        if reject is not None:
            self._rej_buf.append(json.dumps(reject, ensure_ascii=False).encode() + b"\n")
        self._out_buf.append(line)
        self._size += len(line)
        self.written += 1
        if self._size >= FLUSH_BYTES or time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._rej_buf:
            self._rejects.write(b"".join(self._rej_buf))
            self._rejects.flush()
            self._rej_buf.clear()
        if self._out_buf:
            self._out.write(b"".join(self._out_buf))
            self._out.flush()
            self._out_buf.clear()
        self._size = 0
        self._flushed_at = time.monotonic()


# -- the run ---------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    number: int
    raw: bytes
    output: bytes | None = None  # set once the line's fate is known
    outcome: str = ""
    reject: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None

    def keep(self, outcome: str) -> None:
        self.output = terminated(self.raw)
        self.outcome = outcome

    def refuse(self, code: str, **extra: Any) -> None:
        self.reject = {"line": self.number, "code": code, **extra}
        self.keep("rejected")


@dataclass
class Outcome:
    exit_code: int
    counts: Counts
    message: str | None = None  # why the run stopped early
    last_line: int = 0  # the last line in the output


@dataclass
class Rewrapper:
    """Streams lines through ``rewrap`` in order, one call in flight per client.

    Each client is a lane with a single kept-alive connection: httpcore's
    connection pool scans every connection and waiting request on each
    request, so one pool shared by 16 calls spent more CPU on its own
    bookkeeping than on HTTP, and this tool's throughput was a tenth of what
    the server could take.
    """

    clients: Sequence[AsyncCitadelClient]
    sink: Sink
    skip_prefix: str | None = None
    url: str = DEFAULT_URL
    on_line: Callable[[int], None] = lambda _size: None
    warn: Callable[[str], None] = lambda _text: None
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    counts: Counts = field(default_factory=Counts)
    failure: str | None = None
    failure_code: int = EXIT_ABORTED

    def __post_init__(self) -> None:
        self._prefix = self.skip_prefix
        self._lanes: asyncio.Queue[AsyncCitadelClient] = asyncio.Queue()
        for client in self.clients:
            self._lanes.put_nowait(client)
        self._window = len(self.clients) * WINDOW_PER_CALL
        self._last_line = 0
        self._stop = asyncio.Event()

    @property
    def last_line(self) -> int:
        """The number of the last line written, in input order (0 before the first)."""
        return self._last_line

    def fail(self, message: str, code: int = EXIT_ABORTED) -> None:
        if self.failure is None:
            self.failure, self.failure_code = message, code
            self._stop.set()

    async def _until_done_or_stopped(self, task: asyncio.Task[None]) -> None:
        """Wait for one line's call, but no longer once the run must stop (a signal, say)."""
        await asyncio.wait([task, self._stopped], return_when=asyncio.FIRST_COMPLETED)

    async def run(self, source: IO[bytes], first_number: int = 1) -> Outcome:
        pending: deque[_Entry] = deque()
        number = first_number - 1
        self._stopped = asyncio.ensure_future(self._stop.wait())
        try:
            while self.failure is None:
                batch = await asyncio.to_thread(source.readlines, READ_HINT)
                if not batch:
                    break
                for raw in batch:
                    number += 1
                    entry = self._start(number, raw)
                    pending.append(entry)
                    self.on_line(len(raw))
                    if entry.task is not None and self._prefix is None:
                        # Learn the target before sending more (see the module docstring).
                        await self._until_done_or_stopped(entry.task)
                    self._write_done(pending)
                    while len(pending) >= self._window and self.failure is None:
                        await self._wait_head(pending)
                    if self.failure is not None:
                        break
            while pending and self.failure is None:
                await self._wait_head(pending)
        finally:
            self._stopped.cancel()
            tasks = [e.task for e in pending if e.task is not None and not e.task.done()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Whatever finished in order is kept; the first unfinished line ends the output.
            self._write_done(pending)
            self.sink.flush()
        if self.failure is not None:
            return Outcome(self.failure_code, self.counts, self.failure, self._last_line)
        code = EXIT_REJECTS if self.counts.rejected else EXIT_OK
        return Outcome(code, self.counts, None, self._last_line)

    async def _wait_head(self, pending: deque[_Entry]) -> None:
        head = pending[0]
        if head.task is not None and head.output is None:
            await self._until_done_or_stopped(head.task)
        self._write_done(pending)

    def _write_done(self, pending: deque[_Entry]) -> None:
        while pending and pending[0].output is not None:
            entry = pending.popleft()
            assert entry.output is not None
            self.sink.write(entry.output, entry.reject)
            self._last_line = entry.number
            if entry.outcome == "rewrapped":
                self.counts.rewrapped += 1
            elif entry.outcome == "passed":
                self.counts.passed += 1
            else:
                self.counts.rejected += 1

    def _start(self, number: int, raw: bytes) -> _Entry:
        """Decide a line at once, or start its call."""
        entry = _Entry(number, raw)
        body, ending = split_ending(raw)
        try:
            parsed = parse_line(body.decode("utf-8"))
        except UnicodeDecodeError:
            entry.refuse("invalid_line")
            return entry
        except LineError as exc:
            if exc.fields is None:
                entry.refuse(exc.code)
            else:
                entry.refuse(exc.code, fields=exc.fields)
            return entry
        ciphertext = parsed.value
        if ciphertext is None:  # a row without a secret: nothing to rewrap
            entry.keep("passed")
        elif not isinstance(ciphertext, str) or not ciphertext:
            entry.refuse("missing_field", fields=parsed.fields)
        elif self._prefix is not None and ciphertext.startswith(self._prefix):
            entry.keep("passed")
        else:
            entry.task = asyncio.create_task(self._call(entry, parsed, ciphertext, ending))
        return entry

    async def _call(
        self, entry: _Entry, parsed: ParsedLine, ciphertext: str, ending: bytes
    ) -> None:
        client = await self._lanes.get()
        try:
            if self.failure is not None:
                return
            # One request id per line and run, so an audit event leads back to its line.
            request_id = f"rewrap-{self.run_id}-{entry.number}"
            try:
                new = await client.rewrap(ciphertext, request_id=request_id)
            except LINE_ERRORS as exc:
                entry.refuse(
                    exc.code,
                    request_id=request_id,
                    ct_fp=fingerprint(ciphertext),
                    fields=parsed.fields,
                )
                return
            except CitadelError as exc:
                self.fail(self._why(exc))
                return
            except Exception as exc:  # a bug must stop the run, not stall the window
                self.fail(f"unexpected error ({type(exc).__name__})")
                return
        finally:
            self._lanes.put_nowait(client)
        self._learn(new)
        entry.output = parsed.replaced(new).encode("utf-8") + (ending or b"\n")
        entry.outcome = "rewrapped"

    def _learn(self, ciphertext: str) -> None:
        prefix = target_prefix(ciphertext)
        if prefix is None:
            if self._prefix is None:
                self.warn("the answers' ciphertext format is unknown: no line will be skipped")
                self._prefix = "\0"  # matches no ciphertext: every line gets its call
            return
        if self._prefix is None or self._prefix == "\0":
            self._prefix = prefix
        elif prefix != self._prefix:
            # The active key changed during the run (or --skip-prefix named another
            # key): lines skipped before were not under the active key.
            self.warn(
                f"answers are now under {prefix!r}, not {self._prefix!r}: "
                "rerun on the output when this run ends"
            )
            self._prefix = prefix

    def _why(self, exc: CitadelError) -> str:
        if isinstance(exc, CitadelConnectionError):
            return f"Citadel at {self.url} could not be reached after retries ({exc.detail})"
        if isinstance(exc, Unauthenticated):
            return "Citadel refused the API key (unauthenticated)"
        if isinstance(exc, Forbidden):
            return "this caller may not rewrap: grant it `rewrap` in CITADEL_ACL"
        if isinstance(exc, RateLimited):
            return (
                "still rate limited at the deadline: lower --concurrency or raise this "
                "caller's limit in CITADEL_RATE_LIMITS"
            )
        if isinstance(exc, ProviderUnavailable):
            return "the provider stayed unavailable until the deadline (provider_unavailable)"
        return f"unexpected answer from Citadel: {exc}"
