"""Checks of the settings' values, for :mod:`citadel.config`'s validators.

Each check raises ``ValueError`` with a message that names what is wrong and
never repeats the value, because the message becomes the one line that
start-up prints (see :func:`citadel.config.describe_settings_error`). They
run before any library sees a value: a library's own error could quote it (a
Redis URI's password, a key).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from limits import parse as parse_limit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A URI SAN (a SPIFFE ID, say) has a scheme; a DNS SAN is a host name.
_URI_IDENTITY = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_DNS_IDENTITY = re.compile(
    r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)


def check_http_url(value: str) -> str:
    """An http(s) URL with a host, ending in a slash (the Evervault SDK appends paths)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ValueError("must be an http(s) URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL")
    return value if value.endswith("/") else value + "/"


def check_limit(value: str) -> str:
    """A rate limit in the ``limits`` notation (``100/minute``)."""
    try:
        parse_limit(value)
    except ValueError:
        raise ValueError("must be a rate limit such as 100/minute") from None
    return value


def check_storage_uri(value: str) -> str:
    """``memory://`` or a ``redis://host:port/db`` URI (``rediss://``, ``redis+unix://``)."""
    bad = ValueError("must be memory:// or a redis://host:port/db URI")
    if value == "memory://":
        return value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise bad from None
    if parts.scheme == "redis+unix":
        if not parts.path:
            raise bad
        return value
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise bad
    if port is None and parts.netloc.endswith(":"):
        raise bad
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise bad
    return value


def check_api_keys_shape(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` maps caller names to lists of key strings."""
    if not isinstance(value, dict) or not value:
        raise ValueError("must be a JSON object of caller name to a list of keys")
    for caller, keys in value.items():
        if not isinstance(caller, str) or not caller:
            raise ValueError("has an empty caller name")
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("must map each caller to a list of non-empty key strings")


def check_caller_identities(value: dict[str, str]) -> dict[str, str]:
    """Caller name → the URI SAN (``spiffe://…``) or DNS SAN its client certificate carries.

    Two callers may not share an identity: a certificate must name one caller.
    """
    if not value:
        raise ValueError("must be a JSON object of caller name to a certificate identity")
    seen: set[str] = set()
    for caller, identity in value.items():
        if not caller:
            raise ValueError("has an empty caller name")
        if not (_URI_IDENTITY.match(identity) or _DNS_IDENTITY.match(identity)):
            raise ValueError(
                f"gives caller {caller!r} an identity that is neither a URI (such as "
                "spiffe://trust-domain/path) nor a DNS name"
            )
        key = canonical_identity(identity)
        if key in seen:
            raise ValueError("gives one identity to two callers")
        seen.add(key)
    return value


def canonical_identity(identity: str) -> str:
    """How identities compare: URIs exactly, DNS names without case (RFC 4343).

    A DNS name never holds a colon and a URI always does.
    """
    return identity if ":" in identity else identity.lower()


def networks(value: str) -> tuple[Network, ...]:
    """Comma-separated addresses or CIDRs, as networks."""
    try:
        return tuple(
            ipaddress.ip_network(part.strip(), strict=False)
            for part in value.split(",")
            if part.strip()
        )
    except ValueError:
        raise ValueError("must be comma-separated IP addresses or CIDRs") from None
