"""``citadel check``: everything ``serve`` needs, tried without listening on a port.

An operator wants to know before a roll-out whether an instance would start and
serve: the settings as ``serve`` reads them, the API keys and ACL, the keyring,
the pseudonym key, the TLS certificate, key and client CA (or, in production,
that the listener would serve plain HTTP), the rate-limit storage, each
decrypting provider and the audit stream. One line per item, ``ok`` or what
is wrong (never a value); exit 0 when all are ok, 2 when a setting is bad, 1
when a dependency cannot be reached. Nothing is created: where ``serve``
would create a development file, the line says so.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from pydantic import ValidationError
from pydantic_settings import SettingsError

from citadel.config import SettingError, Settings, describe_settings_error
from citadel.keyring import KeyringError

OK, BAD_SETTING, UNREACHABLE = 0, 2, 1


@dataclass(frozen=True, slots=True)
class Finding:
    """One item's verdict: the item, ``ok`` or the problem, and the exit code it calls for."""

    item: str
    text: str
    code: int = OK


def _setting(item: str, attempt: Callable[[], str]) -> Finding:
    """Run a check whose failure is a bad setting (exit 2)."""
    try:
        return Finding(item, attempt())
    except (SettingError, ValidationError, SettingsError) as exc:
        return Finding(item, describe_settings_error(exc), BAD_SETTING)
    except KeyringError as exc:
        return Finding(item, f"CITADEL_LOCAL_KEYRING: {exc}", BAD_SETTING)
    except OSError as exc:
        return Finding(item, f"cannot read a file it needs ({exc.strerror})", BAD_SETTING)


def _api_keys(settings: Settings) -> str:
    from citadel.security import Authenticator, resolve_api_keys

    if settings.api_keys is None and settings.api_keys_file is None:
        if settings.env == "production":
            raise SettingError("CITADEL_API_KEYS", "is required in production")
        return f"ok (development keys in {settings.dev_dir / 'dev-api-keys.json'})"
    keys, _ = resolve_api_keys(settings)
    Authenticator.build(keys, settings.acl)
    return f"ok ({len(keys)} callers)"


def _pseudonym_key(settings: Settings) -> str:
    from citadel.pseudonyms import pseudonym_key

    if settings.audit_pseudonym_key is None and settings.env == "development":
        return f"ok (development key in {settings.dev_dir / 'audit-pseudonym.key'})"
    pseudonym_key(settings)
    return "ok"


def _keyring(settings: Settings) -> str:
    from citadel.metrics import Metrics
    from citadel.providers.local import LocalProvider

    path = settings.local_keyring
    if not path.exists() and settings.env == "development" and settings.provider == "local":
        return f"ok ({path} does not exist yet; serve creates it in development)"
    LocalProvider.from_settings(settings, Metrics(), create=False)
    return "ok"


def _tls(settings: Settings) -> str:
    from citadel.tls import ContextReloader, TlsFiles, unbound_callers

    files = TlsFiles.from_settings(settings)
    if files is None:
        # Production only (see findings). Not a failure (a mesh sidecar may
        # terminate TLS), but said, as serve logs it.
        return (
            "ok, but plaintext_listener: plain HTTP in production (set "
            "CITADEL_TLS_CERT_FILE and CITADEL_TLS_KEY_FILE unless a sidecar terminates TLS)"
        )
    loaded = ContextReloader.load(files).loaded
    expiry = loaded.not_after.strftime("%Y-%m-%d")
    if loaded.expired:
        raise SettingError("CITADEL_TLS_CERT_FILE", f"holds a certificate that expired on {expiry}")
    text = f"ok (TLS 1.3, certificate valid until {expiry}"
    if loaded.mutual:
        text += ", client certificates required"
    if settings.tls_caller_identities is not None:
        text += f", caller identities for {len(settings.tls_caller_identities)}"
        keys, _ = _resolved_keys(settings)
        missing = unbound_callers(settings.tls_caller_identities, keys)
        if missing:
            text += f"; callers without an identity cannot authenticate: {', '.join(missing)}"
    return text + ")"


