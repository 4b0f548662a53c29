"""TLS on Citadel's own listener, through real TLS connections on loopback (issue 20).

Certificates are made by the tests (:mod:`tls_support`); servers run in this
process with the options ``citadel serve`` uses. Start-up refusals, workers
and the logs of a real process are in ``tests/test_tls_process.py``.
"""

from __future__ import annotations

import json
import pickle
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from support import KEYS, headers, wait_until
from tls_support import (
    SPIFFE,
    Authority,
    Recorder,
    client_context,
    replace_atomically,
    serve_tls,
    tls_settings,
)

import citadel.tls
import citadel.tls_listener
from citadel.config import SettingError
from citadel.tls import TlsFiles, load_context
from citadel.tls_listener import RefusalLog, TlsListener

IDENTITIES = {caller: SPIFFE + caller for caller in KEYS}


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """The TLS modules' log lines."""
    recorder = Recorder()
    monkeypatch.setattr(citadel.tls, "log", recorder)
    monkeypatch.setattr(citadel.tls_listener, "log", recorder)
    return recorder


def tls_socket(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def served_certificate(port: int, ca: Path) -> x509.Certificate:
    with tls_socket(port, client_context(ca)) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def refused(port: int, context: ssl.SSLContext) -> bool:
    """Whether the server refuses this client in the handshake (or at its first read).

    In TLS 1.3 a client's handshake can complete before the server has checked
    the client's certificate; the refusal then arrives as an alert on the first read.
    """
    try:
        with tls_socket(port, context) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: citadel\r\n\r\n")
            return not s.recv(64).startswith(b"HTTP/1.1 200")
    except (ssl.SSLError, ConnectionError):
        return True


# -- TLS 1.3, and nothing else, on the one port ---------------------------------------------


def test_tls_1_3_serves_every_path_on_the_one_port(tmp_path: Path) -> None:
    ca = Authority.make()
    with (
        serve_tls(tls_settings(tmp_path, ca)) as served,
        served.client(ca.write(tmp_path / "ca")) as c,
    ):
        for path in ("/health", "/ready", "/metrics"):
            assert c.get(path).status_code == 200, path
        r = c.post("/encrypt", json={"plaintext": "hello"}, headers=headers("sentinel"))
        assert r.status_code == 200
        stream = r.extensions["network_stream"]
        assert stream.get_extra_info("ssl_object").version() == "TLSv1.3"


def test_a_tls_1_2_client_is_refused_in_the_handshake(tmp_path: Path, logs: Recorder) -> None:
    ca = Authority.make()
    with serve_tls(tls_settings(tmp_path, ca)) as served:
        context = client_context(ca.write(tmp_path / "ca"), maximum=ssl.TLSVersion.TLSv1_2)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_socket(served.port, context).close()
        wait_until(lambda: logs.named("tls_handshake_refused"))
    assert logs.named("tls_handshake_refused")[0]["reason"] == "protocol_version"


def test_plain_http_on_the_tls_port_gets_no_answer(tmp_path: Path) -> None:
    ca = Authority.make()
    with serve_tls(tls_settings(tmp_path, ca)) as served:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: citadel\r\n\r\n")
            answer = b""
            try:
                while chunk := s.recv(4096):
                    answer += chunk
            except ConnectionResetError:
                pass
        assert b"HTTP/1.1" not in answer and b"healthy" not in answer


def test_a_handshake_that_stalls_is_closed_within_the_read_deadline(
    tmp_path: Path, logs: Recorder
) -> None:
    ca = Authority.make()
    with serve_tls(tls_settings(tmp_path, ca, read_timeout_s=1.0)) as served:
        # A flood of connections that never send a ClientHello: each is closed.
        sockets = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(40)]
        for s in sockets:
            s.settimeout(15)
            assert s.recv(1) == b""  # closed by the server, not by the timeout above
            s.close()
        assert logs.named("tls_handshake_refused")[0]["reason"] == "handshake_timeout"


