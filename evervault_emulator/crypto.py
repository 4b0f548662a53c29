"""Decryption of the Evervault SDK's ``ev:`` strings, mirroring evervault/crypto/client.py.

Format: ``ev:<version>[:<type>]:<iv>:<ephemeral public key>:<ciphertext>:$``, each field
standard base64 with the padding stripped; the ephemeral key is a compressed SEC1 point.

========  =========  =========  ==================================  ==========================
version   curve      role       AES-256-GCM key                     AAD
========  =========  =========  ==================================  ==========================
``RFVC``  secp256k1  no         raw ECDH shared secret              none
``Tk9D``  P-256      no         SHA256(shared | 00000001 | SPKI)    the app's public key bytes
``S0lS``  secp256k1  yes        SHA256(shared | 00000001 | SPKI)    v2 AAD (see ``_v2_aad``)
``QkTC``  P-256      yes        SHA256(shared | 00000001 | SPKI)    v2 AAD
========  =========  =========  ==================================  ==========================

SPKI is the SDK's DER encoding (``P256PublicKey`` / ``KoblitzPublicKey``, explicit curve
parameters) of the *uncompressed* ephemeral point. Role payloads start with a 2-byte
little-endian length and that many bytes of msgpack metadata, stripped here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from evervault.crypto.curves.koblitz import KoblitzPublicKey
from evervault.crypto.curves.p256 import P256PublicKey

K1: Final = "SECP256K1"
R1: Final = "SECP256R1"
CURVES: Final[dict[str, type[ec.EllipticCurve]]] = {K1: ec.SECP256K1, R1: ec.SECP256R1}
#: version -> (curve, carries a data role and metadata)
VERSIONS: Final[dict[str, tuple[str, bool]]] = {
    "RFVC": (K1, False),
    "Tk9D": (R1, False),
    "S0lS": (K1, True),
    "QkTC": (R1, True),
}
DATATYPES: Final[dict[str, int]] = {"string": 0, "number": 1, "boolean": 2}
_INTEGER = re.compile(r"-?[0-9]+")
_CACHE_MAX = 100_000


class UndecryptableError(Exception):
    """The value is not a ciphertext this app's keys can open."""


def _spki_prefix(curve: str) -> bytes:
    """The constant head of the SDK's DER SPKI encoding, before the 65-byte point.

    Every uncompressed point is 65 bytes, so every DER length in the structure is the
    same: the SDK's pyasn1 encoding is ``prefix + point``. Computing it once here, with
    the SDK's own classes, saves ~150 us per new ephemeral key.
    """
    point = (
        ec.generate_private_key(CURVES[curve]())
        .public_key()
        .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    )
    der: bytes = (P256PublicKey if curve == R1 else KoblitzPublicKey)(point.hex()).encode()
    if not der.endswith(point):  # pragma: no cover - would mean the SDK changed its encoding
        raise RuntimeError(f"unexpected SPKI encoding from the SDK for {curve}")
    return der[: -len(point)]


SPKI_PREFIX: Final[dict[str, bytes]] = {curve: _spki_prefix(curve) for curve in CURVES}


def sdk_spki(curve: str, uncompressed_point: bytes) -> bytes:
    """What ``P256PublicKey(point.hex()).encode()`` (or Koblitz) returns, without pyasn1."""
    return SPKI_PREFIX[curve] + uncompressed_point


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise UndecryptableError("bad base64") from None


def _v2_aad(curve: str, datatype: str, ephemeral: bytes, app_public: bytes) -> bytes:
    """The SDK's ``__create_v2_aad``: one byte of curve and type, then both public keys."""
    first = (0x00 if curve == K1 else 0x01) | (DATATYPES[datatype] << 4)
    return bytes([first]) + ephemeral + app_public


