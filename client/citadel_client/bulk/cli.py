"""The command line: ``citadel-rewrap`` (and the server's ``citadel rewrap``, the same parser)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import ssl
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final

import httpx

from citadel_client.async_client import AsyncCitadelClient
from citadel_client.bulk.files import UsageError, partial_path, replace_with, resume_from
from citadel_client.bulk.lines import (
    ContextSpec,
    ParsedLine,
    context_of,
    parse_context_spec,
    target_prefix,
)
from citadel_client.bulk.progress import Progress, count_lines
from citadel_client.bulk.run import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_URL,
    EXIT_ABORTED,
    EXIT_INTERRUPTED,
    Contexts,
    Outcome,
    Rewrapper,
    Sink,
)
from citadel_client.config import (
    ENV_API_KEY,
    ENV_API_KEY_FILE,
    ENV_CA_FILE,
    ENV_CLIENT_CERT_FILE,
    ENV_CLIENT_KEY_FILE,
    ENV_URL,
    Cert,
    ConfigError,
    Verify,
    check_base_url,
    ssl_context,
    system_context,
)
from citadel_client.errors import CitadelError
from citadel_client.transport import AsyncKeepAliveTransport

API_KEY_ENV: Final = ENV_API_KEY
MAX_CONCURRENCY: Final = 64  # under httpx's default pool of 100 connections
MAX_BATCH_SIZE: Final = 10_000  # the most CITADEL_MAX_BATCH_ITEMS allows


class _RefuseKeyOnCommandLine(argparse.Action):
    """``--api-key VALUE`` is refused without echoing VALUE (argparse's own error would)."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kw: Any) -> None:
        parser.error(
            "the API key is never taken from the command line (process lists and shell "
            f"history keep it): use --api-key-file FILE or ${API_KEY_ENV}"
        )


PROG: Final = "citadel-rewrap"
_HELP: Final = "rewrap the ciphertexts of a JSON-lines file under the active key"
_DESCRIPTION: Final = (
    "Read JSON lines with an encrypted_data field, rewrap each ciphertext through "
    "a running Citadel, write the same lines in order. The API key comes from "
    f"--api-key-file, ${ENV_API_KEY_FILE} or ${API_KEY_ENV}, never from the command line. "
    "Exit status: 0 done, 1 done with rejected lines, 2 aborted (resumable with "
    "--resume) or unusable arguments, 130 interrupted. See docs/bulk-rewrap.md."
)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The parser of ``citadel-rewrap``, the client distribution's console script."""
    # No abbreviations: "--api-key" must not quietly mean "--api-key-file".
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=_DESCRIPTION)
    _add_arguments(p)
    return p


