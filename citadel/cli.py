"""``citadel serve | keygen | audit-pseudonym | keyring``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from citadel.config import SettingError, Settings, describe_settings_error
from citadel.keyring import (
    Key,
    KeyringError,
    change_keyring,
    create_keyring,
    load_keyring,
    resolve,
    rotate_keyring,
)
from citadel_client import bulk  # `citadel rewrap` is the client's citadel-rewrap

EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 1  # something serve needs (its address) cannot be had


def _fail(message: str) -> int:
    print(f"citadel: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _settings() -> Settings:
    return Settings()


def cmd_serve(args: argparse.Namespace) -> int:
    """``citadel serve``: check the set-up and the address first, then hand the app to uvicorn."""
    import uvicorn

    from citadel.app import create_app
    from citadel.logs import configure_logging

    settings = _settings()
    configure_logging(settings)
    busy = _cannot_listen(args.host, args.port)
    if busy is not None:
        print(f"citadel: cannot listen on {busy}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    # Built in this process even with several workers, so that a bad set-up is
    # reported once, before any worker starts.
    app = create_app(settings)
    from citadel.http.serving import uvicorn_options
    from citadel.tls_listener import https_options

    # With TLS, the files are loaded here first: a bad one stops start-up (exit 2,
    # naming the setting) before anything listens; each worker loads its own.
    common = {"host": args.host, "port": args.port, **https_options(settings, uvicorn_options())}
    _tls_notices(settings)
    if settings.env == "development":
        _dev_banner(settings, args.host, args.port)
    if args.workers > 1:
        if settings.rate_limit_storage_uri.startswith("memory://"):
            import structlog

            structlog.get_logger("citadel").warning(
                "rate_limits_per_worker",
                workers=args.workers,
                hint="set CITADEL_RATE_LIMIT_STORAGE_URI to a redis:// URI to share limits",
            )
        # Worker processes import the app by name (and the protocol class by its own).
        uvicorn.run("citadel.app:app_from_env", factory=True, workers=args.workers, **common)
    else:
        uvicorn.run(app, **common)
    return 0


def _tls_notices(settings: Settings) -> None:
    """What an operator must know of the listener's TLS, said once at start."""
    import structlog

    log = structlog.get_logger("citadel")
    if not settings.tls_enabled and settings.env == "production":
        log.warning(
            "plaintext_listener",
            hint="set CITADEL_TLS_CERT_FILE and CITADEL_TLS_KEY_FILE, unless a sidecar "
            "or mesh terminates TLS in front of Citadel",
        )
    if settings.tls_caller_identities is not None:
        from citadel.security import resolve_api_keys
        from citadel.tls import unbound_callers

        keys, _ = resolve_api_keys(settings)
        missing = unbound_callers(settings.tls_caller_identities, keys)
        if missing:
            log.warning(
                "tls_callers_without_identity",
                callers=missing,
                hint="their requests are 401 until CITADEL_TLS_CALLER_IDENTITIES names them",
            )


def _dev_banner(settings: Settings, host: str, port: int) -> None:
    """Where a development server's keys are and what to try next, on standard error.

    Standard output is the audit stream; the banner never goes there, and it
    names files, never a key.
    """
    url = f"{'https' if settings.tls_enabled else 'http'}://{host}:{port}"
    keys = settings.dev_dir / "dev-api-keys.json"
    lines = [
        f"Citadel {_version()} in development on {url} (not for production: see the README's "
        "production checklist)",
        f"  keyring:      {settings.local_keyring}",
    ]
    if settings.api_keys is None and settings.api_keys_file is None:
        may = "; ".join(
            f"{caller} may {', '.join(settings.acl.get(caller, [])) or 'do nothing'}"
            for caller in ("sentinel", "conductor")
        )
        lines.append(f"  API keys:     {keys} ({may})")
        read_key = (
            "python3 -c 'import json; print(json.load(open(\"" + str(keys) + '"))["sentinel"][0])\''
        )
        lines.append(f"  try:          SENTINEL=$({read_key})")
        # Over TLS curl must trust the server's CA (and, under mutual TLS, show a certificate).
        tls = ""
        if settings.tls_enabled:
            tls = " --cacert CA.pem" + (
                " --cert CLIENT.pem --key CLIENT-KEY.pem" if settings.tls_client_ca_file else ""
            )
        lines.append(
            f'                curl -s{tls} {url}/encrypt -H "X-Internal-API-Key: $SENTINEL" '
            "-H 'Content-Type: application/json' -d '{\"plaintext\": \"hello\"}'"
        )
    if settings.docs_enabled:
        lines.append(f"  API docs:     {url}/docs")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _version() -> str:
    from citadel.status import VERSION

    return VERSION


