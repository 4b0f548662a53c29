"""``citadel rewrap``: rewrap every ciphertext of a JSON-lines export through a running Citadel.

Each input line is a JSON object with an ``encrypted_data`` string and any
other fields (a row id, say). The same lines come out in the same order, each
with ``encrypted_data`` replaced by ``POST /rewrap``'s answer and every other
byte of the line kept as it was. The operator's runbook is docs/bulk-rewrap.md;
what the code relies on:

* Bounded memory and concurrency: the input is read in small batches and at
  most ``window`` lines are held (read, in flight or finished but waiting for
  an earlier line), with at most ``--concurrency`` calls in flight.
* Lines already under the active key are passed through without a call. The
  target prefix comes from ``--skip-prefix`` or from the first answer; until
  that answer has arrived, calls are made one at a time, so a rerun over
  already rewrapped data makes one call, not a window of them.
* A line that fails for good (not JSON, no ``encrypted_data``, an invalid or
  retired ciphertext) is copied unchanged, recorded in the rejects file and
  makes the exit status 1. Anything that is not the line's fault (connection
  failure, 503 or 429 past the client's deadline, a refused API key) aborts
  the run with status 2.
* With ``--output FILE`` the lines go to ``FILE.partial`` in input order, and
  only a finished run renames it to ``FILE``. After an abort or a kill,
  ``--resume`` keeps the partial file's complete lines (checked against the
  input) and goes on after them, so only what is left is sent to Citadel.

Nothing secret is ever printed: the API key is read from a file or the
environment, and no plaintext ever reaches this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import secrets
import signal
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import httpx

from citadel.pseudonyms import fingerprint  # the audit log's ct_fp: a reject ties to its event
from citadel_client import AsyncCitadelClient
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
from citadel_client.transport import AsyncKeepAliveTransport

FIELD: Final = "encrypted_data"
DEFAULT_URL: Final = "http://127.0.0.1:8004"
API_KEY_ENV: Final = "CITADEL_API_KEY"

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
MAX_CONCURRENCY: Final = 64  # under httpx's default pool of 100 connections

_WS: Final = " \t\n\r"
_DECODER: Final = json.JSONDecoder()


# -- one line ------------------------------------------------------------------


class LineError(Exception):
    """A line that cannot be rewrapped, with its rejects code."""

    def __init__(self, code: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.fields = fields


@dataclass(frozen=True)
class ParsedLine:
    """A line's text split around the JSON value of ``encrypted_data``."""

    text: str
    start: int  # where the value's JSON text starts in ``text``
    end: int
    value: object
    fields: dict[str, Any]  # the other fields, in order (for the rejects file)

    def replaced(self, ciphertext: str) -> str:
        """The same text with only the value replaced: spacing, numbers and escapes stay."""
        new = json.dumps(ciphertext, ensure_ascii=False)
        return self.text[: self.start] + new + self.text[self.end :]

    def frame(self) -> tuple[str, str]:
        """Everything but the value: equal for an input line and its output line."""
        return self.text[: self.start], self.text[self.end :]


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def parse_line(text: str) -> ParsedLine:
    """Find ``encrypted_data`` in one top-level JSON object, keeping every character's place.

    The object is walked with the standard library's own decoder, one key and
    one value at a time, so that the value's position is known and a duplicated
    key (which a plain ``json.loads`` would silently resolve) is refused.
    """
    try:
        i = _skip_ws(text, 0)
        if text[i : i + 1] != "{":
            raise LineError("invalid_line")
        i = _skip_ws(text, i + 1)
        fields: dict[str, Any] = {}
        span: tuple[int, int, object] | None = None
        seen: set[str] = set()
        if text[i : i + 1] == "}":
            i += 1
        else:
            while True:
                if text[i : i + 1] != '"':
                    raise LineError("invalid_line")
                key, i = _DECODER.raw_decode(text, i)
                i = _skip_ws(text, i)
                if text[i : i + 1] != ":":
                    raise LineError("invalid_line")
                start = _skip_ws(text, i + 1)
                value, i = _DECODER.raw_decode(text, start)
                if key in seen:
                    raise LineError("invalid_line")
                seen.add(key)
                if key == FIELD:
                    span = (start, i, value)
                else:
                    fields[key] = value
                i = _skip_ws(text, i)
                if text[i : i + 1] == ",":
                    i = _skip_ws(text, i + 1)
                    continue
                if text[i : i + 1] == "}":
                    i += 1
                    break
                raise LineError("invalid_line")
        if _skip_ws(text, i) != len(text):
            raise LineError("invalid_line")
    except ValueError:  # json.JSONDecodeError
        raise LineError("invalid_line") from None
    if span is None:
        raise LineError("missing_field", fields)
    return ParsedLine(text, span[0], span[1], span[2], fields)