class AppKeys:
    """An app's two key pairs, and a cache of AES keys derived per ephemeral public key."""

    def __init__(
        self,
        secp256k1: ec.EllipticCurvePrivateKey | None = None,
        p256: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        given = {K1: secp256k1, R1: p256}
        self.private: dict[str, ec.EllipticCurvePrivateKey] = {}
        for curve, key in given.items():
            if key is None:
                key = ec.generate_private_key(CURVES[curve]())
            elif not isinstance(key.curve, CURVES[curve]):
                raise ValueError(f"expected a {curve} private key, got {key.curve.name}")
            self.private[curve] = key
        #: the compressed points, as served by ``GET /cages/key`` and used as AAD
        self.public: dict[str, bytes] = {
            curve: key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
            for curve, key in self.private.items()
        }
        self._derived: dict[tuple[str, bool, bytes], AESGCM] = {}

    # -- persistence -----------------------------------------------------------

    def to_pem(self) -> bytes:
        """Both private keys, PKCS#8 PEM, secp256k1 first."""
        return b"".join(
            self.private[curve].private_bytes(
                Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            for curve in (K1, R1)
        )

    @classmethod
    def from_pem(cls, data: bytes) -> AppKeys:
        """Read what :meth:`to_pem` wrote (two PEM EC private keys, in any order)."""
        found: dict[str, ec.EllipticCurvePrivateKey] = {}
        for block in re.findall(rb"-----BEGIN [A-Z ]+-----.+?-----END [A-Z ]+-----", data, re.S):
            key = serialization.load_pem_private_key(block, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("not an EC private key")
            for curve, curve_cls in CURVES.items():
                if isinstance(key.curve, curve_cls):
                    found[curve] = key
        if set(found) != set(CURVES):
            raise ValueError("need one secp256k1 and one P-256 private key")
        return cls(found[K1], found[R1])

    # -- GET /cages/key --------------------------------------------------------

    def served(self) -> dict[str, str]:
        return {
            "ecdhKey": base64.b64encode(self.public[K1]).decode(),
            "ecdhP256Key": base64.b64encode(self.public[R1]).decode(),
        }

    # -- POST /decrypt ---------------------------------------------------------

    def _cipher(self, curve: str, kdf: bool, ephemeral: bytes) -> AESGCM:
        cache_key = (curve, kdf, ephemeral)
        cipher = self._derived.get(cache_key)
        if cipher is not None:
            return cipher
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(CURVES[curve](), ephemeral)
        except ValueError:
            raise UndecryptableError("bad ephemeral key") from None
        shared = self.private[curve].exchange(ec.ECDH(), peer)
        if kdf:
            point = peer.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
            key = hashlib.sha256(shared + b"\x00\x00\x00\x01" + sdk_spki(curve, point)).digest()
        else:
            key = shared
        if len(self._derived) >= _CACHE_MAX:
            self._derived.clear()
        cipher = self._derived[cache_key] = AESGCM(key)
        return cipher

    def decrypt_string(self, value: str) -> Any:
        """Open one ``ev:`` string; raise :class:`UndecryptableError` for anything else."""
        parts = value.split(":")
        if len(parts) == 6:
            _, version, iv, ephemeral, body, end = parts
            datatype = "string"
        elif len(parts) == 7:
            _, version, datatype, iv, ephemeral, body, end = parts
        else:
            raise UndecryptableError("not an ev: string")
        if parts[0] != "ev" or end != "$" or version not in VERSIONS or datatype not in DATATYPES:
            raise UndecryptableError("unknown version or type")
        curve, has_role = VERSIONS[version]
        ephemeral_bytes, iv_bytes, body_bytes = _b64(ephemeral), _b64(iv), _b64(body)
        if has_role:
            aad: bytes | None = _v2_aad(curve, datatype, ephemeral_bytes, self.public[curve])
        else:
            aad = None if curve == K1 else self.public[curve]
        # secp256k1 without a role uses the raw shared secret, everything else the KDF.
        # The SDK caches its derived key for 15 s whatever the role, so a secp256k1 role
        # ciphertext can carry the raw key of an earlier role-less call: try both.
        kdfs = (True, False) if (curve == K1 and has_role) else (curve == R1 or has_role,)
        payload: bytes | None = None
        for kdf in kdfs:
            try:
                payload = self._cipher(curve, kdf, ephemeral_bytes).decrypt(
                    iv_bytes, body_bytes, aad
                )
                break
            except (InvalidTag, ValueError):
                continue
        if payload is None:
            raise UndecryptableError("authentication failed")
        if has_role:
            if len(payload) < 2:
                raise UndecryptableError("truncated metadata")
            payload = payload[2 + int.from_bytes(payload[:2], "little") :]
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            raise UndecryptableError("not UTF-8") from None
        return _coerce(datatype, text)

    def decrypt(self, data: Any) -> Any:
        """Decrypt every ``ev:`` string in ``data``; other values come back unchanged."""
        if isinstance(data, str):
            return self.decrypt_string(data) if data.startswith("ev:") else data
        if isinstance(data, list):
            return [self.decrypt(item) for item in data]
        if isinstance(data, dict):
            return {k: self.decrypt(v) for k, v in data.items()}
        return data


def _coerce(datatype: str, text: str) -> Any:
    """Undo the SDK's ``__coerce_type``: ``str(number)``, ``"true"``/``"false"``."""
    if datatype == "boolean":
        if text not in ("true", "false"):
            raise UndecryptableError("not a boolean")
        return text == "true"
    if datatype == "number":
        if _INTEGER.fullmatch(text):
            return int(text)
        try:
            return float(text)
        except ValueError:
            raise UndecryptableError("not a number") from None
    return text
