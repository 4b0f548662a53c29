"""Where HTTP/1.1 messages begin and end in a byte stream, for the protocol's own counting.

Pure functions over bytes, so the protocol's bookkeeping stays readable and
the rules can be tested without a connection.
"""

from __future__ import annotations

HEAD_END = b"\r\n\r\n"
# Hop-by-hop fields of an upgrade that Citadel ignores (RFC 9110 7.6.1, RFC 7540 3.2.1).
UPGRADE_FIELDS = frozenset({b"upgrade", b"http2-settings"})


def head_end(carry: bytes, data: bytes) -> int:
    """The index in ``data`` just past a head's blank line, or -1.

    ``carry`` is the last (up to three) bytes of the head read before
    ``data``, so a blank line split across reads is found too. llhttp takes no
    bare LF as a line end, so ``CRLF CRLF`` is the only end there is.
    """
    if carry:
        joined = (carry + data[:3]).find(HEAD_END)
        if joined >= 0:
            return joined + len(HEAD_END) - len(carry)
    found = data.find(HEAD_END)
    return found + len(HEAD_END) if found >= 0 else -1


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body length the parser framed the request with: None when chunked.

    The parser already refused a head whose framing is ambiguous (both fields,
    a repeated or malformed length), so this reads what it accepted.
    """
    length = 0
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            # Leading zeros are allowed, and past 4300 digits int() refuses a str.
            length = int(value.strip(b" \t").lstrip(b"0") or b"0")
    return length


def head_without_upgrade(
    method: bytes, url: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
) -> bytes:
    """A request head rebuilt without ``Upgrade`` and ``HTTP2-Settings`` (and their tokens).

    No larger than the head it comes from, and with the same framing fields,
    so the body that follows is framed as a proxy in front saw it.
    """
    lines = [method, b" ", url, b" HTTP/", version, b"\r\n"]
    for name, value in headers:
        if name in UPGRADE_FIELDS:
            continue
        if name == b"connection":
            tokens = [t.strip() for t in value.split(b",")]
            value = b", ".join(t for t in tokens if t and t.lower() not in UPGRADE_FIELDS)
            if not value:
                continue
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    return b"".join(lines)
