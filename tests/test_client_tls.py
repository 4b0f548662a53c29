"""``verify=`` and ``cert=`` of both clients and the bulk tool, over real TLS connections.

The server is uvicorn with its own TLS options (TLS 1.3 only, a client certificate
required), serving a tiny stand-in of ``POST /encrypt`` and ``/rewrap`` in a thread:
what is under test is the client's side of the handshake, whatever Citadel's own
listener does. The certificates (a CA, a server leaf for 127.0.0.1, a client leaf,
and a CA nobody trusts) are made with ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import FakeTime, free_port

from citadel.cli import build_parser
from citadel_client import (
    AsyncCitadelClient,
    CitadelClient,
    CitadelConnectionError,
    ConfigError,
    bulk,
)

KEY = "CANARY-TLS-API-KEY-0b6f"


# -- certificates ---------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, name: str) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(self, name: str, *, server: bool) -> tuple[bytes, bytes]:
        """A leaf's certificate and key, PEM: for 127.0.0.1 (server) or a caller (client)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Files:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_both: Path  # certificate and key in one file
    stranger_cert: Path  # a client certificate from a CA the server does not trust
    stranger_key: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    where = tmp_path_factory.mktemp("tls")
    ca, other = CA.make("Test CA"), CA.make("Another CA")
    server_cert, server_key = ca.issue("citadel", server=True)
    client_cert, client_key = ca.issue("sentinel", server=False)
    stranger_cert, stranger_key = other.issue("sentinel", server=False)
    out: dict[str, Path] = {}
    for name, data in {
        "ca": ca.pem(),
        "other_ca": other.pem(),
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "client_both": client_cert + client_key,
        "stranger_cert": stranger_cert,
        "stranger_key": stranger_key,
    }.items():
        path = where / f"{name}.pem"
        path.write_bytes(data)
        path.chmod(0o600)
        out[name] = path
    return Files(**out)


# -- the server -------------------------------------------------------------------------------


async def stand_in(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/encrypt`` and ``/rewrap`` (single and batch forms) answered as the contract does."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = dict(scope["headers"])
    if headers.get(b"x-internal-api-key") != KEY.encode():
        status, answer = 401, {"code": "unauthenticated", "detail": "no"}
    elif scope["path"] == "/rewrap":
        payload = json.loads(body)
        new = [
            {"encrypted_data": item["encrypted_data"].replace("cit1:oldkid01:", "cit1:newkid01:")}
            for item in payload.get("batch", [payload])
        ]
        status, answer = 200, {"batch": new} if "batch" in payload else new[0]
    else:
        status, answer = 200, {"encrypted_data": "cit1:newkid01:" + json.loads(body)["plaintext"]}
    content = json.dumps(answer).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(content)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})


