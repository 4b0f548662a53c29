"""What an audit line shows instead of a user id or a ciphertext.

A user id becomes a keyed pseudonym (``u_`` and 16 hex digits), so that an
operator holding the key can find one user's lines and nobody else can; a
ciphertext or a message becomes an unkeyed fingerprint (``ct_fp``,
``msg_fp``), so that a caller can tie a failure to its audit event.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from citadel.config import SettingError, Settings, read_secret_file
from citadel.fileio import create_once

# Defined once, in the client distribution: the bulk tool's rejects carry the same ct_fp.
from citadel_client.fingerprint import fingerprint

__all__ = ["Pseudonymizer", "fingerprint", "pseudonym_key"]


class Pseudonymizer:
    """``u_`` and the first 16 hex digits of HMAC-SHA256(key, user id).

    Keyed, so that the audit log can tie a user's requests together without
    naming the user, and nobody without the key can test a guess.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "Pseudonymizer(<key>)"

    def __call__(self, user_id: str) -> str:
        mac = hmac.new(self._key, user_id.encode(), hashlib.sha256).hexdigest()
        return "u_" + mac[:16]


def pseudonym_key(settings: Settings) -> bytes:
    """The configured pseudonym key; in development, one generated beside the keyring.

    Production refuses to start without one (``SettingError``) instead of
    generating one: the key must be the operator's, to look pseudonyms up.
    """
    if settings.audit_pseudonym_key is not None:
        value = settings.audit_pseudonym_key.get_secret_value()
        if len(value) < 16:
            raise SettingError("CITADEL_AUDIT_PSEUDONYM_KEY", "must be at least 16 characters")
        return value.encode()
    if settings.env == "production":
        raise SettingError("CITADEL_AUDIT_PSEUDONYM_KEY", "is required in production")
    path = settings.dev_dir / "audit-pseudonym.key"
    create_once(path, lambda: secrets.token_hex(32).encode() + b"\n")
    try:
        return read_secret_file(path, "CITADEL_AUDIT_PSEUDONYM_KEY", settings.env).strip()
    except OSError:
        raise SettingError(
            "CITADEL_AUDIT_PSEUDONYM_KEY", f"is unset and {path} is unreadable"
        ) from None
