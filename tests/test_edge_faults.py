"""Issue 15, the edge faults of 2.1.0, through real HTTP on raw sockets.

Upgrade requests (finding 2 and 5), heads counted when they arrive in the
same read as the end of the request before them (4), framing the parser
refuses (7), request ids on every answer (8) and the lingering close after an
early answer (3; behind a real nginx in tests/test_behind_nginx.py). Waits are
bounded by socket timeouts; results are codes, counts and orders.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import KEYS, Served, make_settings, serve_citadel
from test_hardening import (
    ENCRYPT_BODY,
    address,
    assert_contract_error,
    codes,
    exchange,
    parse,
    raw_request,
    read_until_closed,
)

ACL = {"sentinel": ["encrypt"], "conductor": ["decrypt", "sign", "rewrap"]}
WEBSOCKET = [
    b"Connection: Upgrade",
    b"Upgrade: websocket",
    b"Sec-WebSocket-Version: 13",
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    settings = make_settings(
        tmp_path,
        acl=ACL,
        read_timeout_s=1,
        rate_limit_per_caller="100000/minute",
        rate_limit_per_user="100000/minute",
        rate_limit_auth_failures="100000/minute",
    )
    with serve_citadel(settings) as s:
        yield s


def responses(raw: bytes) -> list[tuple[int, dict[str, list[str]], bytes]]:
    """Every response in ``raw``, in order (each has a Content-Length)."""
    out = []
    while raw:
        status, fields, body = parse(raw)
        out.append((status, fields, body))
        head_end = raw.index(b"\r\n\r\n") + 4
        raw = raw[head_end + int(fields["content-length"][0]) :]
    return out


def without_close(request: bytes) -> bytes:
    return request.replace(b"Connection: close\r\n", b"")


# -- finding 2: Upgrade requests are HTTP requests, answered within the deadlines -------------


def test_a_post_asking_for_a_websocket_is_served_as_http_with_its_body(served: Served) -> None:
    raw = exchange(served, raw_request(b"POST", b"/encrypt", ENCRYPT_BODY, *WEBSOCKET[:2]))
    status, _, body = parse(raw)
    assert status == 200
    assert json.loads(body)["encrypted_data"].startswith("cit1:")
    assert codes(served) == ["ok"]


def test_an_upgrade_request_whose_body_never_comes_is_answered_within_the_deadline(
    served: Served,
) -> None:
    head = raw_request(b"POST", b"/encrypt", b"", *WEBSOCKET[:2], length=False)
    head = head.replace(b"Connection: close\r\n", b"Content-Length: 100\r\n")
    # read_timeout_s is 1: the answer must come long before the socket's 8 s.
    raw = exchange(served, head, timeout=8)
    assert_contract_error(raw, 408, "request_timeout")
    assert codes(served) == ["request_timeout"]


def test_an_upgrade_request_with_a_chunked_body_is_served(served: Served) -> None:
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(ENCRYPT_BODY), ENCRYPT_BODY)
    request = raw_request(
        b"POST", b"/encrypt", body, b"Transfer-Encoding: chunked", *WEBSOCKET[:2], length=False
    )
    assert parse(exchange(served, request))[0] == 200


def test_a_request_after_an_upgrade_request_on_the_same_connection_is_served(
    served: Served,
) -> None:
    first = without_close(raw_request(b"POST", b"/encrypt", ENCRYPT_BODY, *WEBSOCKET[:2]))
    second = raw_request(b"POST", b"/encrypt", ENCRYPT_BODY)
    got = responses(exchange(served, first + second))
    assert [status for status, _, _ in got] == [200, 200]
    assert codes(served) == ["ok", "ok"]


def test_connect_is_refused_in_json_and_the_connection_closed(served: Served) -> None:
    raw = exchange(served, b"CONNECT citadel:443 HTTP/1.1\r\nHost: citadel:443\r\n\r\n")
    assert_contract_error(raw, 400, "bad_request")


# -- finding 5: a websocket handshake gets JSON with a code, and is audited -------------------


def test_a_websocket_handshake_to_an_operation_without_a_key_is_401_json_and_audited(
    served: Served,
) -> None:
    raw = exchange(served, raw_request(b"GET", b"/encrypt", b"", *WEBSOCKET, key=None))
    assert_contract_error(raw, 401, "unauthenticated")
    assert codes(served) == ["unauthenticated"]


def test_a_websocket_handshake_to_an_operation_with_a_key_is_405_json_and_audited(
    served: Served,
) -> None:
    raw = exchange(served, raw_request(b"GET", b"/encrypt", b"", *WEBSOCKET))
    assert_contract_error(raw, 405, "method_not_allowed")
    assert codes(served) == ["method_not_allowed"]


def test_a_websocket_handshake_to_health_is_an_ordinary_get(served: Served) -> None:
    status, fields, body = parse(exchange(served, raw_request(b"GET", b"/health", b"", *WEBSOCKET)))
    assert status == 200
    assert json.loads(body)["service"] == "citadel"
    assert fields["x-request-id"]


# -- finding 4: every head counted from its first byte, whatever read it arrives in -----------


def test_trailers_in_the_same_read_as_the_head_count_against_64_kib(served: Served) -> None:
    body = b"%x\r\n%s\r\n0\r\n" % (len(ENCRYPT_BODY), ENCRYPT_BODY)
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 1000) for i in range(200))
    request = raw_request(
        b"POST", b"/encrypt", body + trailers + b"\r\n", b"Transfer-Encoding: chunked", length=False
    )
    assert_contract_error(exchange(served, request), 431, "headers_too_large")


def test_a_pipelined_head_over_64_kib_in_the_same_read_as_the_first_request_is_431(
    served: Served,
) -> None:
    first = without_close(raw_request(b"POST", b"/encrypt", ENCRYPT_BODY))
    second = raw_request(b"POST", b"/encrypt", ENCRYPT_BODY, b"X-Big: " + b"b" * 80_000)
    got = responses(exchange(served, first + second))
    assert [status for status, _, _ in got] == [200, 431]


def test_a_pipelined_head_over_64_kib_after_a_chunked_body_in_the_same_read_is_431(
    served: Served,
) -> None:
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(ENCRYPT_BODY), ENCRYPT_BODY)
    first = without_close(
        raw_request(b"POST", b"/encrypt", body, b"Transfer-Encoding: chunked", length=False)
    )
    second = raw_request(b"POST", b"/encrypt", ENCRYPT_BODY, b"X-Big: " + b"b" * 80_000)
    got = responses(exchange(served, first + second))
    assert [status for status, _, _ in got] == [200, 431]


def test_fifty_pipelined_requests_in_one_read_are_all_served(served: Served) -> None:
    one = without_close(raw_request(b"POST", b"/encrypt", ENCRYPT_BODY))
    last = raw_request(b"POST", b"/encrypt", ENCRYPT_BODY)
    got = responses(exchange(served, one * 49 + last))
    assert [status for status, _, _ in got] == [200] * 50


def test_pipelined_heads_of_40_kib_each_in_one_read_are_all_served(served: Served) -> None:
    big = b"X-Pad: " + b"p" * 40_000
    one = without_close(raw_request(b"POST", b"/encrypt", ENCRYPT_BODY, big))
    last = raw_request(b"POST", b"/encrypt", ENCRYPT_BODY, big)
    got = responses(exchange(served, one * 3 + last))
    assert [status for status, _, _ in got] == [200] * 4


def test_a_head_whose_blank_line_is_split_across_reads_is_served(served: Served) -> None:
    request = raw_request(b"POST", b"/encrypt", ENCRYPT_BODY)
    split = request.index(b"\r\n\r\n") + 2
    with socket.create_connection(address(served), timeout=5) as s:
        s.sendall(request[:split])
        s.sendall(request[split : split + 1])
        s.sendall(request[split + 1 :])
        assert parse(read_until_closed(s))[0] == 200


# -- finding 7: framing the parser cannot trust is 400 bad_request, never served --------------


@pytest.mark.parametrize(
    "framing",
    [
        [b"Content-Length: +17"],
        [b"Content-Length: 17", b"Content-Length: 17"],
        [b"Content-Length: 17;"],
        [b"Content-Length: 17, 17"],
        [b"Content-Length: 0x11"],
        [b"Content-Length: 17", b"Transfer-Encoding: chunked"],
    ],
    ids=["plus", "repeated", "semicolon", "list", "hex", "with-chunked"],
)
def test_ambiguous_framing_is_400_bad_request_in_json_and_reaches_no_operation(
    served: Served, framing: list[bytes]
) -> None:
    raw = exchange(served, raw_request(b"POST", b"/encrypt", ENCRYPT_BODY, *framing, length=False))
    assert_contract_error(raw, 400, "bad_request")
    assert parse(raw)[1]["x-request-id"]
    assert codes(served) == []


# -- finding 8: every answer carries an X-Request-ID ------------------------------------------


def test_a_parser_400_carries_a_request_id(served: Served) -> None:
    _, fields, _ = parse(exchange(served, b"NOT HTTP AT ALL\r\n\r\n"))
    assert len(fields["x-request-id"]) == 1


def test_a_431_head_carries_a_request_id(served: Served) -> None:
    raw = exchange(
        served, raw_request(b"POST", b"/encrypt", ENCRYPT_BODY, b"X-B: " + b"b" * 70_000)
    )
    assert_contract_error(raw, 431, "headers_too_large")
    assert parse(raw)[1]["x-request-id"]


def test_a_408_head_carries_a_request_id(served: Served) -> None:
    raw = exchange(served, b"POST /encrypt HTTP/1.1\r\nHost: c\r\n", timeout=8)
    assert_contract_error(raw, 408, "request_timeout")
    assert parse(raw)[1]["x-request-id"]


def test_a_431_on_trailers_carries_the_id_the_request_sent_and_its_audit_line_has(
    served: Served,
) -> None:
    body = b"%x\r\n%s\r\n0\r\n" % (len(ENCRYPT_BODY), ENCRYPT_BODY)
    trailers = b"X-T: " + b"t" * 70_000 + b"\r\n\r\n"
    request = raw_request(
        b"POST",
        b"/encrypt",
        body + trailers,
        b"Transfer-Encoding: chunked",
        b"X-Request-ID: trace-431",
        length=False,
    )
    raw = exchange(served, request)
    assert_contract_error(raw, 431, "headers_too_large")
    assert parse(raw)[1]["x-request-id"] == ["trace-431"]
    assert [e["request_id"] for e in served.audit.events()] == ["trace-431"]


def test_a_repeated_user_id_keeps_the_valid_request_id(served: Served) -> None:
    request = raw_request(
        b"POST",
        b"/encrypt",
        ENCRYPT_BODY,
        b"X-User-ID: a",
        b"X-User-ID: b",
        b"X-Request-ID: trace-1",
    )
    raw = exchange(served, request)
    assert_contract_error(raw, 422, "invalid_request")
    assert parse(raw)[1]["x-request-id"] == ["trace-1"]


# -- finding 3: an early answer is followed by a drain of the body, not a reset ---------------


def early_answer_then_body(served: Served, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request``'s head, read the early answer, then send its body; what follows it."""
    head_end = request.index(b"\r\n\r\n") + 4
    with socket.create_connection(address(served), timeout=5) as s:
        s.sendall(request[:head_end])
        answer = b""
        while b"}" not in answer:
            chunk = s.recv(65536)
            assert chunk, "closed before the answer"
            answer += chunk
        s.sendall(request[head_end:])  # a reset connection would raise here or below
        rest = read_until_closed_strict(s)
    return answer, rest


