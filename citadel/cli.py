"""``citadel serve | keygen | audit-pseudonym | keyring``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from citadel import bulk
from citadel.config import SettingError, Settings, describe_settings_error
from citadel.keyring import KeyringError, create_keyring, load_keyring, rotate_keyring

EXIT_CONFIG = 2


def _fail(message: str) -> int:
    print(f"citadel: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _settings() -> Settings:
    return Settings()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from citadel.app import create_app
    from citadel.audit import configure_logging

    settings = _settings()
    configure_logging(settings)
    # Built in this process even with several workers, so that a bad set-up is
    # reported once, before any worker starts.
    app = create_app(settings)
    common = {
        "host": args.host,
        "port": args.port,
        "log_config": None,
        "access_log": False,
        "server_header": False,
        "timeout_graceful_shutdown": 10,
    }
    if args.workers > 1:
        if settings.rate_limit_storage_uri.startswith("memory://"):
            import structlog

            structlog.get_logger("citadel").warning(
                "rate_limits_per_worker",
                workers=args.workers,
                hint="set CITADEL_RATE_LIMIT_STORAGE_URI to a redis:// URI to share limits",
            )
        uvicorn.run("citadel.app:app_from_env", factory=True, workers=args.workers, **common)
    else:
        uvicorn.run(app, **common)
    return 0


def cmd_keygen(_args: argparse.Namespace) -> int:
    from citadel.security import new_api_key

    key, hashed = new_api_key()
    print(key)
    print(hashed)
    return 0


def cmd_audit_pseudonym(args: argparse.Namespace) -> int:
    from citadel.audit import Pseudonymizer, pseudonym_key

    print(Pseudonymizer(pseudonym_key(_settings()))(args.user_id))
    return 0


def cmd_keyring(args: argparse.Namespace) -> int:
    path = Path(args.path) if args.path else _settings().local_keyring
    if args.action == "init":
        if not create_keyring(path, origin="operator"):
            return _fail(f"{path} exists; use `citadel keyring rotate` to add a key")
        print(f"created {path} with key {load_keyring(path).active}")
    elif args.action == "rotate":
        print(f"added and activated key {rotate_keyring(path)} in {path}")
    else:
        ring = load_keyring(path)
        print(f"{path}: active {ring.active}; keys {', '.join(sorted(ring.keys))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citadel", description="Citadel credential vault.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8004)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(func=cmd_serve)
    keygen = sub.add_parser("keygen", help="print a new API key and its sha256: form")
    keygen.set_defaults(func=cmd_keygen)
    pseudo = sub.add_parser("audit-pseudonym", help="print the audit pseudonym of a user id")
    pseudo.add_argument("user_id")
    pseudo.set_defaults(func=cmd_audit_pseudonym)
    ring = sub.add_parser("keyring", help="manage the local provider's keyring")
    ring.add_argument("action", choices=["init", "rotate", "show"])
    ring.add_argument("--path", help="keyring file (default: CITADEL_LOCAL_KEYRING)")
    ring.set_defaults(func=cmd_keyring)
    bulk.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
