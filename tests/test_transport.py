"""citadel_client.transport: the lean kept-alive transport the bulk tool's lanes use."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
from support import KEYS, Served

from citadel_client import AsyncCitadelClient, InvalidCiphertext
from citadel_client.transport import AsyncKeepAliveTransport


def client(url: str, caller: str, transport: AsyncKeepAliveTransport) -> AsyncCitadelClient:
    return AsyncCitadelClient(url, KEYS[caller], transport=transport, deadline=10)


@pytest.mark.anyio
async def test_round_trip_through_the_keep_alive_transport(citadel: Served) -> None:
    async with (
        client(citadel.url, "sentinel", AsyncKeepAliveTransport()) as s,
        client(citadel.url, "conductor", AsyncKeepAliveTransport()) as c,
    ):
        ct = await s.encrypt("exchange-secret")
        with await c.decrypt(ct) as plain:
            assert plain.reveal() == "exchange-secret"


@pytest.mark.anyio
async def test_error_answers_become_the_contract_errors(citadel: Served) -> None:
    async with client(citadel.url, "conductor", AsyncKeepAliveTransport()) as c:
        with pytest.raises(InvalidCiphertext):
            await c.decrypt("cit1:00000000:AAAA")


@pytest.mark.anyio
async def test_one_connection_serves_every_call(citadel: Served) -> None:
    transport = AsyncKeepAliveTransport()
    async with client(citadel.url, "sentinel", transport) as s:
        await s.encrypt("a")
        first = transport._stream
        for _ in range(20):
            await s.encrypt("a")
        assert transport._stream is first


class OneShotServer:
    """Answers each connection's first request, then closes it (like an idle timeout)."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.sendall(self.answer)


@pytest.fixture
def closing_server() -> Iterator[OneShotServer]:
    body = b'{"encrypted_data":"cit1:00000000:x"}'
    server = OneShotServer(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    yield server
    server.sock.close()


@pytest.mark.anyio
async def test_a_connection_the_server_closed_is_replaced_before_sending(
    closing_server: OneShotServer,
) -> None:
    transport = AsyncKeepAliveTransport()
    # A deadline too short for a retry: each call must succeed on its first attempt.
    async with AsyncCitadelClient(
        closing_server.url, "k" * 20, transport=transport, deadline=0.5
    ) as c:
        for _ in range(3):
            assert await c.rewrap("cit1:00000000:y") == "cit1:00000000:x"
            await asyncio.sleep(0)  # let the loop see the server's FIN (no timing involved)
            for _ in range(100):
                if transport._stream is None or transport._stale():
                    break
                await asyncio.sleep(0.01)
    assert closing_server.connections == 3


@pytest.mark.anyio
async def test_a_chunked_answer_is_read_whole() -> None:
    server = OneShotServer(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\n\r\n"
    )
    try:
        transport = AsyncKeepAliveTransport()
        request = httpx.Request("POST", server.url + "/rewrap", content=b"{}")
        response = await transport.handle_async_request(request)
        assert (response.status_code, response.content) == (200, b"abcdefg")
        await transport.aclose()
    finally:
        server.sock.close()


@pytest.mark.anyio
async def test_an_answer_of_unknown_framing_is_a_protocol_error() -> None:
    server = OneShotServer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n")
    try:
        transport = AsyncKeepAliveTransport()
        request = httpx.Request("POST", server.url + "/rewrap", content=b"{}")
        with pytest.raises(httpx.RemoteProtocolError):
            await transport.handle_async_request(request)
    finally:
        server.sock.close()


@pytest.mark.anyio
async def test_a_closed_port_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transport = AsyncKeepAliveTransport()
    with pytest.raises(httpx.ConnectError):
        await transport.handle_async_request(
            httpx.Request("POST", f"http://127.0.0.1:{port}/rewrap", content=b"{}")
        )


@pytest.mark.anyio
async def test_the_client_never_replays_a_cookie_set_by_an_answer() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(
            200,
            json={"encrypted_data": "cit1:00000000:x"},
            headers={"set-cookie": "session=CANARY-COOKIE; Path=/"},
        )

    async with AsyncCitadelClient(
        "http://citadel.test", "k" * 20, transport=httpx.MockTransport(answer)
    ) as c:
        await c.rewrap("cit1:00000000:a")
        await c.rewrap("cit1:00000000:b")
    assert [r.headers.get("cookie") for r in sent] == [None, None]