def sign_request(key: bytes) -> bytes:
    """A /sign request with a 120 KB body (within the limit)."""
    body = json.dumps(
        {"encrypted_data": "cit1:x:y", "algorithm": "hmac-sha256", "message": "m" * 120_000}
    ).encode()
    return raw_request(b"POST", b"/sign", body, key=key)


def read_until_closed_strict(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):  # ConnectionResetError fails the test
        out += chunk
    return out


def test_an_early_401_drains_the_body_then_closes_without_a_reset(served: Served) -> None:
    answer, rest = early_answer_then_body(served, sign_request(b"wrong-key"))
    assert_contract_error(answer, 401, "unauthenticated")
    assert rest == b""


def test_an_early_403_drains_the_body_then_closes_without_a_reset(served: Served) -> None:
    answer, rest = early_answer_then_body(served, sign_request(KEYS["sentinel"].encode()))
    assert_contract_error(answer, 403, "forbidden")
    assert rest == b""


def test_a_drained_body_is_never_served_as_a_request(served: Served) -> None:
    smuggled = raw_request(b"POST", b"/encrypt", ENCRYPT_BODY)
    request = raw_request(b"POST", b"/encrypt", smuggled, key=b"wrong-key")
    raw = exchange(served, request)
    assert [status for status, _, _ in responses(raw)] == [401]
    assert codes(served) == ["unauthenticated"]


def test_an_early_answer_off_the_operations_says_close_and_drains_the_body(
    served: Served,
) -> None:
    request = raw_request(b"POST", b"/health", b"x" * 120_000)
    answer, rest = early_answer_then_body(served, request)
    status, fields, _ = parse(answer)
    assert (status, fields["connection"], rest) == (405, ["close"], b"")


def test_heads_of_40_kib_pipelined_after_a_chunked_body_in_one_read_are_served(
    served: Served,
) -> None:
    # Found by tests/test_protocol_properties.py: the rest of the read after a
    # chunked body was charged to the next head whole, and refused it.
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(ENCRYPT_BODY), ENCRYPT_BODY)
    first = without_close(
        raw_request(b"POST", b"/encrypt", body, b"Transfer-Encoding: chunked", length=False)
    )
    big = b"X-Pad: " + b"p" * 40_000
    middle = without_close(raw_request(b"POST", b"/encrypt", ENCRYPT_BODY, big))
    last = raw_request(b"POST", b"/encrypt", ENCRYPT_BODY, big)
    got = responses(exchange(served, first + middle + last))
    assert [status for status, _, _ in got] == [200, 200, 200]