def _cannot_listen(host: str, port: int) -> str | None:
    """What stops ``serve`` from listening on host:port (one line), or None.

    Tried before anything starts, so that a busy port is said once, plainly,
    and never after a ``citadel_started`` line; uvicorn binds the same way next.
    """
    import socket

    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return f"{host}:{port}: the host name does not resolve"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                where = (
                    f"[{address[0]}]:{port}"
                    if family == socket.AF_INET6
                    else f"{address[0]}:{port}"
                )
                return f"{where}: {exc.strerror}"
    return None


def cmd_check(args: argparse.Namespace) -> int:
    """``citadel check``: try everything ``serve`` needs without listening; one line per item."""
    from citadel.check import run as run_check

    return run_check(as_json=args.json)


def cmd_keygen(_args: argparse.Namespace) -> int:
    """``citadel keygen``: a fresh API key and its ``sha256:`` form for ``CITADEL_API_KEYS``."""
    from citadel.security import new_api_key

    key, hashed = new_api_key()
    print(key)
    print(hashed)
    return 0


def cmd_audit_pseudonym(args: argparse.Namespace) -> int:
    """``citadel audit-pseudonym``: the pseudonym a user id has in audit lines."""
    from citadel.pseudonyms import Pseudonymizer, pseudonym_key

    settings = _settings()
    if settings.audit_pseudonym_key is not None:
        key = pseudonym_key(settings)  # checks it; creates nothing when the setting is given
    elif settings.env == "production":
        return _fail("CITADEL_AUDIT_PSEUDONYM_KEY is unset; it is required in production")
    else:
        # The server creates this file in development; an investigation must
        # read the key the server used, and never make up a new one.
        path = settings.dev_dir / "audit-pseudonym.key"
        try:
            key = path.read_bytes().strip()
        except FileNotFoundError:
            return _fail(
                f"no audit pseudonym key: CITADEL_AUDIT_PSEUDONYM_KEY is unset and {path} "
                "does not exist"
            )
        except OSError as exc:
            return _fail(f"no audit pseudonym key: {path} cannot be read ({exc.strerror})")
        if not key:
            return _fail(f"no audit pseudonym key: {path} is empty")
    print(Pseudonymizer(key)(args.user_id))
    return 0


def _keyring_path(args: argparse.Namespace) -> Path:
    path: str | None = getattr(args, "path", None)
    return Path(path) if path else _settings().local_keyring


