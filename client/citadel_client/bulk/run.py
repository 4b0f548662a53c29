"""The run: lines streamed through ``POST /rewrap`` in batches, in order, with bounded memory."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

from citadel_client.async_client import AsyncCitadelClient
from citadel_client.batch import RewrapItem
from citadel_client.bulk.lines import (
    LineError,
    ParsedLine,
    parse_line,
    split_ending,
    target_prefix,
    terminated,
)
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
DEFAULT_BATCH_SIZE: Final = 100  # the server's CITADEL_MAX_BATCH_ITEMS by default


@dataclass
class Counts:
    """What a run did with its lines, for the summary and the exit status."""

    rewrapped: int = 0
    passed: int = 0
    rejected: int = 0
    resumed: int = 0  # complete lines kept from an interrupted run's partial output

    def summary(self) -> str:
        """One line for a person: rewrapped, passed through, rejected, resumed."""
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
        """Queue one output line (and its reject record, if any), flushing now and then."""
        if reject is not None:
            self._rej_buf.append(json.dumps(reject, ensure_ascii=False).encode() + b"\n")
        self._out_buf.append(line)
        self._size += len(line)
        self.written += 1
        if self._size >= FLUSH_BYTES or time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write what is queued: the rejects first, then the output lines."""
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
    """How a run ended: its exit status, its counts, why it stopped early, its last line."""

    exit_code: int
    counts: Counts
    message: str | None = None  # why the run stopped early
    last_line: int = 0  # the last line in the output


# The contexts of one line: (the one its ciphertext is bound to, the one to bind it to).
Contexts = Callable[[ParsedLine], tuple[dict[str, str] | None, dict[str, str] | None]]


@dataclass(eq=False)
class _Call:
    """A line waiting for its answer: what to send, and how to write what comes back."""

    entry: _Entry
    parsed: ParsedLine
    ciphertext: str
    ending: bytes
    context: dict[str, str] | None
    new_context: dict[str, str] | None

    def item(self) -> RewrapItem:
        item: RewrapItem = {"encrypted_data": self.ciphertext}
        if self.context is not None:
            item["context"] = self.context
        if self.new_context is not None:
            item["new_context"] = self.new_context
        return item


