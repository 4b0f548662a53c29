"""Fingerprints of ciphertexts and messages, as the audit log records them (``ct_fp``, ``msg_fp``).

Defined here, in the client distribution, so that a caller (the bulk rewrap
tool's rejects file, say) computes the very value the server's audit events
hold, and a record leads to its event without the server installed.
"""

from __future__ import annotations

import hashlib

__all__ = ["fingerprint"]


def fingerprint(data: str | bytes) -> str:
    """``ct_fp`` and ``msg_fp``: the first 16 hex digits of the SHA-256 of ``data``.

    A ``str`` (a ciphertext) is hashed as UTF-8, lone surrogates passed through,
    since a JSON string may hold one.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()[:16]