@pytest.fixture(scope="module")
def server(files: Files) -> Iterator[str]:
    """HTTPS with TLS 1.3 at least and a client certificate of the test CA required."""
    port = free_port()
    config = uvicorn.Config(
        stand_in,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="critical",
        access_log=False,
        ssl_certfile=str(files.server_cert),
        ssl_keyfile=str(files.server_key),
        ssl_ca_certs=str(files.ca),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    config.load()
    assert config.ssl is not None
    config.ssl.minimum_version = ssl.TLSVersion.TLSv1_3
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the TLS server did not start"
        time.sleep(0.01)
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def one_try(fake: FakeTime) -> dict[str, Any]:
    """Options that make a refused handshake fail at once (no retry fits the deadline)."""
    return {"sleep": fake.sleep, "clock": fake.clock, "deadline": 1.0, "random": lambda: 0.5}


# -- the clients ------------------------------------------------------------------------------


def test_sync_client_with_the_ca_and_a_client_certificate_pair(server: str, files: Files) -> None:
    cert = (str(files.client_cert), str(files.client_key))
    with CitadelClient(server, KEY, verify=str(files.ca), cert=cert) as client:
        assert client.encrypt("x") == "cit1:newkid01:x"


def test_a_certificate_file_that_holds_the_key_too(server: str, files: Files) -> None:
    with CitadelClient(server, KEY, verify=files.ca, cert=files.client_both) as client:
        assert client.encrypt("y") == "cit1:newkid01:y"


@pytest.mark.anyio
async def test_async_client_with_the_ca_and_a_client_certificate(server: str, files: Files) -> None:
    cert = (str(files.client_cert), str(files.client_key))
    async with AsyncCitadelClient(server, KEY, verify=str(files.ca), cert=cert) as client:
        assert await client.encrypt("z") == "cit1:newkid01:z"


def test_without_a_client_certificate_the_handshake_is_refused(
    server: str, files: Files, fake: FakeTime
) -> None:
    with (
        CitadelClient(server, KEY, verify=str(files.ca), **one_try(fake)) as client,
        pytest.raises(CitadelConnectionError) as exc,
    ):
        client.encrypt("x")
    assert KEY not in str(exc.value) + repr(exc.value)


def test_a_client_certificate_of_another_ca_is_refused(
    server: str, files: Files, fake: FakeTime
) -> None:
    cert = (str(files.stranger_cert), str(files.stranger_key))
    with (
        CitadelClient(server, KEY, verify=str(files.ca), cert=cert, **one_try(fake)) as client,
        pytest.raises(CitadelConnectionError),
    ):
        client.encrypt("x")


@pytest.mark.parametrize("trust", ["system", "other-ca"])
def test_a_server_certificate_the_client_does_not_trust_is_refused(
    server: str, files: Files, fake: FakeTime, trust: str
) -> None:
    verify: Any = True if trust == "system" else str(files.other_ca)
    cert = (str(files.client_cert), str(files.client_key))
    with (
        CitadelClient(server, KEY, verify=verify, cert=cert, **one_try(fake)) as client,
        pytest.raises(CitadelConnectionError),
    ):
        client.encrypt("x")
    assert fake.waits == []  # refused once, not retried past the deadline


def test_a_proxy_in_the_environment_is_not_used(
    server: str, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy named by HTTPS_PROXY would see every API key; the client never uses one."""
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    cert = (str(files.client_cert), str(files.client_key))
    with CitadelClient(server, KEY, verify=str(files.ca), cert=cert) as client:
        assert client.encrypt("p") == "cit1:newkid01:p"


def test_from_env_takes_the_ca_and_the_client_certificate(server: str, files: Files) -> None:
    env = {
        "CITADEL_URL": server,
        "CITADEL_API_KEY": KEY,
        "CITADEL_CA_FILE": str(files.ca),
        "CITADEL_CLIENT_CERT_FILE": str(files.client_cert),
        "CITADEL_CLIENT_KEY_FILE": str(files.client_key),
    }
    with CitadelClient.from_env(env) as client:
        assert client.encrypt("e") == "cit1:newkid01:e"


@pytest.mark.anyio
async def test_async_from_env_takes_a_combined_certificate_file(server: str, files: Files) -> None:
    env = {
        "CITADEL_URL": server,
        "CITADEL_API_KEY": KEY,
        "CITADEL_CA_FILE": str(files.ca),
        "CITADEL_CLIENT_CERT_FILE": str(files.client_both),
    }
    async with AsyncCitadelClient.from_env(env) as client:
        assert await client.rewrap("cit1:oldkid01:q") == "cit1:newkid01:q"


def test_a_key_that_does_not_match_the_certificate_is_refused_at_construction(
    files: Files,
) -> None:
    with pytest.raises(ConfigError, match="cert: the client certificate or key cannot be used"):
        CitadelClient(
            "https://127.0.0.1:1", KEY, cert=(str(files.client_cert), str(files.stranger_key))
        )


# -- the bulk tool ----------------------------------------------------------------------------


def run_bulk(
    tmp_path: Path, *argv: str, monkeypatch: pytest.MonkeyPatch, **env: str
) -> tuple[int, str]:
    for name in (
        "CITADEL_URL",
        "CITADEL_API_KEY_FILE",
        "CITADEL_CA_FILE",
        "CITADEL_CLIENT_CERT_FILE",
        "CITADEL_CLIENT_KEY_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CITADEL_API_KEY", KEY)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": i, "encrypted_data": f"cit1:oldkid01:{i}"}) + "\n" for i in range(3)
        )
    )
    err = io.StringIO()
    args = build_parser().parse_args(["rewrap", str(src), "-o", str(tmp_path / "out.jsonl"), *argv])
    code = bulk.execute(args, stderr=err, handle_signals=False)
    return code, err.getvalue()


def test_the_bulk_tool_speaks_mutual_tls_from_its_options(
    server: str, files: Files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, err = run_bulk(
        tmp_path,
        "--url",
        server,
        "--ca-file",
        str(files.ca),
        "--client-cert",
        str(files.client_cert),
        "--client-key",
        str(files.client_key),
        monkeypatch=monkeypatch,
    )
    assert code == 0, err
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["encrypted_data"] for row in out] == [f"cit1:newkid01:{i}" for i in range(3)]


def test_the_bulk_tool_takes_url_and_tls_from_the_clients_variables(
    server: str, files: Files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, err = run_bulk(
        tmp_path,
        monkeypatch=monkeypatch,
        CITADEL_URL=server,
        CITADEL_CA_FILE=str(files.ca),
        CITADEL_CLIENT_CERT_FILE=str(files.client_both),
    )
    assert code == 0, err


def test_the_bulk_tool_names_the_option_of_an_unusable_ca_never_its_path(
    files: Files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "CANARY-CA-PATH.pem"
    code, err = run_bulk(
        tmp_path, "--url", "https://127.0.0.1:1", "--ca-file", str(missing), monkeypatch=monkeypatch
    )
    assert code == 2
    assert "--ca-file" in err and "CANARY-CA-PATH" not in err
