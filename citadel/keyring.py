"""The local provider's keyring file: several keys, one active.

Format (JSON, mode 0600)::

    {"format": "citadel-keyring/1", "origin": "auto" | "operator",
     "active": "<key id>",
     "keys": [{"id": "<8 hex>", "key": "<base64 of 32 bytes>", "created": "<ISO 8601>"}]}

``origin`` records whether Citadel created the file itself in development
(``auto``) or an operator made it with ``citadel keyring init``; production
refuses ``auto``. The file is loaded, never regenerated: a corrupt or
unreadable keyring stops start-up instead of being replaced, because replacing
it would make every stored ciphertext undecryptable.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from citadel.fileio import create_once, replace_atomically

FORMAT = "citadel-keyring/1"
KEY_ID = re.compile(r"^[0-9a-f]{8}$")


class KeyringError(Exception):
    """The keyring cannot be used; the message names the problem, never key material."""


@dataclass(frozen=True, slots=True)
class Keyring:
    active: str
    keys: dict[str, bytes]
    origin: str

    def __repr__(self) -> str:
        return f"Keyring(active={self.active!r}, ids={sorted(self.keys)!r}, origin={self.origin!r})"


def new_key_entry() -> tuple[str, dict[str, str]]:
    key_id = secrets.token_hex(4)
    entry = {
        "id": key_id,
        "key": base64.b64encode(secrets.token_bytes(32)).decode(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return key_id, entry


def _fresh_document(origin: str) -> bytes:
    key_id, entry = new_key_entry()
    doc = {"format": FORMAT, "origin": origin, "active": key_id, "keys": [entry]}
    return json.dumps(doc, indent=2).encode() + b"\n"


def create_keyring(path: Path, *, origin: str) -> bool:
    """Create a keyring with one fresh key unless one exists; True when created here."""
    return create_once(path, lambda: _fresh_document(origin))


def load_keyring(path: Path) -> Keyring:
    """Parse and check the keyring at ``path``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyringError(f"keyring {path} does not exist") from None
    except OSError as exc:
        raise KeyringError(f"keyring {path} cannot be read ({exc.strerror})") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise KeyringError(f"keyring {path} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeyringError(f"keyring {path} is not a {FORMAT} file")
    keys: dict[str, bytes] = {}
    entries = doc.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeyringError(f"keyring {path} holds no keys")
    for entry in entries:
        key_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(key_id, str) or not KEY_ID.match(key_id) or key_id in keys:
            raise KeyringError(f"keyring {path} has a missing, malformed or repeated key id")
        try:
            material = base64.b64decode(entry.get("key", ""), validate=True)
        except (binascii.Error, TypeError):
            material = b""
        if len(material) != 32:
            raise KeyringError(f"keyring {path}: key {key_id} is not 32 bytes of base64")
        keys[key_id] = material
    active = doc.get("active")
    if active not in keys:
        raise KeyringError(f"keyring {path}: the active key id is not among its keys")
    origin = doc.get("origin")
    return Keyring(active=str(active), keys=keys, origin=str(origin or "operator"))


def rotate_keyring(path: Path) -> str:
    """Add a fresh key and make it active; older keys stay for decryption. Returns its id."""
    load_keyring(path)  # refuse to rotate a file we could not serve
    doc = json.loads(path.read_bytes())
    key_id, entry = new_key_entry()
    doc["keys"].append(entry)
    doc["active"] = key_id
    replace_atomically(path, json.dumps(doc, indent=2).encode() + b"\n")
    return key_id