def add_parser(sub: Any) -> None:
    """Register ``rewrap`` on another CLI's subparsers (the server's ``citadel rewrap``).

    The same arguments and the same :func:`execute` as ``citadel-rewrap``: one tool,
    reachable from either distribution's command.
    """
    p = sub.add_parser("rewrap", allow_abbrev=False, help=_HELP, description=_DESCRIPTION)
    _add_arguments(p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", help="JSON-lines file (default: standard input)")
    p.add_argument("--output", "-o", help="output file (default: standard output)")
    p.add_argument(
        "--rejects",
        help="rejects file (default: OUTPUT.rejects; required when writing to standard output)",
    )
    p.add_argument("--url", help=f"Citadel's base URL (default: ${ENV_URL}, else {DEFAULT_URL})")
    p.add_argument(
        "--api-key-file",
        help=f"file holding the API key (default: ${ENV_API_KEY_FILE}, else ${API_KEY_ENV})",
    )
    p.add_argument(
        "--ca-file",
        help=f"CA bundle that signed Citadel's certificate, for https (default: ${ENV_CA_FILE}, "
        "else the system's)",
    )
    p.add_argument(
        "--client-cert",
        help=f"client certificate for mutual TLS, PEM (default: ${ENV_CLIENT_CERT_FILE})",
    )
    p.add_argument(
        "--client-key",
        help=f"its private key, when not in the certificate file (default: ${ENV_CLIENT_KEY_FILE})",
    )
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
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"lines per request at most (default {DEFAULT_BATCH_SIZE}; at most the "
        "server's CITADEL_MAX_BATCH_ITEMS)",
    )
    p.add_argument(
        "--context-from",
        metavar="KEY[=FIELD],...",
        help="the encryption context each line's ciphertext is bound to, from the line's "
        "fields (e.g. user_id=id,exchange): the new ciphertext keeps it",
    )
    p.add_argument(
        "--new-context-from",
        metavar="KEY[=FIELD],...",
        help="bind each new ciphertext to a context taken from the line's fields "
        "(e.g. user_id=id): every line is rewrapped, none passed through",
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
    # The messages start with the command's own name: "citadel rewrap" or "citadel-rewrap".
    p.set_defaults(func=cmd_rewrap, rewrap_prog=p.prog)


def main(argv: Sequence[str] | None = None) -> int:
    """``citadel-rewrap``: parse the command line and run; returns the exit status."""
    return execute(build_parser().parse_args(argv))


def _env(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None


def _api_key(args: argparse.Namespace) -> str:
    key_file, source = args.api_key_file, "--api-key-file"
    if not key_file and _env(ENV_API_KEY_FILE):
        key_file, source = _env(ENV_API_KEY_FILE), ENV_API_KEY_FILE
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {source}: {type(exc).__name__}") from None
        if not key:
            raise UsageError(f"{source} is empty")
        return key
    key = _env(API_KEY_ENV) or ""
    if not key:
        raise UsageError(
            f"no API key: set {API_KEY_ENV} or {ENV_API_KEY_FILE}, or pass --api-key-file FILE"
        )
    return key


def _tls(args: argparse.Namespace) -> ssl.SSLContext:
    """The lanes' TLS context, from the options or the client's CITADEL_* variables."""
    ca = args.ca_file or _env(ENV_CA_FILE)
    cert = args.client_cert or _env(ENV_CLIENT_CERT_FILE)
    key = args.client_key or _env(ENV_CLIENT_KEY_FILE)
    if key and not cert:
        raise UsageError("a client key needs its certificate: --client-cert FILE")
    verify: Verify = ca if ca else True
    pair: Cert | None = (cert, key) if cert and key else cert
    if verify is True and pair is None:
        return system_context()
    try:
        return ssl_context(verify, pair)
    except ConfigError:
        # Names the options, never the paths (which may say where secrets live).
        raise UsageError(
            "the CA bundle (--ca-file) or the client certificate and key (--client-cert, "
            "--client-key) cannot be used"
        ) from None


OnRetry = Callable[[CitadelError, float], None]
# (url, api key, deadline, the progress display's on_retry hook) -> one lane's client
ClientFactory = Callable[[str, str, float, OnRetry], AsyncCitadelClient]


def _default_client(
    url: str,
    api_key: str,
    deadline: float,
    on_retry: OnRetry,
    *,
    tls: ssl.SSLContext | None = None,
) -> AsyncCitadelClient:
    # One lean kept-alive connection per client, one client per lane (see Rewrapper):
    # httpx's default transport costs more CPU per call than Citadel's answer.
    transport = AsyncKeepAliveTransport(ssl_context=tls or system_context())
    return AsyncCitadelClient(
        url, api_key, deadline=deadline, transport=transport, on_retry=on_retry
    )


def _contexts(old: ContextSpec | None, new: ContextSpec | None) -> Contexts | None:
    """Each line's (context, new context) from its fields, as the options ask."""
    if old is None and new is None:
        return None

    def contexts(parsed: ParsedLine) -> tuple[dict[str, str] | None, dict[str, str] | None]:
        return (
            None if old is None else context_of(parsed.fields, old),
            None if new is None else context_of(parsed.fields, new),
        )

    return contexts


def cmd_rewrap(args: argparse.Namespace) -> int:
    """The subcommand's ``func``: what ``citadel rewrap`` calls once parsed."""
    return execute(args)


def execute(
    args: argparse.Namespace,
    *,
    make_client: ClientFactory | None = None,
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
    stderr: IO[str] | None = None,
    handle_signals: bool = True,
) -> int:
    """Run the tool on parsed arguments; the keyword arguments are for tests (a fast retry
    clock, pipes); ``make_client`` None makes the lanes' own clients, TLS options included."""
    err = stderr or sys.stderr
    name = getattr(args, "rewrap_prog", "citadel rewrap")

    def say(text: str) -> None:
        print(f"{name}: {text}", file=err, flush=True)

    try:
        return _execute(args, make_client, stdin, stdout, err, say, handle_signals)
    except UsageError as exc:
        say(str(exc))
        return EXIT_ABORTED


def _execute(
    args: argparse.Namespace,
    make_client: ClientFactory | None,
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
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise UsageError(f"--batch-size must be 1 to {MAX_BATCH_SIZE}")
    try:
        old_spec = (
            parse_context_spec(args.context_from, "--context-from") if args.context_from else None
        )
        new_spec = (
            parse_context_spec(args.new_context_from, "--new-context-from")
            if args.new_context_from
            else None
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if new_spec is not None and args.skip_prefix is not None:
        raise UsageError(
            "--skip-prefix passes lines through, but --new-context-from binds every line"
        )
    if args.skip_prefix is not None and target_prefix(args.skip_prefix) != args.skip_prefix:
        # A wrong prefix would pass lines through unrewrapped: only the two exact forms.
        raise UsageError("--skip-prefix must be cit1:<key id>: or ev:")
    raw_url, url_source = args.url, "--url"
    if not raw_url:
        raw_url, url_source = _env(ENV_URL) or DEFAULT_URL, ENV_URL
    try:
        check_base_url(raw_url, url_source)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    url = httpx.URL(raw_url)
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
    if make_client is None:
        make_client = functools.partial(_default_client, tls=_tls(args))
    # The clients report their waits to the progress display, made once the files are open.
    shown: list[Progress] = []

    def on_retry(error: CitadelError, seconds: float) -> None:
        if shown:
            shown[0].waiting(error, seconds)

    try:
        clients = [
            make_client(raw_url, api_key, args.deadline, on_retry) for _ in range(args.concurrency)
        ]
    except ValueError:
        raise UsageError("the API key must be printable ASCII") from None

    with contextlib.ExitStack() as stack:
        if args.input:
            try:
                source: IO[bytes] = stack.enter_context(open(args.input, "rb"))
            except OSError as exc:
                raise UsageError(f"cannot read {args.input}: {exc.strerror}") from None
            # A named pipe (`<(psql ...)`, /dev/stdin) cannot be counted ahead: only a file.
            seekable = stat.S_ISREG(os.fstat(source.fileno()).st_mode)
        else:
            source, seekable = stdin or sys.stdin.buffer, False

        rejects_partial = partial_path(rejects)
        out_partial = partial_path(output) if output is not None else None
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

        terminal = err.isatty()
        # Of how many: counted up front only for a person watching (a file: a quick read).
        total = kept + count_lines(source) if terminal and seekable else None
        rewrapper = Rewrapper(
            clients,
            Sink(out, rej),
            skip_prefix=args.skip_prefix,
            url=shown_url,
            warn=say,
            batch_size=args.batch_size,
            contexts=_contexts(old_spec, new_spec),
            bind=new_spec is not None,
        )
        rewrapper.counts.resumed = kept
        rewrapper.counts.rejected = kept_rejects
        progress = Progress(
            err,
            getattr(args, "rewrap_prog", "citadel rewrap"),
            done=lambda: max(kept, rewrapper.last_line),
            rejected=lambda: rewrapper.counts.rejected,
            total=total,
            terminal=terminal,
        )
        shown.append(progress)
        stack.callback(progress.close)
        outcome = asyncio.run(_main(rewrapper, progress, source, kept + 1, handle_signals))
        progress.close()

        if outcome.message is None:
            replace_with(rejects_partial, rejects, rej)
            if output is not None and out_partial is not None:
                # Last: the finished output's presence means the run is complete.
                replace_with(out_partial, output, out)
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
    progress: Progress,
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
    drawing = asyncio.create_task(progress.run())
    try:
        async with contextlib.AsyncExitStack() as stack:
            for client in rewrapper.clients:
                await stack.enter_async_context(client)
            return await rewrapper.run(source, first_number)
    finally:
        drawing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drawing
        for sig in installed:
            loop.remove_signal_handler(sig)