def _split_ending(raw: bytes) -> tuple[bytes, bytes]:
    """A line without its ending, and the ending (``\\r\\n``, ``\\n`` or none at EOF)."""
    if raw.endswith(b"\r\n"):
        return raw[:-2], b"\r\n"
    if raw.endswith(b"\n"):
        return raw[:-1], b"\n"
    return raw, b""


def _terminated(raw: bytes) -> bytes:
    """Every output line ends with a newline: a resumed run counts complete lines by it."""
    return raw if raw.endswith(b"\n") else raw + b"\n"


def target_prefix(ciphertext: str) -> str | None:
    """The prefix that marks a ciphertext as made by the same provider and key."""
    if ciphertext.startswith("cit1:"):
        parts = ciphertext.split(":", 2)
        return f"cit1:{parts[1]}:" if len(parts) == 3 and parts[1] else None
    if ciphertext.startswith("ev:"):
        return "ev:"
    return None


# -- output ----------------------------------------------------------------------


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
        self.output = _terminated(self.raw)
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
        body, ending = _split_ending(raw)
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


# -- files and resume --------------------------------------------------------------


class UsageError(Exception):
    """A problem with the command line or the files: exit 2 with this message."""


def _complete_lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        for raw in f:
            if raw.endswith(b"\n"):
                yield raw


def _truncate_to_complete_lines(path: Path) -> int:
    """Cut a line torn by a kill off the end; returns the number of complete lines."""
    count = size = 0
    for raw in _complete_lines(path):
        count += 1
        size += len(raw)
    with path.open("r+b") as f:
        f.truncate(size)
    return count


def _same_record(input_raw: bytes, output_raw: bytes) -> bool:
    """Whether an output line is the input line, rewrapped or not."""
    if _terminated(input_raw) == output_raw:
        return True
    (in_body, in_end), (out_body, out_end) = _split_ending(input_raw), _split_ending(output_raw)
    if (in_end or b"\n") != out_end:
        return False
    try:
        before, after = parse_line(in_body.decode()), parse_line(out_body.decode())
    except (LineError, UnicodeDecodeError):
        return False
    return before.frame() == after.frame() and isinstance(after.value, str)


def resume_from(partial: Path, rejects_partial: Path, source: IO[bytes]) -> tuple[int, int]:
    """Keep an interrupted run's output; returns (lines kept, rejects among them).

    The input's first lines are read and checked against the kept ones, so the
    run goes on at the right line, and a partial file from another input is
    refused rather than spliced in.
    """
    kept = _truncate_to_complete_lines(partial)
    for number, output_raw in enumerate(_complete_lines(partial), 1):
        input_raw = source.readline()
        if not input_raw or not _same_record(input_raw, output_raw):
            raise UsageError(
                f"{partial.name} does not match the input at line {number}: "
                "resume with the input of the interrupted run, or delete it to start again"
            )
    records: list[bytes] = []
    if rejects_partial.exists():
        for raw in _complete_lines(rejects_partial):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                if int(json.loads(raw)["line"]) <= kept:
                    records.append(raw)
    rejects_partial.write_bytes(b"".join(records))
    return kept, len(records)


