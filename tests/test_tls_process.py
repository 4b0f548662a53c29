"""TLS in real ``citadel serve`` processes: start-up refusals, workers, shutdown, logs (issue 20)."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from support import CITADEL, KEYS, PSEUDONYM_KEY, clean_env, free_port, headers, run
from tls_support import Authority, client_context, replace_atomically

KEYS_ENV = json.dumps({caller: [key] for caller, key in KEYS.items()})


def tls_env(tmp: Path, ca: Authority, *, mutual: bool = False) -> dict[str, str]:
    cert, key = ca.server().write(tmp, "server")
    env = {
        "CITADEL_API_KEYS": KEYS_ENV,
        "CITADEL_AUDIT_PSEUDONYM_KEY": PSEUDONYM_KEY,
        "CITADEL_TLS_CERT_FILE": str(cert),
        "CITADEL_TLS_KEY_FILE": str(key),
    }
    if mutual:
        env["CITADEL_TLS_CLIENT_CA_FILE"] = str(ca.write(tmp / "client-ca.crt"))
    return env


@contextmanager
def serving_tls(
    cwd: Path,
    env: dict[str, str],
    context: ssl.SSLContext,
    *args: str,
    log: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``citadel serve`` over TLS on a free port, until ``/health`` answers over TLS."""
    port = free_port()
    out = open(log or cwd / "serve.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [*CITADEL, "serve", "--port", str(port), *args],
        cwd=cwd,
        env=clean_env(**env),
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", verify=context, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "citadel did not start: " + (log or cwd / "serve.log").read_text()
                )
            time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        out.close()


def log_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.mark.parametrize(
    ("case", "setting"),
    [
        ("missing certificate", "CITADEL_TLS_CERT_FILE"),
        ("unreadable key", "CITADEL_TLS_KEY_FILE"),
        ("mismatched key", "CITADEL_TLS_KEY_FILE"),
        ("bad client CA", "CITADEL_TLS_CLIENT_CA_FILE"),
        ("certificate without key", "CITADEL_TLS_KEY_FILE"),
        ("identities without client CA", "CITADEL_TLS_CLIENT_CA_FILE"),
    ],
)
def test_serve_refuses_tls_files_that_cannot_serve_in_one_line(
    tmp_path: Path, case: str, setting: str
) -> None:
    ca = Authority.make()
    env = tls_env(tmp_path, ca, mutual=True)
    secret_dir = tmp_path / "CANARY-dir"
    secret_dir.mkdir()
    if case == "missing certificate":
        env["CITADEL_TLS_CERT_FILE"] = str(secret_dir / "none.crt")
    elif case == "unreadable key":
        env["CITADEL_TLS_KEY_FILE"] = str(secret_dir)
    elif case == "mismatched key":
        _, other_key = ca.server().write(secret_dir, "other")
        env["CITADEL_TLS_KEY_FILE"] = str(other_key)
    elif case == "bad client CA":
        bad = secret_dir / "ca.pem"
        bad.write_text("CANARY not a certificate")
        env["CITADEL_TLS_CLIENT_CA_FILE"] = str(bad)
    elif case == "certificate without key":
        del env["CITADEL_TLS_KEY_FILE"]
    else:
        del env["CITADEL_TLS_CLIENT_CA_FILE"]
        env["CITADEL_TLS_CALLER_IDENTITIES"] = json.dumps({"sentinel": "spiffe://t/sentinel"})
    result = run(["serve", "--port", str(free_port())], tmp_path, **env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert setting in result.stderr
    assert "CANARY" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_production_without_tls_logs_plaintext_listener_once_and_check_names_it(
    tmp_path: Path,
) -> None:
    env = {
        "CITADEL_ENV": "production",
        "CITADEL_API_KEYS": KEYS_ENV,
        "CITADEL_AUDIT_PSEUDONYM_KEY": PSEUDONYM_KEY,
    }
    assert run(["keyring", "init"], tmp_path, **env).returncode == 0
    check = run(["check"], tmp_path, **env)
    assert check.returncode == 0, check.stdout
    assert "plaintext_listener" in check.stdout
    log = tmp_path / "serve.log"
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*CITADEL, "serve", "--port", str(port)],
            cwd=tmp_path,
            env=clean_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "citadel_started" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        httpx.get(f"http://127.0.0.1:{port}/health")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    events = [line["event"] for line in log_lines(log)]
    assert events.count("plaintext_listener") == 1


