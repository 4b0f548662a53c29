"""Decryption of the Evervault SDK's ``ev:`` strings, mirroring evervault/crypto/client.py."""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from evervault.crypto.curves.koblitz import KoblitzPublicKey
from evervault.crypto.curves.p256 import P256PublicKey

K1, R1 = "SECP256K1", "SECP256R1"
VERSIONS = {"RFVC": (K1, False), "Tk9D": (R1, False), "S0lS": (K1, True), "QkTC": (R1, True)}
CURVES = {K1: ec.SECP256K1, R1: ec.SECP256R1}


class UndecryptableError(Exception):
    """The value is not a ciphertext this app's keys can open."""


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise UndecryptableError("bad base64") from None


class AppKeys:
    """The app's two key pairs, and a cache of derived AES keys per ephemeral key."""

    def __init__(self) -> None:
        self.private = {curve: ec.generate_private_key(cls()) for curve, cls in CURVES.items()}
        self.public = {
            curve: key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
            for curve, key in self.private.items()
        }
        self._derived: dict[tuple[str, bool, bytes], bytes] = {}

    def served(self) -> dict[str, str]:
        return {
            "ecdhKey": base64.b64encode(self.public[K1]).decode(),
            "ecdhP256Key": base64.b64encode(self.public[R1]).decode(),
        }

    def _key(self, curve: str, has_role: bool, ephemeral: bytes) -> bytes:
        cache_key = (curve, has_role, ephemeral)
        key = self._derived.get(cache_key)
        if key is not None:
            return key
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(CURVES[curve](), ephemeral)
        except ValueError:
            raise UndecryptableError("bad ephemeral key") from None
        shared = self.private[curve].exchange(ec.ECDH(), peer)
        if curve == K1 and not has_role:
            key = shared
        else:
            uncompressed = peer.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint).hex()
            encoded = (P256PublicKey if curve == R1 else KoblitzPublicKey)(uncompressed).encode()
            key = hashlib.sha256(shared + b"\x00\x00\x00\x01" + encoded).digest()
        if len(self._derived) > 100_000:
            self._derived.clear()
        self._derived[cache_key] = key
        return key

    def decrypt_string(self, value: str) -> Any:
        parts = value.split(":")
        if len(parts) == 6:
            _, version, iv, ephemeral, body, end = parts
            datatype = "string"
        elif len(parts) == 7:
            _, version, datatype, iv, ephemeral, body, end = parts
        else:
            raise UndecryptableError("not an ev: string")
        if version not in VERSIONS or end != "$" or datatype not in ("string", "number", "boolean"):
            raise UndecryptableError("unknown version or type")
        curve, has_role = VERSIONS[version]
        ephemeral_bytes = _b64(ephemeral)
        # The SDK caches its derived key for 15 s whatever the role, so a secp256k1
        # role ciphertext may carry the raw ECDH key of an earlier role-less call.
        candidates = [self._key(curve, has_role, ephemeral_bytes)]
        if curve == K1 and has_role:
            candidates.append(self._key(curve, False, ephemeral_bytes))
        if has_role:
            type_number = {"string": 0, "number": 1, "boolean": 2}[datatype]
            prefix = (0x00 if curve == K1 else 0x01) | (type_number << 4)
            aad: bytes | None = bytes([prefix]) + ephemeral_bytes + self.public[curve]
        else:
            aad = None if curve == K1 else self.public[curve]
        payload = None
        for key in candidates:
            try:
                payload = AESGCM(key).decrypt(_b64(iv), _b64(body), aad)
                break
            except (InvalidTag, ValueError):
                continue
        if payload is None:
            raise UndecryptableError("authentication failed")
        if has_role:
            offset = int.from_bytes(payload[:2], "little")
            payload = payload[2 + offset :]
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            raise UndecryptableError("not UTF-8") from None
        if datatype == "boolean":
            return text == "true"
        if datatype == "number":
            return float(text) if any(c in text for c in ".eE") else int(text)
        return text

    def decrypt(self, data: Any) -> Any:
        """Decrypt every ``ev:`` string in ``data``; other values come back unchanged."""
        if isinstance(data, str):
            return self.decrypt_string(data) if data.startswith("ev:") else data
        if isinstance(data, list):
            return [self.decrypt(item) for item in data]
        if isinstance(data, dict):
            return {k: self.decrypt(v) for k, v in data.items()}
        return data
