"""Request ids: the one rule for taking the client's ``X-Request-ID`` or making one.

Both the protocol (for the answers it sends itself) and the pipeline (for
the operations' answers and audit lines) choose a request's id here, and
share the choice through the request's scope, so a request has one id
whoever answers it.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable
from typing import Any

# What a client may send as X-Request-ID (anything else is replaced, never refused).
VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
# The scope key under which the chosen id travels between the protocol and the pipeline.
SCOPE_KEY = "citadel.request_id"
_OWS = b" \t"

# Ids need to be unique, not secret: a random per-process prefix and a counter
# cost far less than a getrandom() call per request.
_PREFIX = os.urandom(8).hex().encode()
_counter = itertools.count(1)


def new_request_id() -> bytes:
    """A fresh id, unique within this process and, by its random prefix, across processes."""
    return b"%s%016x" % (_PREFIX, next(_counter))


def choose(sent: Iterable[bytes]) -> bytes:
    """The id of a request that sent the ``X-Request-ID`` values ``sent``.

    The client's own, when it sent exactly one valid one (surrounding
    whitespace ignored, RFC 9110); a fresh one otherwise.
    """
    values = sent if isinstance(sent, tuple) else tuple(sent)
    if len(values) == 1:
        value = values[0].strip(_OWS)
        if VALID_REQUEST_ID.match(value):
            return value
    return new_request_id()


def for_scope(scope: Any, sent: Iterable[bytes] | None = None) -> bytes:
    """The id of the request in ``scope``: the one already chosen, else chosen now and kept.

    Whoever answers first (the pipeline, or the protocol refusing a body
    before the pipeline ran) chooses; the other finds the choice in the scope.
    ``sent`` is the request's ``X-Request-ID`` values when the caller has read
    them already; otherwise they are read from the scope's headers.
    """
    chosen = scope.get(SCOPE_KEY)
    if isinstance(chosen, bytes):
        return chosen
    if sent is None:
        sent = (value for name, value in scope["headers"] if name == b"x-request-id")
    chosen = choose(sent)
    scope[SCOPE_KEY] = chosen
    return chosen
