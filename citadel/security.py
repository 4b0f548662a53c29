"""Callers, their API keys and the ACL.

Keys are held only as SHA-256 digests. A presented key is hashed and looked up
by digest: the lookup's timing can depend only on the digest of what the
client sent: learning a stored key's digest does not help forge the key (that
would need a SHA-256 preimage), so no constant-time loop over every key is
needed, and the cost of a check does not grow with the number of keys.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from citadel.config import Operation, SettingError, Settings
from citadel.fileio import create_once

HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
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


@dataclass(frozen=True, slots=True)
class Authenticator:
    """Maps a presented ``X-Internal-API-Key`` to a caller name and checks the ACL."""

    _by_digest: dict[bytes, str]
    _acl: dict[str, frozenset[str]]

    @classmethod
    def build(cls, keys: dict[str, list[str]], acl: dict[str, list[Operation]]) -> Authenticator:
        by_digest: dict[bytes, str] = {}
        for caller, entries in keys.items():
            for entry in entries:
                digest = _digest(entry)
                owner = by_digest.setdefault(digest, caller)
                if owner != caller:
                    raise SettingError("CITADEL_API_KEYS", "gives one key to two callers")
        return cls(by_digest, {c: frozenset(ops) for c, ops in acl.items()})

    def __repr__(self) -> str:
        return f"Authenticator(callers={sorted(set(self._by_digest.values()))!r})"

    @property
    def callers(self) -> frozenset[str]:
        return frozenset(self._by_digest.values())

    def caller_for(self, presented: bytes | None) -> str | None:
        """The caller owning the raw header value ``presented``, or None."""
        if not presented:
            return None
        return self._by_digest.get(hashlib.sha256(presented).digest())

    def allowed(self, caller: str, operation: str) -> bool:
        return operation in self._acl.get(caller, frozenset())


def resolve_api_keys(settings: Settings) -> tuple[dict[str, list[str]], Path | None]:
    """The configured keys; in development without any, generate and keep dev keys.

    Returns the keys and, when dev keys are in use, the file they are kept in.
    """
    keys: dict[str, list[str]] = {}
    for source in (settings.api_keys, settings.load_api_keys_file()):
        for caller, entries in (source or {}).items():
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
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        raise SettingError("CITADEL_API_KEYS", f"is unset and {path} is unreadable") from None
    return {str(c): [str(k) for k in v] for c, v in doc.items()}, path
