"""Certificates for the TLS tests, made with ``cryptography``: a CA, leaves, expired ones.

Keys are EC P-256 (fast to make); each file is written with mode 0600, as a
key file must be in production.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import AuditSink, free_port, make_settings

from citadel.app import create_app
from citadel.config import Settings
from citadel.http.serving import uvicorn_options
from citadel.tls_listener import TlsListener, https_options

SPIFFE = "spiffe://citadel.test/ns/trading/sa/"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Authority:
    """A CA that signs leaves; ``cert_pem`` is its certificate, for a CA bundle."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, name: str = "Citadel Test CA") -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(days=1))
            .not_valid_after(_now() + dt.timedelta(days=30))
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
        return cls(name, key, cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        return _write(path, self.cert_pem)

    def leaf(
        self,
        name: str,
        *,
        dns: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        client: bool = False,
        expired: bool = False,
    ) -> Leaf:
        """A certificate for ``name`` signed by this CA (a server's, or a client's)."""
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        start = _now() - dt.timedelta(days=10 if expired else 1)
        end = _now() - dt.timedelta(days=1) if expired else _now() + dt.timedelta(days=10)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Leaf(key, builder.sign(self.key, hashes.SHA256()))

    def server(self, **kw: object) -> Leaf:
        """A server certificate for 127.0.0.1 and localhost."""
        return self.leaf("citadel", dns=("localhost",), ips=("127.0.0.1",), **kw)  # type: ignore[arg-type]

    def client(self, caller: str, **kw: object) -> Leaf:
        """A client certificate carrying the SPIFFE ID of ``caller``."""
        return self.leaf(caller, uris=(SPIFFE + caller,), client=True, **kw)  # type: ignore[arg-type]


@dataclass
class Leaf:
    """A certificate and its key."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``stem.crt`` and ``stem.key`` in ``directory`` (mode 0600)."""
        return (
            _write(directory / f"{stem}.crt", self.cert_pem),
            _write(directory / f"{stem}.key", self.key_pem),
        )


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path`` and rename it over ``path``, as a Secret update does."""
    tmp = path.with_name(path.name + ".new")
    _write(tmp, data)
    os.replace(tmp, path)


def client_context(
    ca: Path | None,
    cert: tuple[Path, Path] | None = None,
    *,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client's context trusting ``ca``, presenting ``cert`` when given."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = maximum
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


class Recorder:
    """Stands in for a module's structlog logger: keeps each event and its fields."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def _keep(self, event: str, **fields: Any) -> None:
        with self._lock:
            self.events.append((event, fields))

    debug = info = warning = error = exception = _keep

    def named(self, event: str) -> list[dict[str, Any]]:
        with self._lock:
            return [fields for name, fields in self.events if name == event]


@dataclass
class TlsServed:
    """A Citadel served over TLS in this process."""

    url: str
    port: int
    audit: AuditSink
    listener: TlsListener

    def client(self, ca: Path, cert: tuple[Path, Path] | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=client_context(ca, cert), timeout=10)


@contextmanager
def serve_tls(settings: Settings, loop: str = "auto") -> Iterator[TlsServed]:
    """Citadel over TLS with uvicorn in a thread, with the options ``citadel serve`` uses.

    ``loop`` as uvicorn takes it: ``auto`` is uvloop, as ``citadel serve`` runs.
    """
    audit = AuditSink()
    app = create_app(settings, audit_sink=audit)
    port = free_port()
    options = https_options(settings, uvicorn_options())
    listener = options["http"]
    assert isinstance(listener, TlsListener)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", loop=loop, **options)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield TlsServed(f"https://127.0.0.1:{port}", port, audit, listener)
    finally:
        server.should_exit = True
        thread.join(10)
        listener.reloader.stop()


def tls_settings(tmp: Path, ca: Authority, *, mutual: bool = False, **overrides: Any) -> Settings:
    """Settings serving a fresh server certificate of ``ca`` (mTLS: the same CA for clients)."""
    cert, key = ca.server().write(tmp, "server")
    fields: dict[str, Any] = {"tls_cert_file": cert, "tls_key_file": key}
    if mutual:
        fields["tls_client_ca_file"] = ca.write(tmp / "client-ca.crt")
    fields.update(overrides)
    return make_settings(tmp, **fields)
