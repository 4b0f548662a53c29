"""Write the RSA test keys under tests/data/rsa/ (issue 15, finding 1). Not run by the suite.

Run once with ``.venv/bin/python tests/data/make_hostile_keys.py``; the PEMs it
writes are committed. They are test data, not secrets: nothing ever trusted
them. RSA generation cannot be seeded, so a rerun writes other keys of the same
kinds; the tests only depend on the kinds.

- ``rsa{bits}_valid.pkcs8.pem`` / ``.pkcs1.pem``: ordinary keys, for the sizes
  exchanges issue (2048, 3072, 4096) and for sizes Citadel refuses (1024, 5120,
  8192; the 8192-bit PEM is over the default 4,096-byte plaintext limit).
- ``rsa{bits}_bad_iqmp.*.pem``: real primes p and q, n = p*q, right d, dmp1 and
  dmq1, but iqmp (q^-1 mod p) replaced by iqmp + 1. cryptography's key check
  refuses it; loaded without the check it would sign with a wrong CRT value,
  and such a signature leaks the factorisation (Boneh-DeMillo-Lipton). The
  5120-bit one fits the default plaintext limit.
- ``rsa4096_bad_dmp1.pkcs8.pem``: the same with dmp1 + 2 (d mod (p-1) wrong).

The DER is written here (RSAPrivateKey, RFC 8017 A.1.2; PrivateKeyInfo,
RFC 5208) rather than by cryptography, which need not keep serialising an
inconsistent key; for the valid keys it is checked to equal cryptography's own.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import rsa

OUT = Path(__file__).resolve().parent / "rsa"
RSA_ENCRYPTION_OID = bytes.fromhex("06092a864886f70d010101")  # 1.2.840.113549.1.1.1
NULL = bytes.fromhex("0500")


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + der_length(len(content)) + content


def der_int(value: int) -> bytes:
    assert value >= 0
    raw = value.to_bytes(value.bit_length() // 8 + 1, "big")  # leading 0x00 keeps it positive
    return tlv(0x02, raw)


def rsa_private_key_der(
    n: int, e: int, d: int, p: int, q: int, dmp1: int, dmq1: int, iqmp: int
) -> bytes:
    """PKCS#1 RSAPrivateKey: version 0 (two primes), then the eight integers."""
    return tlv(0x30, b"".join(der_int(v) for v in (0, n, e, d, p, q, dmp1, dmq1, iqmp)))


def pkcs8_der(pkcs1: bytes) -> bytes:
    """PrivateKeyInfo: version 0, AlgorithmIdentifier(rsaEncryption, NULL), OCTET STRING."""
    algorithm = tlv(0x30, RSA_ENCRYPTION_OID + NULL)
    return tlv(0x30, der_int(0) + algorithm + tlv(0x04, pkcs1))


def pem(label: str, der: bytes) -> bytes:
    body = base64.b64encode(der)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        b"\n".join([f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----".encode()])
        + b"\n"
    )


def write_pair(name: str, numbers: tuple[int, ...], *, pkcs1_too: bool = True) -> None:
    pkcs1 = rsa_private_key_der(*numbers)
    (OUT / f"{name}.pkcs8.pem").write_bytes(pem("PRIVATE KEY", pkcs8_der(pkcs1)))
    if pkcs1_too:
        (OUT / f"{name}.pkcs1.pem").write_bytes(pem("RSA PRIVATE KEY", pkcs1))


def numbers_of(key: rsa.RSAPrivateKey) -> tuple[int, ...]:
    pn = key.private_numbers()
    return (
        pn.public_numbers.n,
        pn.public_numbers.e,
        pn.d,
        pn.p,
        pn.q,
        pn.dmp1,
        pn.dmq1,
        pn.iqmp,
    )


def check_encoder(key: rsa.RSAPrivateKey) -> None:
    pkcs1 = rsa_private_key_der(*numbers_of(key))
    ours = pem("RSA PRIVATE KEY", pkcs1), pem("PRIVATE KEY", pkcs8_der(pkcs1))
    theirs = tuple(
        key.private_bytes(ser.Encoding.PEM, fmt, ser.NoEncryption())
        for fmt in (ser.PrivateFormat.TraditionalOpenSSL, ser.PrivateFormat.PKCS8)
    )
    assert ours == theirs, "this DER encoder disagrees with cryptography's"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for bits in (1024, 2048, 3072, 4096, 5120, 8192):
        print(f"generating {bits} bits", file=sys.stderr)
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        check_encoder(key)
        write_pair(f"rsa{bits}_valid", numbers_of(key))
    for bits in (4096, 5120):
        print(f"generating {bits} bits (bad iqmp)", file=sys.stderr)
        n, e, d, p, q, dmp1, dmq1, iqmp = numbers_of(
            rsa.generate_private_key(public_exponent=65537, key_size=bits)
        )
        write_pair(f"rsa{bits}_bad_iqmp", (n, e, d, p, q, dmp1, dmq1, iqmp + 1))
        if bits == 4096:
            write_pair(
                f"rsa{bits}_bad_dmp1", (n, e, d, p, q, dmp1 + 2, dmq1, iqmp), pkcs1_too=False
            )


if __name__ == "__main__":
    main()
