"""Encryption context: the pairs a ciphertext is bound to, in one canonical byte form.

A context is checked by the request models (1 to 16 pairs, keys of 1 to 64
of ``A-Za-z0-9_.-``, values of 1 to 256 UTF-8 bytes). Providers bind a
ciphertext to :func:`canonical` of it, so the order of keys in a request
never matters, and no two different contexts have the same bytes: each key
and value is length-prefixed. Values are secrets as far as logging goes:
only :func:`keys` of a context ever reaches an audit line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping

Context = Mapping[str, str]


def canonical(context: Context) -> bytes:
    """The context as bytes: sorted by key, each key and value length-prefixed (1 and 2 bytes)."""
    parts = [b"citadel-context-v1"]
    for key in sorted(context):
        name, value = key.encode(), context[key].encode()
        parts += [len(name).to_bytes(1, "big"), name, len(value).to_bytes(2, "big"), value]
    return b"".join(parts)


def digest(context: Context) -> bytes:
    """SHA-256 of :func:`canonical`: what a construction without associated data binds to."""
    return hashlib.sha256(canonical(context)).digest()


def keys(context: Context | None) -> list[str] | None:
    """The sorted key names, for audit lines; never the values."""
    return sorted(context) if context else None


# The inner form of a context-bound plaintext for a provider without associated
# data (Evervault): this prefix, the context's digest, then the plaintext.
# Plaintexts that begin with the prefix are refused at /encrypt (on every
# provider, so a later migration never meets one it cannot represent).
RESERVED_PREFIX = "\x00citadel-context-v1:"
_DIGEST_CHARS = 43  # base64url of 32 bytes, unpadded


def bind(plaintext: str, context: Context | None) -> str:
    """The plaintext to encrypt: unchanged without a context, else prefixed with its digest."""
    if not context:
        return plaintext
    return f"{RESERVED_PREFIX}{_b64(digest(context))}:{plaintext}"


def unbind(plain: str, context: Context | None) -> str | None:
    """The plaintext inside ``plain`` if it was bound to exactly ``context``; else None."""
    if not plain.startswith(RESERVED_PREFIX):
        return None if context else plain
    if not context:
        return None
    start = len(RESERVED_PREFIX)
    sent = plain[start : start + _DIGEST_CHARS]
    if plain[start + _DIGEST_CHARS : start + _DIGEST_CHARS + 1] != ":":
        return None
    if not hmac.compare_digest(sent, _b64(digest(context))):
        return None
    return plain[start + _DIGEST_CHARS + 1 :]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
