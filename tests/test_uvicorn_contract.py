"""What citadel/http/protocol.py relies on in uvicorn and httptools, beyond their public API.

``GuardedHttpToolsProtocol`` subclasses uvicorn's httptools protocol, a file
uvicorn changes often, and drives httptools itself. pyproject.toml pins the
versions it was tested with; when either is moved to a new one, these tests
say which name went away or changed meaning, before the edge tests fail in
less obvious ways.
"""

from __future__ import annotations

import inspect
import re
import textwrap

import httptools
import pytest
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

# Attributes of the protocol object that citadel/http/protocol.py reads or calls.
PROTOCOL_NAMES = [
    "_unset_keepalive_if_required",
    "_unsupported_upgrade_warning",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "on_response_complete",
    "send_400_response",
    "connection_made",
    "connection_lost",
    "timeout_keep_alive_handler",
    "_start_asgi_task",
]
# Set in HttpToolsProtocol.__init__ or connection_made and used by protocol.py.
PROTOCOL_STATE = [
    "self.cycle",
    "self.flow",
    "self.headers",
    "self.loop",
    "self.parser",
    "self.pipeline",
    "self.server_state",
    "self.transport",
    "self.url",
    "self.timeout_keep_alive",
    "self.expect_100_continue",
]
# Attributes of a request's cycle that protocol.py reads or sets.
CYCLE_STATE = [
    "self.transport",
    "self.scope",
    "self.disconnected",
    "self.message_event",
    "self.response_complete",
    "self.response_started",
    "self.more_body",
]


@pytest.mark.parametrize("name", PROTOCOL_NAMES)
def test_uvicorn_protocol_still_has_the_methods_citadel_overrides_or_calls(name: str) -> None:
    assert callable(getattr(HttpToolsProtocol, name, None)), (
        f"uvicorn's HttpToolsProtocol no longer has {name}: citadel/http/protocol.py must be "
        "reviewed against the new uvicorn before its pin is moved"
    )


@pytest.mark.parametrize("attribute", PROTOCOL_STATE)
def test_uvicorn_protocol_still_sets_the_state_citadel_reads(attribute: str) -> None:
    assert re.search(re.escape(attribute) + r"\s*[:=]", inspect.getsource(HttpToolsProtocol)), (
        f"uvicorn's HttpToolsProtocol no longer sets {attribute}"
    )


@pytest.mark.parametrize("attribute", CYCLE_STATE)
def test_uvicorn_cycle_still_has_the_state_citadel_reads(attribute: str) -> None:
    assert re.search(re.escape(attribute) + r"\s*[:=]", inspect.getsource(RequestResponseCycle)), (
        f"uvicorn's RequestResponseCycle no longer sets {attribute}"
    )


def test_uvicorn_cycle_closes_through_its_transport_attribute() -> None:
    # The lingering close replaces cycle.transport; uvicorn must close through it.
    assert "self.transport.close()" in inspect.getsource(RequestResponseCycle.send)


def test_uvicorn_on_body_drops_body_bytes_once_the_response_is_complete() -> None:
    # The drain after an early answer relies on it: the rest of the body is never buffered.
    assert "self.cycle.response_complete" in inspect.getsource(HttpToolsProtocol.on_body)


def test_flow_control_still_pauses_and_resumes_reading() -> None:
    assert callable(FlowControl.pause_reading) and callable(FlowControl.resume_reading)


def test_httptools_reports_where_an_upgrade_stopped_the_parser() -> None:
    class Callbacks:
        def __init__(self) -> None:
            self.completed = 0

        def on_message_complete(self) -> None:
            self.completed += 1

    callbacks = Callbacks()
    parser = httptools.HttpRequestParser(callbacks)
    parser.set_dangerous_leniencies(lenient_data_after_close=True)
    head = b"POST / HTTP/1.1\r\nHost: c\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
    head += b"Content-Length: 4\r\n\r\n"
    with pytest.raises(httptools.HttpParserUpgrade) as raised:
        parser.feed_data(head + b"body")
    # The body was skipped, and the offset says where the rest starts.
    assert (raised.value.args[0], callbacks.completed) == (len(head), 1)


def test_uvicorn_still_builds_a_fresh_parser_the_way_server_py_does() -> None:
    source = inspect.getsource(httptools_impl.HttpToolsProtocol.__init__)
    assert "httptools.HttpRequestParser(self)" in source
    assert "set_dangerous_leniencies(lenient_data_after_close=True)" in source


# uvicorn's methods whose bodies protocol.py carries inline rather than calling
# through super(): they run for every field or every answer, and the call cost a
# frame each; on_response_complete's keep-alive timer is a moved Deadline there.
# A change in uvicorn must be carried over to the copy.
INLINE_COPIES = {
    "on_url": "self.url += url",
    "on_header": """name = name.lower()
if name == b"expect" and value.lower() == b"100-continue":
    self.expect_100_continue = True
self.headers.append((name, value))""",
    "on_response_complete": """self.server_state.total_requests += 1
if self.transport.is_closing():
    return
self._unset_keepalive_if_required()
self.flow.resume_reading()
if self.pipeline:
    cycle, app = self.pipeline.pop()
    self._start_asgi_task(cycle, app)
else:
    self.timeout_keep_alive_task = self.loop.call_later(
        self.timeout_keep_alive, self.timeout_keep_alive_handler
    )""",
}


@pytest.mark.parametrize("name", sorted(INLINE_COPIES))
def test_uvicorn_methods_citadel_copies_inline_are_unchanged(name: str) -> None:
    source = textwrap.dedent(inspect.getsource(getattr(HttpToolsProtocol, name)))
    body = textwrap.dedent(
        "\n".join(
            line.rstrip()
            for line in source.splitlines()[1:]
            if line.strip() and not line.strip().startswith("#")
        )
    )
    assert body == INLINE_COPIES[name], (
        f"uvicorn's HttpToolsProtocol.{name} changed: citadel/http/protocol.py carries a copy "
        "of it inline, which must be brought in line before the pin is moved"
    )