@dataclass
class Rewrapper:
    """Streams lines through ``rewrap`` in batches, in order, one request in flight per client.

    Each client is a lane with a single kept-alive connection: httpcore's
    connection pool scans every connection and waiting request on each
    request, so one pool shared by 16 calls spent more CPU on its own
    bookkeeping than on HTTP, and this tool's throughput was a tenth of what
    the server could take. Lines that need a call are gathered into batches of
    ``batch_size``; a batch leaves when it is full, when the line at the head
    of the output waits for it, or at the end of the input.

    ``contexts`` gives each line's contexts (``--context-from``,
    ``--new-context-from``) or raises :class:`LineError`; ``bind`` (a new
    context per line) means no line is passed through by its prefix, since each
    needs its new binding.
    """

    clients: Sequence[AsyncCitadelClient]
    sink: Sink
    skip_prefix: str | None = None
    url: str = DEFAULT_URL
    on_line: Callable[[int], None] = lambda _size: None
    warn: Callable[[str], None] = lambda _text: None
    batch_size: int = DEFAULT_BATCH_SIZE
    contexts: Contexts | None = None
    bind: bool = False
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    counts: Counts = field(default_factory=Counts)
    failure: str | None = None
    failure_code: int = EXIT_ABORTED

    def __post_init__(self) -> None:
        self._prefix = self.skip_prefix
        self._lanes: asyncio.Queue[AsyncCitadelClient] = asyncio.Queue()
        for client in self.clients:
            self._lanes.put_nowait(client)
        # Every lane busy with a full batch, and the next one filling: memory stays flat.
        self._window = (len(self.clients) + 1) * self.batch_size
        self._open: list[_Call] = []
        self._warned_batch = False
        self._last_line = 0
        self._stop = asyncio.Event()

    @property
    def last_line(self) -> int:
        """The number of the last line written, in input order (0 before the first)."""
        return self._last_line

    def fail(self, message: str, code: int = EXIT_ABORTED) -> None:
        """Stop the run with ``message`` (the first failure wins)."""
        if self.failure is None:
            self.failure, self.failure_code = message, code
            self._stop.set()

    async def _until_done_or_stopped(self, task: asyncio.Task[None]) -> None:
        """Wait for one line's call, but no longer once the run must stop (a signal, say)."""
        await asyncio.wait([task, self._stopped], return_when=asyncio.FIRST_COMPLETED)

    async def run(self, source: IO[bytes], first_number: int = 1) -> Outcome:
        """Rewrap every line of ``source`` in input order; the run's outcome."""
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
                    if entry.task is not None and self._prefix is None and not self.bind:
                        # Learn the target before sending more (see the module docstring).
                        await self._until_done_or_stopped(entry.task)
                    self._write_done(pending)
                    while len(pending) >= self._window and self.failure is None:
                        await self._wait_head(pending)
                    if self.failure is not None:
                        break
            self._flush()
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
        if head.task is None and head.output is None:
            self._flush()  # the head waits for the batch being gathered: send it now
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
            return entry
        if not isinstance(ciphertext, str) or not ciphertext:
            entry.refuse("missing_field", fields=parsed.fields)
            return entry
        if not self.bind and self._prefix is not None and ciphertext.startswith(self._prefix):
            entry.keep("passed")
            return entry
        context = new_context = None
        if self.contexts is not None:
            try:
                context, new_context = self.contexts(parsed)
            except LineError as exc:
                entry.refuse(exc.code, fields=parsed.fields)
                return entry
        self._open.append(_Call(entry, parsed, ciphertext, ending, context, new_context))
        if len(self._open) >= self.batch_size or (self._prefix is None and not self.bind):
            self._flush()
        return entry

    def _flush(self) -> None:
        """Send the batch being gathered (its lines share one task)."""
        if not self._open:
            return
        group, self._open = self._open, []
        task = asyncio.create_task(self._call(group))
        for call in group:
            call.entry.task = task

    async def _call(self, group: list[_Call]) -> None:
        """One batch on one lane (a lone line: the single form, as the first call is)."""
        client = await self._lanes.get()
        try:
            if self.failure is not None:
                return
            # One request id per batch and run (and the item's batch_index), so that
            # an audit event leads back to its line.
            request_id = f"rewrap-{self.run_id}-{group[0].entry.number}"
            try:
                if len(group) == 1:
                    await self._single(client, group[0], request_id)
                else:
                    await self._batch(client, group, request_id)
            except CitadelError as exc:
                self.fail(self._why(exc))
            except Exception as exc:  # a bug must stop the run, not stall the window
                self.fail(f"unexpected error ({type(exc).__name__})")
        finally:
            self._lanes.put_nowait(client)

    async def _single(self, client: AsyncCitadelClient, call: _Call, request_id: str) -> None:
        try:
            new = await client.rewrap(
                call.ciphertext,
                context=call.context,
                new_context=call.new_context,
                request_id=request_id,
            )
        except LINE_ERRORS as exc:
            self._refuse(call, exc, request_id)
            return
        self._done(call, new)

    async def _batch(self, client: AsyncCitadelClient, group: list[_Call], request_id: str) -> None:
        try:
            results = await client.rewrap_many(
                [call.item() for call in group],
                request_id=request_id,
                max_batch_items=len(group),
            )
        except (InvalidRequest, PayloadTooLarge) as exc:
            # Refused whole for what some line holds (a batch is checked whole): find
            # which, one line at a time, so that the others are still rewrapped.
            await self._one_by_one(client, group, exc)
            return
        for call, result in zip(group, results, strict=True):
            if result.error is None:
                assert result.value is not None
                self._done(call, result.value)
            elif isinstance(result.error, LINE_ERRORS):
                self._refuse(call, result.error, result.request_id, result.batch_index)
            else:
                self.fail(self._why(result.error))
                return

    async def _one_by_one(
        self, client: AsyncCitadelClient, group: list[_Call], refusal: CitadelError
    ) -> None:
        for call in group:
            if self.failure is not None:
                return
            await self._single(client, call, f"rewrap-{self.run_id}-{call.entry.number}")
        refused = sum(call.entry.outcome == "rejected" for call in group)
        if refused == 0 and not self._warned_batch:
            # Every line passed alone: the batch itself was over a server limit.
            self._warned_batch = True
            self.batch_size = max(1, self.batch_size // 2)
            self.warn(
                f"a batch of {len(group)} lines was refused whole ({refusal.code}) though each "
                f"line passes alone: CITADEL_MAX_BATCH_ITEMS or CITADEL_MAX_BATCH_BYTES is "
                f"lower; going on with --batch-size {self.batch_size}"
            )

    def _done(self, call: _Call, new: str) -> None:
        if not self.bind:
            self._learn(new)
        call.entry.output = call.parsed.replaced(new).encode("utf-8") + (call.ending or b"\n")
        call.entry.outcome = "rewrapped"

    def _refuse(
        self,
        call: _Call,
        exc: CitadelError,
        request_id: str | None,
        batch_index: int | None = None,
    ) -> None:
        extra: dict[str, Any] = {"request_id": request_id}
        if batch_index is not None:
            extra["batch_index"] = batch_index
        call.entry.refuse(
            exc.code, **extra, ct_fp=fingerprint(call.ciphertext), fields=call.parsed.fields
        )

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
                "still rate limited at the deadline: lower --concurrency or --batch-size (a "
                "batch counts its lines and must fit whole in what is left of the caller's "
                "limit), or raise this caller's limit in CITADEL_RATE_LIMITS"
            )
        if isinstance(exc, ProviderUnavailable):
            return "the provider stayed unavailable until the deadline (provider_unavailable)"
        return f"unexpected answer from Citadel: {exc}"
