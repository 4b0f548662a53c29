"""``python -m citadel.healthcheck [PORT [PATH]]``: the container's probe of its own ``/health``.

Exit 0 when ``/health`` (or ``PATH``, such as ``/ready``) on 127.0.0.1
answers 200, else 1. It speaks what the
listener speaks: HTTPS when ``CITADEL_TLS_CERT_FILE`` is set, presenting the
client certificate of ``CITADEL_CLIENT_CERT_FILE`` and ``CITADEL_CLIENT_KEY_FILE``
when given (the clients' variables; needed under mutual TLS). The server's
certificate is checked against ``CITADEL_CA_FILE`` when given, without its
name (it names the service, not 127.0.0.1); without it, not at all: the probe
talks to its own process over loopback and sends nothing secret.

Docker's ``HEALTHCHECK``, the compose files and a Kubernetes exec probe under
mutual TLS (where the kubelet's HTTPS probe has no client certificate) run it.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def probe(
    port: int = 8004,
    environ: dict[str, str] | None = None,
    timeout_s: float = 2,
    path: str = "/health",
) -> bool:
    """Whether this instance's ``path`` answers 200."""
    env = os.environ if environ is None else environ
    try:
        context = _context(env)
        scheme = "http" if context is None else "https"
        with urllib.request.urlopen(  # noqa: S310 - http(s) to loopback only
            f"{scheme}://127.0.0.1:{port}{path}", timeout=timeout_s, context=context
        ) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):  # ssl.SSLError is an OSError
        return False


def _context(env: dict[str, str] | os._Environ[str]) -> ssl.SSLContext | None:
    if not env.get("CITADEL_TLS_CERT_FILE"):
        return None
    ca = env.get("CITADEL_CA_FILE") or None
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    if ca is None:
        context.verify_mode = ssl.CERT_NONE
    cert = env.get("CITADEL_CLIENT_CERT_FILE")
    if cert:
        context.load_cert_chain(cert, env.get("CITADEL_CLIENT_KEY_FILE") or None)
    return context


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 healthy, 1 not (Docker's and Kubernetes' convention)."""
    args = sys.argv[1:] if argv is None else argv
    port = int(args[0]) if args else 8004
    path = args[1] if len(args) > 1 and args[1].startswith("/") else "/health"
    return 0 if probe(port, path=path) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