def _resolved_keys(settings: Settings) -> tuple[dict[str, list[str]], object]:
    from citadel.security import resolve_api_keys

    if settings.api_keys is None and settings.api_keys_file is None:
        return {}, None  # development keys: not created by a check
    try:
        return resolve_api_keys(settings)
    except (SettingError, OSError):
        return {}, None  # said by the "api keys and acl" line


def _audit_stream() -> Finding:
    """Standard output, where audit lines go, must be open for writing."""
    try:
        flags = fcntl.fcntl(sys.stdout.fileno(), fcntl.F_GETFL)
    except (OSError, ValueError):
        return Finding("audit stream", "standard output is closed", UNREACHABLE)
    if flags & os.O_ACCMODE == os.O_RDONLY:
        return Finding("audit stream", "standard output is not writable", UNREACHABLE)
    return Finding("audit stream", "ok (standard output)")


async def _rate_limit_storage(settings: Settings) -> Finding:
    from citadel.metrics import Metrics
    from citadel.ratelimit import RateLimiter

    try:
        limiter = RateLimiter(settings, Metrics())
    except SettingError as exc:
        return Finding("rate-limit storage", describe_settings_error(exc), BAD_SETTING)
    if not limiter.shared:
        return Finding("rate-limit storage", "ok (memory, this instance only)")
    await limiter.start()
    await limiter.aclose()
    if limiter.degraded:
        return Finding(
            "rate-limit storage", "CITADEL_RATE_LIMIT_STORAGE_URI cannot be reached", UNREACHABLE
        )
    return Finding("rate-limit storage", "ok (shared)")


async def _evervault(settings: Settings) -> Finding:
    from citadel.metrics import Metrics
    from citadel.providers.evervault import EvervaultProvider

    item = "provider evervault"
    try:
        provider = EvervaultProvider.from_settings(settings, Metrics())
    except SettingError as exc:
        return Finding(item, describe_settings_error(exc), BAD_SETTING)
    try:
        problem = await asyncio.to_thread(provider.probe)
    finally:
        await provider.aclose()
    return (
        Finding(item, "ok (the app's public key fetched)")
        if problem is None
        else Finding(item, problem, UNREACHABLE)
    )


def findings() -> list[Finding]:
    """Every item's verdict, in the order serve needs them; stops at unreadable settings."""
    # The lines below say it all; the log lines of what is tried would repeat it.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    try:
        settings = Settings()
    except (SettingError, ValidationError, SettingsError) as exc:
        return [Finding("settings", describe_settings_error(exc), BAD_SETTING)]
    out = [
        Finding("settings", f"ok ({settings.env}, provider {settings.provider})"),
        _setting("api keys and acl", lambda: _api_keys(settings)),
        _setting("audit pseudonym key", lambda: _pseudonym_key(settings)),
    ]
    if settings.tls_enabled or settings.env == "production":
        # Development over plain HTTP has nothing to say here.
        out.append(_setting("tls", lambda: _tls(settings)))
    if "local" in settings.decrypt_providers:
        out.append(_setting("provider local (keyring)", lambda: _keyring(settings)))
    out.append(asyncio.run(_rate_limit_storage(settings)))
    if "evervault" in settings.decrypt_providers:
        out.append(asyncio.run(_evervault(settings)))
    out.append(_audit_stream())
    return out


def run(*, as_json: bool = False) -> int:
    """One line per item, or one JSON document; exit 2 for a bad setting, 1 for a dependency."""
    results = findings()
    codes = {finding.code for finding in results}
    code = BAD_SETTING if BAD_SETTING in codes else UNREACHABLE if UNREACHABLE in codes else OK
    if as_json:
        items = [{"item": f.item, "ok": f.code == OK, "detail": f.text} for f in results]
        print(json.dumps({"ok": code == OK, "exit_code": code, "items": items}, indent=2))
        return code
    for finding in results:
        print(f"{finding.item}: {finding.text}")
    return code
