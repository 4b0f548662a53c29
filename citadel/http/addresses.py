"""The client address a request is counted for: the peer, or a trusted proxy's word for it."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from citadel.config import Network


class ClientAddresses:
    """Reads ``X-Forwarded-For`` only from ``CITADEL_TRUSTED_PROXIES``.

    And only up to the first hop that is not itself a trusted proxy, read from
    the right: anything further left was written by the client, who would
    otherwise pick the address its failed authentications are counted for.
    """

    def __init__(self, trusted_proxies: Sequence[Network] = ()) -> None:
        self.trusted_proxies = tuple(trusted_proxies)

    def of(self, peer: str, forwarded: bytes | None) -> str:
        """The address of the client behind ``peer``, given the request's ``X-Forwarded-For``."""
        if forwarded is None or not self.trusted_proxies or not self._trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop if _is_address(hop) else peer
        return peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
