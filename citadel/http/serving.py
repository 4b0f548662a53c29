"""The uvicorn settings every Citadel server runs with: ``citadel serve`` and the tests alike.

uvicorn's own ``X-Forwarded-For`` handling is off: it trusts 127.0.0.1 by
default, so a sidecar passing the header through would let any client pick
its address. Citadel reads the header itself, from ``CITADEL_TRUSTED_PROXIES``
only (:mod:`citadel.http.addresses`).
"""

from __future__ import annotations

from typing import Any

from citadel.http.protocol import GuardedHttpToolsProtocol


def uvicorn_options() -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` or ``uvicorn.Config``, host and port aside.

    The protocol is named by its class, importable by every worker process;
    it takes its header deadline from the app it serves.
    """
    return {
        "http": GuardedHttpToolsProtocol,
        # Citadel serves no websockets: with a websocket protocol, uvicorn hands
        # it any request asking for one, outside every deadline of the protocol.
        "ws": "none",
        "proxy_headers": False,
        "server_header": False,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
