"""Where a client's address, key and TLS material come from: arguments, or the environment.

Both clients take ``verify=`` (a CA bundle path, ``True`` for the system's
store, or an :class:`ssl.SSLContext`) and ``cert=`` (a PEM file holding the
client certificate and its key, or a ``(certificate, key)`` pair of paths), as
httpx does; both build one :class:`ssl.SSLContext` here, because httpx 0.28
deprecates ``verify`` as a path and ``cert`` altogether, and because the bulk
tool's lean transport needs the same context.

``from_env()`` reads exactly the contract's variables (and no other)::

    CITADEL_URL                 Citadel's base URL (required)
    CITADEL_API_KEY             the caller's API key, or
    CITADEL_API_KEY_FILE        a file holding it (a Docker or Kubernetes secret)
    CITADEL_CA_FILE             CA bundle that signed Citadel's certificate
    CITADEL_CLIENT_CERT_FILE    client certificate for mutual TLS (PEM; may hold the key too)
    CITADEL_CLIENT_KEY_FILE     its private key, when not in the certificate file

An empty variable counts as unset. A problem raises :class:`ConfigError`,
whose message names the variable and never its value (an API key, or a path
that may tell an attacker where secrets live).
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx

__all__ = [
    "ENV_API_KEY",
    "ENV_API_KEY_FILE",
    "ENV_CA_FILE",
    "ENV_CLIENT_CERT_FILE",
    "ENV_CLIENT_KEY_FILE",
    "ENV_URL",
    "Cert",
    "ConfigError",
    "EnvSettings",
    "Verify",
    "check_base_url",
    "read_env",
    "ssl_context",
    "system_context",
]

ENV_URL: Final = "CITADEL_URL"
ENV_API_KEY: Final = "CITADEL_API_KEY"
ENV_API_KEY_FILE: Final = "CITADEL_API_KEY_FILE"
ENV_CA_FILE: Final = "CITADEL_CA_FILE"
ENV_CLIENT_CERT_FILE: Final = "CITADEL_CLIENT_CERT_FILE"
ENV_CLIENT_KEY_FILE: Final = "CITADEL_CLIENT_KEY_FILE"

Verify = bool | str | os.PathLike[str] | ssl.SSLContext
Cert = str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]]


class ConfigError(ValueError):
    """A client setting that cannot be used; the message names the setting, never its value."""


@dataclass(frozen=True)
class EnvSettings:
    """What ``from_env()`` found: the constructor's base_url, api_key, verify and cert."""

    base_url: str
    api_key: str
    verify: Verify
    cert: Cert | None

    def __repr__(self) -> str:
        return f"EnvSettings(base_url={self.base_url!r}, api_key=<hidden>)"


@functools.cache
def system_context() -> ssl.SSLContext:
    """The system's trust store, loaded once per process (about 20 ms) and shared.

    ``verify=True`` means this store (OpenSSL's default paths), as the contract
    says; httpx's own default would be certifi's bundle.
    """
    return ssl.create_default_context()


def ssl_context(verify: Verify = True, cert: Cert | None = None) -> ssl.SSLContext:
    """The TLS context of a client: whom to trust (``verify``) and what to present (``cert``).

    ``verify=False`` is refused: it would send the API key, and plaintexts, to
    whoever answers. For a private CA, pass its bundle.
    """
    if isinstance(verify, ssl.SSLContext):
        if cert is not None:
            _load_cert(verify, cert, "cert")
        return verify
    if verify is False:
        raise ConfigError(
            "verify=False is refused: it would send the API key to whoever answers; "
            "pass the CA bundle that signed Citadel's certificate instead"
        )
    if verify is True:
        context = ssl.create_default_context()  # a fresh one: the certificate is loaded into it
    else:
        try:
            context = ssl.create_default_context(cafile=os.fspath(verify))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"verify: the CA bundle cannot be used ({type(exc).__name__})"
            ) from None
    if cert is not None:
        _load_cert(context, cert, "cert")
    return context


def _load_cert(context: ssl.SSLContext, cert: Cert, name: str) -> None:
    certfile, keyfile = cert if isinstance(cert, tuple) else (cert, None)
    try:
        key = None if keyfile is None else os.fspath(keyfile)
        context.load_cert_chain(os.fspath(certfile), key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{name}: the client certificate or key cannot be used ({type(exc).__name__})"
        ) from None


def check_base_url(base_url: str | httpx.URL, name: str = "base_url") -> None:
    """Refuse what is not an absolute http(s) URL, before anything is sent to it."""
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError):
        raise ConfigError(f"{name} is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{name} must be an http:// or https:// URL")


def read_env(environ: Mapping[str, str] | None = None) -> EnvSettings:
    """The client settings of the environment (``os.environ`` by default); see the module doc."""
    env = os.environ if environ is None else environ

    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    url = get(ENV_URL)
    if url is None:
        raise ConfigError(f"{ENV_URL} is not set (Citadel's base URL, e.g. https://citadel:8004)")
    check_base_url(url, ENV_URL)

    key, key_file = get(ENV_API_KEY), get(ENV_API_KEY_FILE)
    if key is not None and key_file is not None:
        raise ConfigError(f"set {ENV_API_KEY} or {ENV_API_KEY_FILE}, not both")
    if key_file is not None:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{ENV_API_KEY_FILE} cannot be read ({type(exc).__name__})") from None
        if not key:
            raise ConfigError(f"{ENV_API_KEY_FILE} names an empty file")
    if key is None:
        raise ConfigError(f"neither {ENV_API_KEY} nor {ENV_API_KEY_FILE} is set")
    if not key.isascii() or not key.isprintable():
        source = ENV_API_KEY_FILE if key_file is not None else ENV_API_KEY
        raise ConfigError(f"{source}: the API key must be printable ASCII")

    ca, cert, cert_key = get(ENV_CA_FILE), get(ENV_CLIENT_CERT_FILE), get(ENV_CLIENT_KEY_FILE)
    if cert_key is not None and cert is None:
        raise ConfigError(f"{ENV_CLIENT_KEY_FILE} is set without {ENV_CLIENT_CERT_FILE}")
    pair: Cert | None = None
    if cert is not None:
        pair = cert if cert_key is None else (cert, cert_key)
    verify: Verify = ca if ca is not None else True
    # Load both now, so that a bad file names its variable rather than the argument.
    try:
        context = ssl_context(verify)
    except ConfigError:
        raise ConfigError(f"{ENV_CA_FILE}: the CA bundle cannot be used") from None
    if pair is not None:
        try:
            _load_cert(context, pair, ENV_CLIENT_CERT_FILE)
        except ConfigError:
            names = ENV_CLIENT_CERT_FILE + (f" or {ENV_CLIENT_KEY_FILE}" if cert_key else "")
            raise ConfigError(f"{names}: the client certificate or key cannot be used") from None
    return EnvSettings(base_url=url, api_key=key, verify=context, cert=None)