def _show(path: Path, *, as_json: bool = False) -> None:
    ring = load_keyring(path)
    target = resolve(path)
    if as_json:
        # For scripts and monitoring: ids, states and dates, never key material.
        doc = {
            "path": str(path),
            "resolved": str(target),
            "origin": ring.origin,
            "active": ring.active,
            "keys": [
                {
                    "id": key.id,
                    "state": ring.state_of(key.id),
                    "created": key.created,
                    "activated_at": key.activated_at,
                    "retired_at": key.retired_at,
                    "restored_at": key.restored_at,
                }
                for key in ring.keys
            ],
        }
        print(json.dumps(doc, indent=2))
        return
    where = f"{path} -> {target}" if target != path.absolute() else str(path)
    print(f"{where}: origin {ring.origin}, active {ring.active}")
    rows: list[tuple[str, ...]] = [
        ("KEY ID", "STATE", "CREATED", "ACTIVATED", "RETIRED", "RESTORED")
    ]
    for key in ring.keys:
        dates = (key.created, key.activated_at, key.retired_at, key.restored_at)
        rows.append((key.id, ring.state_of(key.id), *(d or "-" for d in dates)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_keyring(args: argparse.Namespace) -> int:
    """``citadel keyring ...``: the keyring's lifecycle commands, each an atomic replace."""
    path = _keyring_path(args)
    action: str = args.action
    key_id: str = getattr(args, "key_id", "")
    try:
        if action == "init":
            if not create_keyring(path, origin="operator"):
                return _fail(f"{path} exists; use `citadel keyring rotate` to add a key")
            print(f"created {path} with key {load_keyring(path).active} (active)")
        elif action == "show":
            _show(path, as_json=getattr(args, "json", False))
        elif action == "rotate":
            print(f"added and activated key {rotate_keyring(path)} in {path}")
        elif action == "add":
            before, after = change_keyring(
                path, lambda ring: ring.add(Key.generate(taken=ring.ids))
            )
            (added,) = after.ids - before.ids
            print(
                f"added key {added} to {path}, in force but not active; once every instance "
                f"has it (2 s for running servers), run `citadel keyring activate {added}`"
            )
        elif action == "activate":
            before, after = change_keyring(path, lambda ring: ring.activate(key_id))
            if before == after:
                print(f"key {key_id} is already active in {path}")
            else:
                print(f"activated key {key_id} in {path}; {before.active} stays in force")
        elif action == "retire":
            before, after = change_keyring(path, lambda ring: ring.retire(key_id))
            if before == after:
                print(f"key {key_id} is already retired in {path}")
            else:
                print(
                    f"retired key {key_id} in {path}; its ciphertexts now fail with "
                    f"key_retired (`citadel keyring restore {key_id}` undoes this)"
                )
        else:  # restore
            before, after = change_keyring(path, lambda ring: ring.restore(key_id))
            state = "already in force" if before == after else "restored: in force again"
            print(f"key {key_id} {state} in {path}")
    except KeyringError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot change {path}: {exc.strerror}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser, every subcommand with its options and defaults."""
    from citadel.status import VERSION

    parser = argparse.ArgumentParser(prog="citadel", description="Citadel credential vault.")
    parser.add_argument("--version", action="version", version=f"citadel {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the HTTP service",
        description="Serve Citadel's HTTP API; settings come from CITADEL_* variables and .env.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8004, help="TCP port to listen on")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (to share rate limits, a redis:// rate-limit storage URI)",
    )
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser(
        "check",
        help="try everything serve needs, without listening (exit 0 ok, 2 bad setting, 1 down)",
    )
    check.add_argument("--json", action="store_true", help="one JSON document of the items")
    check.set_defaults(func=cmd_check)
    keygen = sub.add_parser("keygen", help="print a new API key and its sha256: form")
    keygen.set_defaults(func=cmd_keygen)
    pseudo = sub.add_parser("audit-pseudonym", help="print the audit pseudonym of a user id")
    pseudo.add_argument("user_id")
    pseudo.set_defaults(func=cmd_audit_pseudonym)
    ring = sub.add_parser("keyring", help="manage the local provider's keyring")
    path_help = "keyring file (default: CITADEL_LOCAL_KEYRING)"
    ring.add_argument("--path", help=path_help)
    actions = ring.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("init", "create a keyring with one active key"),
        ("show", "print key ids, states and dates (never key material)"),
        ("rotate", "add a key and activate it"),
        ("add", "add a key that decrypts but does not encrypt yet"),
        ("activate", "make KEY_ID the key that encrypts"),
        ("retire", "keep KEY_ID but decrypt nothing with it"),
        ("restore", "bring a retired KEY_ID back in force"),
    ):
        one = actions.add_parser(action, help=text)
        if action in ("activate", "retire", "restore"):
            one.add_argument("key_id", metavar="KEY_ID")
        if action == "show":
            one.add_argument("--json", action="store_true", help="one JSON document")
        # SUPPRESS: a --path given before the action must not be reset by this default.
        one.add_argument("--path", default=argparse.SUPPRESS, help=path_help)
    ring.set_defaults(func=cmd_keyring)
    bulk.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``citadel`` command: run one subcommand and return its exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "workers", 1) < 1:
        return _fail("--workers must be at least 1")
    try:
        code: int = args.func(args)
    except (SettingError, ValidationError, SettingsError) as exc:
        return _fail(describe_settings_error(exc))
    except KeyringError as exc:
        return _fail(f"invalid setting: CITADEL_LOCAL_KEYRING ({exc})")
    except OSError as exc:
        name = Path(exc.filename).name if exc.filename else "a file"
        return _fail(f"cannot use {name}: {exc.strerror}")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
