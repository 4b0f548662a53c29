"""The keys ccxt may sign with, and what Citadel signs with for each of them."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

# -- the keys ccxt may use, and what Citadel signs with for each --------------------------------


@dataclass(frozen=True, slots=True)
class _Key:
    """A value ccxt may pass as a key: which ciphertext and how Citadel reads the secret."""

    ciphertext: str
    form: str
    key_encoding: str  # for HMAC; asymmetric forms use their own


@dataclass
class _Credential:
    name: str
    ciphertext: str
    form: str
    stand_in: str
    keys: dict[object, _Key] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.stand_in
        self.keys[s] = _Key(self.ciphertext, self.form, "utf-8")
        self.keys[s.encode("utf-8")] = _Key(self.ciphertext, self.form, "utf-8")
        if self.form in ("base64", "ed25519-base64"):
            raw = base64.b64decode(s)
            self.keys[raw] = _Key(self.ciphertext, self.form, "base64")
            if self.form == "ed25519-base64":
                self.keys[raw[:32]] = _Key(self.ciphertext, self.form, "base64")
        if self.form in ("hex", "ed25519-hex"):
            raw = bytes.fromhex(s)
            self.keys[raw] = _Key(self.ciphertext, self.form, "hex")
            if self.form == "ed25519-hex":
                self.keys[raw[:32]] = _Key(self.ciphertext, self.form, "hex")

    def touches(self, value: object) -> bool:
        """Whether ``value`` holds or is part of the stand-in in any form (a derived key)."""
        if isinstance(value, bytearray):
            value = bytes(value)
        for known in self.keys:
            if type(known) is not type(value) or not isinstance(value, str | bytes):
                continue
            if len(value) >= 8 and (value in known or known in value):  # type: ignore[operator]
                return True
        return False


@dataclass(frozen=True, slots=True)
class _Call:
    """One signature to ask Citadel for."""

    key: _Key
    algorithm: str
    message: bytes
    key_encoding: str
    signature_encoding: str  # hex, base64, base64url
    out: str  # what ccxt's primitive returned: "hex", "base64", "base64url", "binary"


_HMAC_ALGORITHMS: Final = {
    hashlib.sha256: "hmac-sha256",
    hashlib.sha384: "hmac-sha384",
    hashlib.sha512: "hmac-sha512",
}
_JWT_HMAC: Final = {
    "sha256": "hmac-sha256",
    "sha384": "hmac-sha384",
    "sha512": "hmac-sha512",
}
_SIGNATURE_BYTES: Final = {
    "hmac-sha256": 32,
    "hmac-sha384": 48,
    "hmac-sha512": 64,
    "ed25519": 64,
    "ecdsa-p256-sha256": 64,
    "rsa-pkcs1v15-sha256": 256,
}


def _message_fields(message: bytes) -> tuple[str, str]:
    try:
        return message.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(message).decode("ascii"), "base64"


def _to_out(signature: str, call: _Call) -> str | bytes:
    """Citadel's signature in the shape ccxt's primitive returns."""
    if call.out == "binary":
        return bytes.fromhex(signature)
    return signature


def _ccxt_constants(value: object, found: set[object]) -> None:
    """Every string in ccxt's own options (broker ids and keys that ccxt ships)."""
    if isinstance(value, str) and len(value) >= 8:
        found.add(value)
        found.add(value.encode("utf-8"))
    elif isinstance(value, Mapping):
        for item in value.values():
            _ccxt_constants(item, found)
    elif isinstance(value, list | tuple):
        for item in value:
            _ccxt_constants(item, found)