def _replace(partial: Path, final: Path, f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(partial, final)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


# -- command line ----------------------------------------------------------------


class _RefuseKeyOnCommandLine(argparse.Action):
    """``--api-key VALUE`` is refused without echoing VALUE (argparse's own error would)."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kw: Any) -> None:
        parser.error(
            "the API key is never taken from the command line (process lists and shell "
            f"history keep it): use --api-key-file FILE or ${API_KEY_ENV}"
        )


def add_parser(sub: Any) -> None:
    """Register ``citadel rewrap`` on the CLI's subparsers."""
    p = sub.add_parser(
        "rewrap",
        # No abbreviations: "--api-key" must not quietly mean "--api-key-file".
        allow_abbrev=False,
        help="rewrap the ciphertexts of a JSON-lines file under the active key",
        description=(
            "Read JSON lines with an encrypted_data field, rewrap each ciphertext through "
            f"a running Citadel, write the same lines in order. The API key comes from "
            f"--api-key-file or ${API_KEY_ENV}, never from the command line. "
            "Exit status: 0 done, 1 done with rejected lines, 2 aborted (resumable with "
            "--resume) or unusable arguments, 130 interrupted. See docs/bulk-rewrap.md."
        ),
    )
    p.add_argument("input", nargs="?", help="JSON-lines file (default: standard input)")
    p.add_argument("--output", "-o", help="output file (default: standard output)")
    p.add_argument(
        "--rejects",
        help="rejects file (default: OUTPUT.rejects; required when writing to standard output)",
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"Citadel's base URL (default {DEFAULT_URL})")
    p.add_argument("--api-key-file", help=f"file holding the API key (default: ${API_KEY_ENV})")
    p.add_argument("--api-key", action=_RefuseKeyOnCommandLine, help=argparse.SUPPRESS)
    p.add_argument(
        "--concurrency", type=int, default=16, help="calls in flight at most (default 16)"
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=120.0,
        help="seconds one line may take with its retries (default 120)",
    )
    p.add_argument(
        "--skip-prefix",
        help="pass through ciphertexts starting with this (e.g. cit1:<active key id>:) "
        "without a call; by default learned from the first answer",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on from OUTPUT.partial, left by an interrupted run on the same input",
    )
    p.set_defaults(func=cmd_rewrap)


def _api_key(args: argparse.Namespace) -> str:
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --api-key-file: {type(exc).__name__}") from None
        if not key:
            raise UsageError("--api-key-file is empty")
        return key
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise UsageError(f"no API key: set {API_KEY_ENV} or pass --api-key-file FILE")
    return key


ClientFactory = Callable[[str, str, float], AsyncCitadelClient]


def _default_client(url: str, api_key: str, deadline: float) -> AsyncCitadelClient:
    # One lean kept-alive connection per client, one client per lane (see Rewrapper):
    # httpx's default transport costs more CPU per call than Citadel's answer.
    transport = AsyncKeepAliveTransport(ssl_context=_tls_context())
    return AsyncCitadelClient(url, api_key, deadline=deadline, transport=transport)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Shared by the lanes: loading the CA store costs ~20 ms each.
    return ssl.create_default_context()


def cmd_rewrap(args: argparse.Namespace) -> int:
    return execute(args)


def execute(
    args: argparse.Namespace,
    *,
    make_client: ClientFactory = _default_client,
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
    stderr: IO[str] | None = None,
    handle_signals: bool = True,
) -> int:
    """Run ``citadel rewrap``; the keyword arguments are for tests (a fast retry clock, pipes)."""
    err = stderr or sys.stderr

    def say(text: str) -> None:
        print(f"citadel rewrap: {text}", file=err, flush=True)

    try:
        return _execute(args, make_client, stdin, stdout, err, say, handle_signals)
    except UsageError as exc:
        say(str(exc))
        return EXIT_ABORTED


def _execute(
    args: argparse.Namespace,
    make_client: ClientFactory,
    stdin: IO[bytes] | None,
    stdout: IO[bytes] | None,
    err: IO[str],
    say: Callable[[str], None],
    handle_signals: bool,
) -> int:
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        raise UsageError(f"--concurrency must be 1 to {MAX_CONCURRENCY}")
    if not args.deadline > 0:
        raise UsageError("--deadline must be positive")
    if args.skip_prefix is not None and target_prefix(args.skip_prefix) != args.skip_prefix:
        # A wrong prefix would pass lines through unrewrapped: only the two exact forms.
        raise UsageError("--skip-prefix must be cit1:<key id>: or ev:")
    try:
        url = httpx.URL(args.url)
    except httpx.InvalidURL:
        raise UsageError("--url is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError("--url must be an http:// or https:// URL")
    # Messages name Citadel's address, never a password in it.
    shown_url = str(url.copy_with(username=None, password=None))
    output = Path(args.output) if args.output else None
    if output is None and not args.rejects:
        raise UsageError("--rejects FILE is required when writing to standard output")
    if output is None and args.resume:
        raise UsageError("--resume needs --output: standard output cannot be resumed")
    rejects = Path(args.rejects) if args.rejects else Path(f"{output}.rejects")
    if output is not None and rejects.resolve() == output.resolve():
        raise UsageError("--rejects and --output must be different files")
    api_key = _api_key(args)
    try:
        clients = [make_client(args.url, api_key, args.deadline) for _ in range(args.concurrency)]
    except ValueError:
        raise UsageError("the API key must be printable ASCII") from None

    with contextlib.ExitStack() as stack:
        if args.input:
            try:
                source: IO[bytes] = stack.enter_context(open(args.input, "rb"))
            except OSError as exc:
                raise UsageError(f"cannot read {args.input}: {exc.strerror}") from None
            size = os.fstat(source.fileno()).st_size
        else:
            source, size = stdin or sys.stdin.buffer, 0

        rejects_partial = _partial(rejects)
        out_partial = _partial(output) if output is not None else None
        kept = kept_rejects = 0
        try:
            if out_partial is not None:
                if args.resume and out_partial.exists():
                    kept, kept_rejects = resume_from(out_partial, rejects_partial, source)
                    out: IO[bytes] = stack.enter_context(open(out_partial, "ab"))
                else:
                    if args.resume:
                        say(f"nothing to resume ({out_partial.name} does not exist); starting")
                    # "x": a partial file means an interrupted run; never overwrite it unasked.
                    out = stack.enter_context(open(out_partial, "xb"))
            else:
                out = stdout or sys.stdout.buffer
            rej: IO[bytes] = stack.enter_context(open(rejects_partial, "ab" if kept else "wb"))
        except FileExistsError as exc:
            raise UsageError(
                f"{Path(exc.filename).name} exists: an interrupted run left it; "
                "add --resume to go on, or delete it to start again"
            ) from None
        except OSError as exc:
            raise UsageError(f"cannot write {exc.filename}: {exc.strerror}") from None

        progress = _progress(err, size, source.tell() if size else 0, kept)
        stack.callback(progress.close)
        rewrapper = Rewrapper(
            clients,
            Sink(out, rej),
            skip_prefix=args.skip_prefix,
            url=shown_url,
            on_line=progress.update,
            warn=say,
        )
        rewrapper.counts.resumed = kept
        rewrapper.counts.rejected = kept_rejects
        outcome = asyncio.run(_main(rewrapper, source, kept + 1, handle_signals))
        progress.close()

        if outcome.message is None:
            _replace(rejects_partial, rejects, rej)
            if output is not None and out_partial is not None:
                # Last: the finished output's presence means the run is complete.
                _replace(out_partial, output, out)
            say(f"{outcome.counts.summary()}; rejects in {rejects}")
            return outcome.exit_code
        say(f"aborted: {outcome.message}")
        where = out_partial or "standard output"
        say(
            f"{outcome.counts.summary()}; the output in {where} is complete up to line "
            f"{outcome.last_line or kept}"
            + ("; run the same command with --resume to go on" if output is not None else "")
        )
        return outcome.exit_code


async def _main(
    rewrapper: Rewrapper,
    source: IO[bytes],
    first_number: int,
    handle_signals: bool,
) -> Outcome:
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Stop sending, keep what is done in order, leave a resumable partial file.
            loop.add_signal_handler(
                sig, rewrapper.fail, f"interrupted by {sig.name}", EXIT_INTERRUPTED
            )
            installed.append(sig)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for client in rewrapper.clients:
                await stack.enter_async_context(client)
            return await rewrapper.run(source, first_number)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


class _NoProgress:
    def update(self, _n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(err: IO[str], size: int, done: int, kept: int) -> Any:
    """A progress bar (bytes of input) on standard error when it is a terminal; else nothing."""
    if not err.isatty():
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(
        total=size or None,
        initial=done,
        unit="B",
        unit_scale=True,
        file=err,
        desc="rewrap",
        postfix={"resumed lines": kept} if kept else None,
    )
