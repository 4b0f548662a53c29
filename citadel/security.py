"""Callers, their API keys and the ACL.

Keys are held only as SHA-256 digests. A presented key is hashed and looked up
by digest: the lookup's timing can depend only on the digest of what the
client sent: learning a stored key's digest does not help forge the key (that
would need a SHA-256 preimage), so no constant-time loop over every key is
needed, and the cost of a check does not grow with the number of keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import structlog

from citadel.config import Operation, SettingError, Settings, read_secret_file
from citadel.fileio import create_once

log = structlog.get_logger("citadel")

HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
MIN_RAW_KEY_CHARS = 32
DEV_CALLERS = ("sentinel", "conductor")


def new_api_key() -> tuple[str, str]:
    """A fresh API key (32 random bytes, hex) and its ``sha256:<hex>`` form."""
    key = secrets.token_hex(32)
    return key, "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _digest(entry: str) -> bytes:
    match = HASHED.match(entry)
    if match:
        return bytes.fromhex(match.group(1))
    return hashlib.sha256(entry.encode()).digest()


def _digests(keys: dict[str, list[str]]) -> dict[bytes, str]:
    by_digest: dict[bytes, str] = {}
    for caller, entries in keys.items():
        for entry in entries:
            owner = by_digest.setdefault(_digest(entry), caller)
            if owner != caller:
                raise SettingError("CITADEL_API_KEYS", "gives one key to two callers")
    return by_digest


@dataclass(slots=True)
class Authenticator:
    """Maps a presented ``X-Internal-API-Key`` to a caller name and checks the ACL."""

    _by_digest: dict[bytes, str]
    _acl: dict[str, frozenset[str]]

    @classmethod
    def build(cls, keys: dict[str, list[str]], acl: dict[str, list[Operation]]) -> Authenticator:
        """An authenticator for these callers' keys and this ACL (keys stored as SHA-256 only)."""
        return cls(_digests(keys), {c: frozenset(ops) for c, ops in acl.items()})

    def replace_keys(self, keys: dict[str, list[str]]) -> None:
        """Swap in a new key set; one reference assignment, so requests see old or new."""
        self._by_digest = _digests(keys)

    def __repr__(self) -> str:
        return f"Authenticator(callers={sorted(set(self._by_digest.values()))!r})"

    @property
    def callers(self) -> frozenset[str]:
        """The names of the callers that have keys."""
        return frozenset(self._by_digest.values())

    def caller_for(self, presented: bytes | None) -> str | None:
        """The caller owning the raw header value ``presented``, or None."""
        if not presented:
            return None
        return self._by_digest.get(hashlib.sha256(presented).digest())

    def allowed(self, caller: str, operation: str) -> bool:
        """Whether the ACL gives ``caller`` the operation."""
        return operation in self._acl.get(caller, frozenset())


def resolve_api_keys(settings: Settings) -> tuple[dict[str, list[str]], Path | None]:
    """The configured keys; in development without any, generate and keep dev keys.

    Returns the keys and, when dev keys are in use, the file they are kept in.
    """
    keys: dict[str, list[str]] = {}
    sources = (
        ("CITADEL_API_KEYS", settings.api_keys),
        ("CITADEL_API_KEYS_FILE", settings.load_api_keys_file()),
    )
    for variable, source in sources:
        for caller, entries in (source or {}).items():
            if settings.env == "production":
                _refuse_short_raw_keys(variable, caller, entries)
            keys.setdefault(caller, []).extend(entries)
    if keys:
        return keys, None
    if settings.env == "production":
        raise SettingError("CITADEL_API_KEYS", "is required in production")
    path = settings.dev_dir / "dev-api-keys.json"

    def make() -> bytes:
        doc = {caller: [secrets.token_hex(32)] for caller in DEV_CALLERS}
        return json.dumps(doc, indent=2).encode() + b"\n"

    create_once(path, make)
    try:
        doc = json.loads(read_secret_file(path, "CITADEL_API_KEYS", settings.env))
    except (OSError, ValueError):
        raise SettingError("CITADEL_API_KEYS", f"is unset and {path} is unreadable") from None
    return {str(c): [str(k) for k in v] for c, v in doc.items()}, path


def _refuse_short_raw_keys(variable: str, caller: str, entries: list[str]) -> None:
    """Production takes no raw key a guesser could find: 32 characters at least.

    The ``sha256:`` form is taken as it is (its key's length cannot be known);
    ``citadel keygen`` makes 64-character keys.
    """
    for entry in entries:
        if not HASHED.match(entry) and len(entry) < MIN_RAW_KEY_CHARS:
            raise SettingError(
                variable,
                f"holds a raw key of caller {caller!r} shorter than {MIN_RAW_KEY_CHARS} "
                "characters, refused in production (make one with `citadel keygen`)",
            )


class KeyFileWatcher:
    """Reloads ``CITADEL_API_KEYS_FILE`` when it changes, so keys rotate without a restart.

    The file is checked every ``interval_s`` (a ``stat`` call). A file that
    cannot be read or parsed is logged and ignored: the keys in force stay.
    """

    def __init__(
        self, settings: Settings, authenticator: Authenticator, interval_s: float = 2.0
    ) -> None:
        self._settings = settings
        self._auth = authenticator
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None
        self._seen = self._stamp()

    def _stamp(self) -> tuple[float, int, int, int, int] | None:
        # Mode and owner too: a `chmod 600` that makes a refused file safe is a change.
        path = self._settings.api_keys_file
        try:
            st = path.stat() if path else None
        except OSError:
            return None
        return (st.st_mtime, st.st_size, st.st_ino, st.st_mode, st.st_uid) if st else None

    async def start(self) -> None:
        """Start following ``CITADEL_API_KEYS_FILE``, when one is set."""
        if self._settings.api_keys_file is not None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def aclose(self) -> None:
        """Stop following the keys file."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            stamp = self._stamp()
            if stamp is None or stamp == self._seen:
                continue
            self._seen = stamp
            try:
                keys, _ = resolve_api_keys(self._settings)
                self._auth.replace_keys(keys)
            except SettingError as exc:
                log.error("api_keys_reload_failed", problem=str(exc))
                continue
            log.info(
                "api_keys_reloaded", keys_per_caller={c: len(k) for c, k in sorted(keys.items())}
            )
