"""``NotCovered``: what the adapter raises instead of signing any way but through Citadel."""

from __future__ import annotations

from citadel_client.errors import CitadelError


class NotCovered(CitadelError):
    """ccxt would sign this request in a way ``/sign`` cannot do; nothing was sent.

    Raised before the request leaves the process: the adapter never signs
    with anything but Citadel, and never sends a request ccxt would have
    signed differently.
    """

    code = "not_covered"
    status = 0
    default_detail = "This request is signed in a way Citadel's /sign does not cover."