def test_check_reports_the_tls_files_as_serve_loads_them(tmp_path: Path) -> None:
    ca = Authority.make()
    env = tls_env(tmp_path, ca, mutual=True)
    result = run(["check"], tmp_path, **env)
    assert result.returncode == 0, result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("tls: "))
    assert "TLS 1.3" in line and "client certificates required" in line
    env["CITADEL_TLS_KEY_FILE"] = env["CITADEL_TLS_CERT_FILE"]
    bad = run(["check"], tmp_path, **env)
    assert bad.returncode == 2 and "CITADEL_TLS_KEY_FILE" in bad.stdout


def test_workers_serve_tls_and_each_follows_a_new_certificate(tmp_path: Path) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca.crt")
    env = tls_env(tmp_path, ca)
    context = client_context(ca_file)
    with serving_tls(tmp_path, env, context, "--workers", "2") as (url, _proc):
        for _ in range(10):  # new connections, spread over both workers
            r = httpx.post(
                url + "/encrypt",
                json={"plaintext": "hello"},
                headers=headers("sentinel"),
                verify=context,
            )
            assert r.status_code == 200
        new = ca.server()
        replace_atomically(Path(env["CITADEL_TLS_KEY_FILE"]), new.key_pem)
        replace_atomically(Path(env["CITADEL_TLS_CERT_FILE"]), new.cert_pem)
        port = int(url.rsplit(":", 1)[1])

        def all_new() -> bool:
            for _ in range(10):
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as s,
                ):
                    der = s.getpeercert(binary_form=True)
                    assert der is not None
                    if x509.load_der_x509_certificate(der).serial_number != new.cert.serial_number:
                        return False
            return True

        deadline = time.monotonic() + 15
        while not all_new():
            assert time.monotonic() < deadline, "a worker kept the old certificate"
            time.sleep(0.2)


def test_graceful_shutdown_over_tls_lets_the_request_in_flight_finish(tmp_path: Path) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca.crt")
    env = tls_env(tmp_path, ca)
    context = client_context(ca_file)
    body = json.dumps({"plaintext": "in flight"}).encode()
    with serving_tls(tmp_path, env, context) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=15) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as s,
        ):
            s.sendall(
                b"POST /encrypt HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
                b"X-Internal-API-Key: " + KEYS["sentinel"].encode() + b"\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body[:3]
            )
            time.sleep(0.3)  # let the server start reading the body (not an assertion)
            proc.send_signal(signal.SIGTERM)
            s.sendall(body[3:])
            assert s.recv(64).startswith(b"HTTP/1.1 200")
        # uvicorn finishes what is in flight, then re-raises the signal.
        assert proc.wait(20) == -signal.SIGTERM


def test_a_refused_client_certificate_is_logged_with_the_peer_address(tmp_path: Path) -> None:
    ca = Authority.make()
    ca_file = ca.write(tmp_path / "ca.crt")
    env = tls_env(tmp_path, ca, mutual=True)
    client = ca.client("sentinel").write(tmp_path, "sentinel")
    log = tmp_path / "serve.log"
    with serving_tls(tmp_path, env, client_context(ca_file, client), log=log) as (url, _):
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                with suppress(httpx.TransportError):
                    httpx.get(url + "/health", verify=client_context(ca_file), timeout=2)

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        started = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(1.5)  # a burst of refusals
        stop.set()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
    refused = [x for x in log_lines(log) if x["event"] == "tls_handshake_refused"]
    assert refused and all(x["peer"] == "127.0.0.1" for x in refused)
    assert refused[0]["reason"] == "no_client_certificate"
    # A burst of many refusals from one address: a line a second at most.
    assert len(refused) <= int(seconds) + 1
    assert sum(int(x["not_logged_since_last"]) for x in refused) > 0  # others were counted


def test_check_refuses_an_expired_server_certificate_that_serve_would_hand_out(
    tmp_path: Path,
) -> None:
    ca = Authority.make()
    env = tls_env(tmp_path, ca)
    cert, key = ca.server(expired=True).write(tmp_path, "expired")
    env.update(CITADEL_TLS_CERT_FILE=str(cert), CITADEL_TLS_KEY_FILE=str(key))
    result = run(["check"], tmp_path, **env)
    assert result.returncode == 2
    line = next(x for x in result.stdout.splitlines() if x.startswith("tls: "))
    assert "CITADEL_TLS_CERT_FILE" in line and "expired" in line
