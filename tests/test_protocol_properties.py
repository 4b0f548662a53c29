"""Properties of the guarded HTTP protocol over every way a byte stream can arrive.

The protocol (citadel/http/protocol.py) cuts the stream at heads and bodies itself,
so what it answers must not depend on how the kernel happened to split the
bytes into reads. A real socket cannot be made to deliver chosen reads, so the
protocol is driven here directly, with the reads hypothesis picks, on a
transport that records what is written and honours uvicorn's pauses, in front
of a small ASGI app that reads each body and answers its length and digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from typing import Any

import uvicorn
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from uvicorn.server import ServerState

from citadel.http.protocol import MAX_HEADER_BYTES, GuardedHttpToolsProtocol

PROPERTIES = hypothesis_settings(
    max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


async def echo_app(scope: Any, receive: Any, send: Any) -> None:
    """Reads the whole body; answers its length and SHA-256, and the path."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    answer = json.dumps(
        {"path": scope["path"], "n": len(body), "sha": hashlib.sha256(body).hexdigest()[:16]}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: Any) -> None:
        if not self.closed:
            self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def drive(reads: list[bytes]) -> bytes:
    """Everything the protocol writes for ``reads``, fed as separate reads, pauses honoured."""

    async def run() -> bytes:
        config = uvicorn.Config(echo_app, lifespan="off", log_config=None, ws="none")
        config.load()
        protocol = GuardedHttpToolsProtocol(
            config=config,
            server_state=ServerState(),
            app_state={},
            _loop=asyncio.get_running_loop(),
        )
        transport = Transport()
        protocol.connection_made(transport)
        for data in reads:
            for _ in range(1000):
                if not transport.paused or transport.closed:
                    break
                await asyncio.sleep(0)
            if transport.closed:
                break
            protocol.data_received(data)
            await asyncio.sleep(0)
        for _ in range(1000):  # let every started request finish
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return bytes(transport.out)

    return asyncio.run(run())


def answers(out: bytes) -> list[str]:
    """Each response's status and body, in order, with the date and request ids dropped."""
    found = []
    for match in re.finditer(rb"HTTP/1.1 (\d{3})[^\r]*\r\n(.*?)\r\n\r\n", out, re.S):
        length = re.search(rb"content-length: (\d+)", match.group(2), re.I)
        size = int(length.group(1)) if length else 0
        body = out[match.end() : match.end() + size]
        found.append(f"{match.group(1).decode()} {body.decode()}")
    return found


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """``data`` cut into reads at up to 12 places hypothesis chooses."""
    cuts = st.lists(st.integers(min_value=1, max_value=max(1, len(data) - 1)), max_size=12)
    return cuts.map(
        lambda points: [
            data[a:b]
            for a, b in zip(
                [0, *sorted(set(points))], [*sorted(set(points)), len(data)], strict=True
            )
            if data[a:b]
        ]
    )


def post(path: bytes, body: bytes, *fields: bytes) -> bytes:
    head = [b"POST " + path + b" HTTP/1.1", b"Host: c", b"Content-Length: %d" % len(body), *fields]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chunked(path: bytes, body: bytes, trailers: bytes = b"") -> bytes:
    head = b"POST " + path + b" HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:]) if part)
    return head + chunks + b"0\r\n" + trailers + b"\r\n"


REQUESTS = {
    "get": b"GET /a HTTP/1.1\r\nHost: c\r\n\r\n",
    "post": post(b"/b", b'{"plaintext":"x"}'),
    "post-crlf-body": post(b"/c", b"\r\n\r\n\r\n\r\n"),
    "chunked": chunked(b"/d", b"hello chunked world"),
    "chunked-trailer": chunked(b"/e", b"with a trailer", b"X-Trailer: t\r\n"),
    "websocket": post(b"/f", b"body", b"Connection: Upgrade", b"Upgrade: websocket"),
    "h2c": post(b"/g", b"h2c body", b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c"),
    "big-head": post(b"/h", b"x", b"X-Pad: " + b"p" * 40_000),
}
valid_streams = st.lists(st.sampled_from(sorted(REQUESTS)), min_size=1, max_size=6)


@PROPERTIES
@given(st.data(), valid_streams)
def test_pipelined_valid_requests_get_the_same_answers_however_they_are_split(
    data: st.DataObject, names: list[str]
) -> None:
    stream = b"".join(REQUESTS[name] for name in names)
    whole = answers(drive([stream]))
    assert len(whole) == len(names)
    assert all(a.startswith("200 ") for a in whole)
    assert answers(drive(data.draw(splits(stream)))) == whole


@PROPERTIES
@given(st.data(), valid_streams, st.integers(min_value=1, max_value=120_000))
def test_a_head_over_64_kib_anywhere_in_a_stream_is_431_however_it_is_split(
    data: st.DataObject, names: list[str], extra: int
) -> None:
    oversized = post(b"/big", b"x", b"X-Big: " + b"b" * (MAX_HEADER_BYTES + extra))
    position = data.draw(st.integers(min_value=0, max_value=len(names)))
    before = [REQUESTS[name] for name in names[:position]]
    stream = b"".join([*before, oversized, *(REQUESTS[n] for n in names[position:])])
    got = answers(drive(data.draw(splits(stream))))
    assert [a[:3] for a in got] == ["200"] * len(before) + ["431"]


@PROPERTIES
@given(st.data(), st.integers(min_value=1, max_value=120_000))
def test_trailers_over_64_kib_are_431_however_they_are_split(
    data: st.DataObject, extra: int
) -> None:
    trailers = b"X-T: " + b"t" * (MAX_HEADER_BYTES + extra) + b"\r\n"
    stream = REQUESTS["post"] + chunked(b"/t", b"body", trailers)
    got = answers(drive(data.draw(splits(stream))))
    assert [a[:3] for a in got] == ["200", "431"]