def test_a_handshake_cut_off_after_its_hello_is_closed_too(tmp_path: Path) -> None:
    ca = Authority.make()
    with serve_tls(tls_settings(tmp_path, ca, read_timeout_s=1.0)) as served:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context(ca.write(tmp_path / "ca")).wrap_bio(
            incoming, outgoing, server_hostname="127.0.0.1"
        )
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        with socket.create_connection(("127.0.0.1", served.port), timeout=15) as s:
            s.sendall(hello[: len(hello) // 2])
            assert s.recv(65536) == b""


# -- the edge's guards, over TLS ---------------------------------------------------------------


def test_the_64_kib_head_limit_holds_over_tls(tmp_path: Path) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca")
    with (
        serve_tls(tls_settings(tmp_path, ca)) as served,
        tls_socket(served.port, client_context(ca_file)) as s,
    ):
        s.sendall(b"GET /health HTTP/1.1\r\nHost: c\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 431")


def test_the_head_deadline_runs_after_the_handshake(tmp_path: Path) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca")
    with (
        serve_tls(tls_settings(tmp_path, ca, read_timeout_s=1.0)) as served,
        tls_socket(served.port, client_context(ca_file)) as s,
    ):
        s.settimeout(15)
        s.sendall(b"GET /health HTTP/1.1\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 408")


def test_the_body_deadline_holds_over_tls(tmp_path: Path) -> None:
    ca = Authority.make()
    with serve_tls(tls_settings(tmp_path, ca, read_timeout_s=1.0)) as served:
        with tls_socket(served.port, client_context(ca.write(tmp_path / "ca"))) as s:
            s.settimeout(15)
            key = KEYS["sentinel"].encode()
            s.sendall(
                b"POST /encrypt HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
                b"X-Internal-API-Key: " + key + b"\r\nContent-Length: 40\r\n\r\n{"
            )
            assert s.recv(64).startswith(b"HTTP/1.1 408")
        assert served.audit.events()[-1]["code"] == "request_timeout"


def _request(key: bytes, body: bytes, *extra: bytes) -> bytes:
    lines = [
        b"POST /encrypt HTTP/1.1",
        b"Host: citadel",
        b"Content-Type: application/json",
        b"X-Internal-API-Key: " + key,
        b"Content-Length: %d" % len(body),
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _read_all(s: ssl.SSLSocket) -> bytes:
    out = b""
    while chunk := s.recv(65536):  # a reset fails the test
        out += chunk
    return out


def test_an_early_401_over_tls_drains_the_body_then_closes_without_a_reset(
    tmp_path: Path,
) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca")
    request = _request(b"wrong-key", json.dumps({"plaintext": "x" * 20_000}).encode())
    head_end = request.index(b"\r\n\r\n") + 4
    with (
        serve_tls(tls_settings(tmp_path, ca)) as served,
        tls_socket(served.port, client_context(ca_file)) as s,
    ):
        s.sendall(request[:head_end])
        answer = b""
        while b"}" not in answer:
            chunk = s.recv(65536)
            assert chunk, "closed before the answer"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 401")
        s.sendall(request[head_end:])
        assert _read_all(s) == b""


def test_an_upgrade_header_over_tls_is_ignored_and_the_body_read(tmp_path: Path) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca")
    body = json.dumps({"plaintext": "hello"}).encode()
    upgrade = (b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c", b"HTTP2-Settings: AAMA")
    with (
        serve_tls(tls_settings(tmp_path, ca)) as served,
        tls_socket(served.port, client_context(ca_file)) as s,
    ):
        s.sendall(_request(KEYS["sentinel"].encode(), body, *upgrade))
        assert s.recv(64).startswith(b"HTTP/1.1 200")


# -- mutual TLS --------------------------------------------------------------------------------


def test_mutual_tls_serves_a_client_certificate_the_ca_signed(tmp_path: Path) -> None:
    ca = Authority.make()
    client = ca.client("sentinel").write(tmp_path, "sentinel")
    ca_file = ca.write(tmp_path / "ca")
    with (
        serve_tls(tls_settings(tmp_path, ca, mutual=True)) as served,
        served.client(ca_file, client) as c,
    ):
        assert c.get("/health").status_code == 200


@pytest.mark.parametrize("case", ["no certificate", "another CA", "expired"])
def test_mutual_tls_refuses_in_the_handshake(tmp_path: Path, logs: Recorder, case: str) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca")
    if case == "no certificate":
        cert = None
        reason = "no_client_certificate"
    elif case == "another CA":
        cert = Authority.make("Elsewhere").client("sentinel").write(tmp_path, "other")
        reason = "client_certificate_not_trusted"
    else:
        cert = ca.client("sentinel", expired=True).write(tmp_path, "expired")
        reason = "client_certificate_expired"
    with serve_tls(tls_settings(tmp_path, ca, mutual=True)) as served:
        assert refused(served.port, client_context(ca_file, cert))
        wait_until(lambda: logs.named("tls_handshake_refused"))
    line = logs.named("tls_handshake_refused")[0]
    assert line["reason"] == reason and line["peer"] == "127.0.0.1"


def test_refused_handshakes_are_logged_once_a_second_per_address(tmp_path: Path) -> None:
    now = [100.0]
    recorder = Recorder()
    refusals = RefusalLog(capacity=3, clock=lambda: now[0])
    pytest.MonkeyPatch().setattr(citadel.tls_listener, "log", recorder)
    try:
        assert refusals.refused("10.0.0.1", "no_client_certificate")
        assert not refusals.refused("10.0.0.1", "no_client_certificate")
        assert refusals.refused("10.0.0.2", "no_client_certificate")
        now[0] += 1.0
        assert refusals.refused("10.0.0.1", "no_client_certificate")
    finally:
        pytest.MonkeyPatch().undo()
    assert recorder.named("tls_handshake_refused")[-1]["not_logged_since_last"] == 1
    for i in range(100):  # many addresses: memory stays bounded
        refusals.refused(f"10.1.0.{i}", "handshake_timeout")
    assert len(refusals) == 3


# -- the certificate names the caller ----------------------------------------------------------


def _bound(tmp_path: Path) -> tuple[Authority, Path]:
    ca = Authority.make()
    return ca, ca.write(tmp_path / "ca")


@pytest.mark.parametrize(
    ("key_of", "cert_of"), [("sentinel", "conductor"), ("conductor", "sentinel")]
)
def test_an_api_key_of_another_caller_than_the_certificate_is_401_audited(
    tmp_path: Path, key_of: str, cert_of: str
) -> None:
    ca, ca_file = _bound(tmp_path)
    cert = ca.client(cert_of).write(tmp_path, cert_of)
    settings = tls_settings(tmp_path, ca, mutual=True, tls_caller_identities=IDENTITIES)
    with serve_tls(settings) as served, served.client(ca_file, cert) as c:
        r = c.post("/encrypt", json={"plaintext": "CANARY-tls"}, headers=headers(key_of))
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
        line = served.audit.events()[-1]
        assert line["requestor"] is None and line["code"] == "unauthenticated"
        assert "CANARY" not in served.audit.text()


def test_the_api_key_of_the_caller_the_certificate_names_is_served(tmp_path: Path) -> None:
    ca, ca_file = _bound(tmp_path)
    cert = ca.client("sentinel").write(tmp_path, "sentinel")
    settings = tls_settings(tmp_path, ca, mutual=True, tls_caller_identities=IDENTITIES)
    with serve_tls(settings) as served, served.client(ca_file, cert) as c:
        r = c.post("/encrypt", json={"plaintext": "hello"}, headers=headers("sentinel"))
        assert r.status_code == 200
        assert served.audit.events()[-1]["requestor"] == "sentinel"


def test_a_certificate_that_names_no_caller_authenticates_nothing(tmp_path: Path) -> None:
    ca, ca_file = _bound(tmp_path)
    cert = ca.leaf("stranger", uris=(SPIFFE + "stranger",), client=True).write(tmp_path, "x")
    settings = tls_settings(tmp_path, ca, mutual=True, tls_caller_identities=IDENTITIES)
    with serve_tls(settings) as served, served.client(ca_file, cert) as c:
        r = c.post("/encrypt", json={"plaintext": "hello"}, headers=headers("sentinel"))
        assert r.status_code == 401
        assert served.audit.events()[-1]["requestor"] is None


def test_a_dns_identity_binds_a_caller_without_regard_to_case(tmp_path: Path) -> None:
    ca, ca_file = _bound(tmp_path)
    cert = ca.leaf("s", dns=("Sentinel.Trading.svc",), client=True).write(tmp_path, "s")
    identities = {"sentinel": "sentinel.trading.svc"}
    settings = tls_settings(tmp_path, ca, mutual=True, tls_caller_identities=identities)
    with serve_tls(settings) as served, served.client(ca_file, cert) as c:
        r = c.post("/encrypt", json={"plaintext": "hello"}, headers=headers("sentinel"))
        assert r.status_code == 200


# -- rotation ----------------------------------------------------------------------------------


def test_a_new_certificate_reaches_new_connections_while_one_in_flight_completes(
    tmp_path: Path, logs: Recorder
) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca")
    settings = tls_settings(tmp_path, ca)
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    with serve_tls(settings) as served:
        old = served_certificate(served.port, ca_file)
        body = json.dumps({"plaintext": "in flight"}).encode()
        with tls_socket(served.port, client_context(ca_file)) as in_flight:
            in_flight.sendall(
                b"POST /encrypt HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
                b"X-Internal-API-Key: " + KEYS["sentinel"].encode() + b"\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body[:5]
            )
            new = ca.server()
            # The key first, then the certificate: for a moment they do not match.
            replace_atomically(settings.tls_key_file, new.key_pem)
            replace_atomically(settings.tls_cert_file, new.cert_pem)
            wait_until(
                lambda: (
                    served_certificate(served.port, ca_file).serial_number == new.cert.serial_number
                ),
                timeout=10,
            )
            in_flight.sendall(body[5:])
            assert in_flight.recv(64).startswith(b"HTTP/1.1 200")
        assert old.serial_number != new.cert.serial_number
    assert logs.named("tls_reloaded")


def test_a_broken_replacement_keeps_the_certificate_in_force(
    tmp_path: Path, logs: Recorder
) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca")
    settings = tls_settings(tmp_path, ca)
    assert settings.tls_cert_file is not None
    with serve_tls(settings) as served:
        before = served_certificate(served.port, ca_file).serial_number
        replace_atomically(settings.tls_cert_file, b"-----BEGIN CERTIFICATE-----\nCANARY\n")
        wait_until(lambda: logs.named("tls_reload_failed"), timeout=10)
        assert served_certificate(served.port, ca_file).serial_number == before
        with served.client(ca_file) as c:
            assert c.get("/health").status_code == 200
    failed = logs.named("tls_reload_failed")[0]
    assert failed["setting"] == "CITADEL_TLS_CERT_FILE" and "CANARY" not in repr(failed)


def test_a_new_client_ca_is_followed_too(tmp_path: Path) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca")
    settings = tls_settings(tmp_path, ca, mutual=True)
    assert settings.tls_client_ca_file is not None
    other = Authority.make("New client CA")
    cert = other.client("sentinel").write(tmp_path, "sentinel")
    with serve_tls(settings) as served:
        assert refused(served.port, client_context(ca_file, cert))
        replace_atomically(settings.tls_client_ca_file, ca.cert_pem + other.cert_pem)
        wait_until(lambda: not refused(served.port, client_context(ca_file, cert)), timeout=10)


# -- the listener's own pieces ----------------------------------------------------------------


def test_the_listener_pickles_to_its_files_for_worker_processes(tmp_path: Path) -> None:
    ca = Authority.make()
    cert, key = ca.server().write(tmp_path, "server")
    listener = TlsListener(TlsFiles(cert, key), 3.0, http_protocol=httpx.Client)  # any class
    copy = pickle.loads(pickle.dumps(listener))
    assert copy.files == listener.files and copy.header_timeout_s == 3.0
    assert copy.reloader.current is not listener.reloader.current


@pytest.mark.parametrize(
    ("case", "setting"),
    [
        ("cert missing", "CITADEL_TLS_CERT_FILE"),
        ("cert not PEM", "CITADEL_TLS_CERT_FILE"),
        ("key not PEM", "CITADEL_TLS_KEY_FILE"),
        ("key of another certificate", "CITADEL_TLS_KEY_FILE"),
        ("certificate of another key", "CITADEL_TLS_KEY_FILE"),
        ("ca not PEM", "CITADEL_TLS_CLIENT_CA_FILE"),
    ],
)
def test_files_that_cannot_serve_name_their_setting_never_their_content(
    tmp_path: Path, case: str, setting: str
) -> None:
    ca = Authority.make()
    cert, key = ca.server().write(tmp_path, "server")
    client_ca = ca.write(tmp_path / "client-ca.crt")
    other_cert, other_key = ca.server().write(tmp_path, "other")
    canary = b"CANARY-" + str(tmp_path).encode()
    if case == "cert missing":
        cert = tmp_path / "missing-CANARY.crt"
    elif case == "cert not PEM":
        cert.write_bytes(canary)
    elif case == "key not PEM":
        key.write_bytes(canary)
    elif case == "key of another certificate":
        key = other_key
    elif case == "certificate of another key":
        cert = other_cert
    else:
        client_ca.write_bytes(canary)
    with pytest.raises(SettingError) as caught:
        load_context(TlsFiles(cert, key, client_ca))
    assert caught.value.variable == setting
    assert "CANARY" not in str(caught.value) and str(tmp_path) not in str(caught.value)


def test_a_passphrase_protected_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    ca = Authority.make()
    leaf = ca.server()
    cert, key = leaf.write(tmp_path, "server")
    key.write_bytes(
        leaf.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(SettingError, match="passphrase"):
        load_context(TlsFiles(cert, key))


def test_a_client_without_the_ca_refuses_the_server_and_the_server_says_why(
    tmp_path: Path, logs: Recorder
) -> None:
    ca = Authority.make()
    with serve_tls(tls_settings(tmp_path, ca)) as served:
        with pytest.raises(ssl.SSLError):
            tls_socket(served.port, ssl.create_default_context()).close()
        wait_until(lambda: logs.named("tls_handshake_refused"))
    assert logs.named("tls_handshake_refused")[0]["reason"] == "client_refused_server_certificate"


def test_a_stalled_client_costs_the_server_no_lasting_descriptor(tmp_path: Path) -> None:
    """After the deadline the server holds none of the stalled connections' sockets."""
    import os

    ca = Authority.make()
    with serve_tls(tls_settings(tmp_path, ca, read_timeout_s=1.0)) as served:
        before = len(os.listdir("/proc/self/fd"))
        sockets = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(20)]
        for s in sockets:
            s.settimeout(15)
            assert s.recv(1) == b""
        # Ours are still open (20); the server's ends are gone.
        deadline = time.monotonic() + 10
        while len(os.listdir("/proc/self/fd")) > before + len(sockets):
            assert time.monotonic() < deadline, "the server kept descriptors"
            time.sleep(0.05)
        for s in sockets:
            s.close()


# -- what the listener relies on ---------------------------------------------------------------


def test_asyncio_s_own_loop_serves_and_refuses_as_uvloop_does(
    tmp_path: Path, logs: Recorder
) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca")
    with serve_tls(tls_settings(tmp_path, ca, mutual=True), loop="asyncio") as served:
        cert = ca.client("sentinel").write(tmp_path, "sentinel")
        with served.client(ca_file, cert) as c:
            assert c.get("/health").status_code == 200
        assert refused(served.port, client_context(ca_file))
        wait_until(lambda: logs.named("tls_handshake_refused"))
    assert logs.named("tls_handshake_refused")[0]["reason"] == "no_client_certificate"


def test_the_tls_protocols_the_listener_builds_take_the_arguments_it_passes() -> None:
    """asyncio's and uvloop's TLS protocols are not public API: if these move, review
    citadel/tls_listener.py (it builds them as loop.create_server(ssl=...) does)."""
    import asyncio.sslproto
    import inspect

    import uvloop.loop

    names = list(inspect.signature(asyncio.sslproto.SSLProtocol).parameters)
    assert names[:4] == ["loop", "app_protocol", "sslcontext", "waiter"]
    assert {"server_side", "ssl_handshake_timeout", "ssl_shutdown_timeout"} <= set(names)
    assert hasattr(uvloop.loop, "SSLProtocol")
